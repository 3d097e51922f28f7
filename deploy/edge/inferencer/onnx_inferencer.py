"""ONNX Runtime: one ONNX file (FP32 or a QDQ INT8) in an ``InferenceSession`` on CPU, built from the verified bytes.

onnxruntime is imported on first use, so a box that serves only OpenVINO never loads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from deploy.edge.artifact import INPUT_NAME, MANIFEST, OUTPUT_NAME, Artifact, ArtifactError
from deploy.edge.inferencer.base import Inferencer, ModelCard, check_input
from spt_core.portable.errors import one_line

# Keys of `config` that are attributes of ``onnxruntime.SessionOptions``; every other key is a session config entry
# (e.g. ``"session.intra_op.allow_spinning": "0"``).
_SESSION_ATTRIBUTES = ("intra_op_num_threads", "inter_op_num_threads", "execution_mode", "graph_optimization_level")


class OnnxRuntimeInferencer(Inferencer):
    """An ONNX model run by onnxruntime's CPU execution provider; thread-safe (``InferenceSession.run`` is).

    Build it with `from_artifact` for a sealed artifact, or directly on a bare ``model.onnx`` for batch `infer`.

    Args:
        model: The ONNX file, or its bytes (a sealed artifact's verified bytes: the file is not read again).
        config: Session options: ``intra_op_num_threads`` and the like as attributes, other keys as config entries.
        input_name: Input tensor name; None takes the first input.
        output_name: Output tensor name; None takes the first output.
        card: What the logits mean (`ModelCard`), if known.
        source: Where the bytes came from, for messages (default: the path).

    Raises:
        ArtifactError: onnxruntime is missing, cannot load the model, or it has no tensor of that name.
    """

    runtime = "onnxruntime"

    def __init__(
        self,
        model: str | Path | bytes,
        config: Mapping[str, Any] | None = None,
        *,
        input_name: str | None = INPUT_NAME,
        output_name: str | None = OUTPUT_NAME,
        card: ModelCard | None = None,
        source: str | None = None,
    ) -> None:
        where = source or str(model if not isinstance(model, bytes) else "<bytes>")
        super().__init__(card, where, config)
        try:
            import onnxruntime as ort

            options = ort.SessionOptions()
            for key, value in self.config.items():
                if key in _SESSION_ATTRIBUTES:
                    setattr(options, key, value)
                else:
                    options.add_session_config_entry(key, str(value))
            data = model if isinstance(model, bytes) else Path(model).read_bytes()
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
            self._input = input_name or inputs[0].name
            self._output = output_name or outputs[0].name
            if self._input not in {i.name for i in inputs} or self._output not in {o.name for o in outputs}:
                raise ValueError(f"no tensor {self._input!r} -> {self._output!r}")
        except Exception as e:  # ORT raises Fail/InvalidGraph/...: all mean a corrupt or foreign file here
            raise ArtifactError(
                f"{where} cannot be loaded by onnxruntime ({one_line(e)}): the file is corrupt or does not fit its "
                "manifest; re-export it"
            ) from None

    @classmethod
    def from_artifact(cls, artifact: Artifact, config: Mapping[str, Any] | None = None) -> OnnxRuntimeInferencer:
        """Load a verified ONNX artifact from its verified bytes, with its ``runtime_config`` + ``config``.

        Raises:
            ArtifactError: Not an ONNX artifact, a preprocessing other than RGB/NCHW, or a model onnxruntime cannot
                load.
        """
        if artifact.format != "onnx":
            raise ArtifactError(f"{artifact.dir / MANIFEST}: format={artifact.format!r}, not an ONNX model")
        check_input(artifact)
        m, path = artifact.manifest, artifact.model_path
        names = {"input_name": m.get("input_name"), "output_name": m.get("output_name")}
        data = artifact.data.get(path.name) or path.read_bytes()
        merged = artifact.runtime_config | dict(config or {})
        inf = cls(data, merged, **names, card=ModelCard.of(artifact), source=str(artifact.dir))
        inf.artifact = replace(artifact, data={})  # the session holds its own copy
        return inf

    def infer(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, classes) logits."""
        return np.asarray(self.session.run([self._output], {self._input: x})[0])
