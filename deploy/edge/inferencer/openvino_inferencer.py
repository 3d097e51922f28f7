"""OpenVINO: one IR compiled on CPU from the verified bytes, with a pool of infer requests.

The one place the project compiles and calls an OpenVINO model (the edge service, `deploy.compile.verify`,
`sensitune predict`, the benchmarks), so an IR is compiled with the same properties and fed the same way everywhere.
OpenVINO is imported on first use.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from deploy.edge.artifact import INPUT_NAME, MANIFEST, OUTPUT_NAME, Artifact, ArtifactError
from deploy.edge.inferencer.base import Inferencer, Logits, ModelCard, check_input
from spt_core.portable.errors import one_line

_core_lock = threading.Lock()
_core: Any = None


def ov_tensor(array: np.ndarray) -> Any:
    """An OpenVINO tensor holding a copy of `array` (OpenVINO is imported on first use)."""
    import openvino as ov

    return ov.Tensor(np.ascontiguousarray(array))


def _ov_core() -> Any:
    """The process's one ``openvino.Core`` (compiled models share its CPU plugin and thread pools)."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino as ov

            _core = ov.Core()
        return _core


class OpenVINOInferencer(Inferencer):
    """An OpenVINO IR compiled on CPU, with ``OPTIMAL_NUMBER_OF_INFER_REQUESTS`` infer requests; thread-safe.

    Build it with `from_artifact` for a sealed artifact (what the edge serves), or directly on a bare ``model.xml``
    for batch `infer` only.

    Args:
        xml_path: ``model.xml``; its ``model.bin`` lies beside it.
        config: OpenVINO compile properties (e.g. the manifest's ``runtime_config`` + ``PERFORMANCE_HINT``).
        input_name: Input tensor name; None takes the first input.
        output_name: Output tensor name; None takes the first output.
        artifact: The verified artifact the IR belongs to, if any: its bytes are compiled, not the files.
        card: What the logits mean (`ModelCard`), if known.

    Raises:
        ArtifactError: OpenVINO cannot read or compile the IR, or it has no tensor of that name.
    """

    runtime = "openvino"

    def __init__(
        self,
        xml_path: str | Path,
        config: Mapping[str, Any] | None = None,
        *,
        input_name: str | None = INPUT_NAME,
        output_name: str | None = OUTPUT_NAME,
        artifact: Artifact | None = None,
        card: ModelCard | None = None,
    ) -> None:
        xml = Path(xml_path)
        super().__init__(card, str(artifact.dir if artifact is not None else xml), config)
        core = _ov_core()
        if artifact is not None and {xml.name, "model.bin"} <= artifact.data.keys():
            xml_bytes, bin_bytes = artifact.data[xml.name], artifact.data["model.bin"]  # the verified bytes
        else:
            try:
                xml_bytes, bin_bytes = xml.read_bytes(), xml.with_suffix(".bin").read_bytes()
            except OSError as e:
                raise ArtifactError(f"{xml}: cannot read the IR ({one_line(e)}); re-export it") from None
        try:
            # From memory, never from the path: OpenVINO would memory-map model.bin, so a later in-place edit
            # would change the answers and a truncation would kill the process with SIGBUS.
            weights = ov_tensor(np.frombuffer(bin_bytes, np.uint8))
            model = core.read_model(xml_bytes.decode("utf-8"), weights)
            compiled = core.compile_model(model, "CPU", self.config)
            self._input = compiled.input(input_name) if input_name else compiled.input(0)
            self._output = compiled.output(output_name) if output_name else compiled.output(0)
        except Exception as e:  # OpenVINO raises RuntimeError for bad IR, unknown names, bad config
            raise ArtifactError(
                f"{xml} cannot be loaded by OpenVINO ({one_line(e)}): the file is corrupt or does not fit its "
                "manifest; re-export it"
            ) from None
        self.compiled = compiled
        self.artifact = artifact
        self.n_requests = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.n_requests):
            self._pool.put(compiled.create_infer_request())

    @classmethod
    def from_artifact(cls, artifact: Artifact, config: Mapping[str, Any] | None = None) -> OpenVINOInferencer:
        """Compile a verified OpenVINO artifact with its ``runtime_config``, ``config`` laid over it.

        Raises:
            ArtifactError: Not an OpenVINO artifact (the edge serves OpenVINO IR only), a preprocessing other than
                RGB/NCHW, an IR that does not compile, or an input that does not take (N, 3, H, W) at the manifest's
                size.
        """
        if artifact.format != "openvino":
            raise ArtifactError(
                f"{artifact.dir / MANIFEST}: format={artifact.format!r}; the edge serves OpenVINO IR (format openvino)"
            )
        check_input(artifact)
        m, pre = artifact.manifest, artifact.preprocess
        names = {"input_name": m.get("input_name"), "output_name": m.get("output_name")}
        merged = artifact.runtime_config | dict(config or {})
        inf = cls(artifact.model_path, merged, **names, artifact=artifact, card=ModelCard.of(artifact))
        inf.artifact = replace(artifact, data={})  # compiled: OpenVINO holds its own copy of the verified bytes
        shape = inf._input.get_partial_shape()
        want = [None, 3, *pre.size]
        if (
            shape.rank.is_dynamic
            or len(shape) != 4
            or any(w is not None and shape[i].is_static and shape[i].get_length() != w for i, w in enumerate(want))
        ):
            size = f"{pre.size[0]}, {pre.size[1]}"
            raise ArtifactError(f"{artifact.dir}: input shape {shape} does not take (N, 3, {size})")
        return inf

    def infer(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, classes) logits, copied out of the request's reused buffer."""
        with self._slot() as run:
            return run(x)

    @contextlib.contextmanager
    def _slot(self) -> Iterator[Logits]:
        """A free infer request of the pool (waits for one), returned to the pool afterwards."""
        req = self._pool.get()
        try:
            yield lambda x: np.array(req.infer({self._input: x})[self._output])
        finally:
            self._pool.put(req)
