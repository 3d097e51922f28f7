"""The OpenVINO inferencer: one IR compiled on CPU, a pool of infer requests, batch logits or one served frame.

The one place the project compiles and calls an OpenVINO model: the edge service (one per served model),
`deploy.compile.verify` (parity of the OpenVINO artifacts), `sensitune predict` and the benchmarks, so an IR is compiled
with the same properties and fed the same way everywhere. `OnnxInferencer` offers the same batch `infer` for an
ONNX artifact through onnxruntime (`sensitune predict` on ``model.onnx``). Torch-free; the runtimes are imported on
first use.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deploy.edge.artifact import INPUT_NAME, MANIFEST, OUTPUT_NAME, Artifact, ArtifactError
from spt_core.portable.errors import one_line
from spt_core.portable.preprocess import preprocess_image

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


class Inferencer:
    """An OpenVINO IR compiled on CPU, with ``OPTIMAL_NUMBER_OF_INFER_REQUESTS`` infer requests; thread-safe.

    Build it with `from_artifact` for a sealed artifact (what the edge serves: `predict` needs the artifact's
    class names and preprocessing), or directly on a bare ``model.xml`` for batch `infer` only.

    Args:
        xml_path: ``model.xml``; its ``model.bin`` lies beside it.
        config: OpenVINO compile properties (e.g. the manifest's ``runtime_config`` + ``PERFORMANCE_HINT``).
        input_name: Input tensor name; None takes the first input.
        output_name: Output tensor name; None takes the first output.
        artifact: The verified artifact the IR belongs to, if any.

    Raises:
        ArtifactError: OpenVINO cannot read or compile the IR, or it has no tensor of that name.
    """

    def __init__(
        self,
        xml_path: str | Path,
        config: Mapping[str, Any] | None = None,
        *,
        input_name: str | None = INPUT_NAME,
        output_name: str | None = OUTPUT_NAME,
        artifact: Artifact | None = None,
    ) -> None:
        xml = Path(xml_path)
        self.ov_config = dict(config or {})
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
            compiled = core.compile_model(model, "CPU", self.ov_config)
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
    def from_artifact(cls, artifact: Artifact, openvino: Mapping[str, Any] | None = None) -> Inferencer:
        """Compile a verified OpenVINO artifact with its ``runtime_config``, ``openvino`` laid over it.

        Raises:
            ArtifactError: Not an OpenVINO artifact, a preprocessing other than RGB/NCHW, an IR that does not
                compile, or an input that does not take (N, 3, H, W) at the manifest's size.
        """
        mpath, pre = artifact.dir / MANIFEST, artifact.preprocess
        if artifact.format != "openvino":
            raise ArtifactError(f"{mpath}: format={artifact.format!r}; the edge serves OpenVINO IR (format openvino)")
        if pre.color != "RGB" or pre.layout != "NCHW":
            raise ArtifactError(f"{mpath}: preprocess color/layout {pre.color}/{pre.layout}; need RGB/NCHW")
        m = artifact.manifest
        config = artifact.runtime_config | dict(openvino or {})
        names = {"input_name": m.get("input_name"), "output_name": m.get("output_name")}
        inf = cls(artifact.model_path, config, **names, artifact=artifact)
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

    def smoke_test(self) -> None:
        """Run one mid-grey frame through `predict`; raise `ArtifactError` unless it answers a finite score for one
        of the artifact's classes. A promotion calls this before it writes anything."""
        h, w = self.artifact.preprocess.size
        try:
            out = self.predict(Image.new("RGB", (w, h), (128, 128, 128)))
        except Exception as e:
            raise ArtifactError(f"{self.artifact.dir}: smoke test failed ({one_line(e)}); re-export it") from None
        if not np.isfinite(out["score"]):
            raise ArtifactError(f"{self.artifact.dir}: smoke test gave a non-finite score; re-export it")

    @property
    def version(self) -> str:
        """The artifact's ``model_version`` (`from_artifact` only)."""
        return self.artifact.version

    @property
    def class_names(self) -> list[str]:
        """The artifact's class names, in logit order (`from_artifact` only)."""
        return self.artifact.class_names

    def infer(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, classes) logits, copied out of the request's reused buffer."""
        req = self._pool.get()
        try:
            return np.array(req.infer({self._input: x})[self._output])
        finally:
            self._pool.put(req)

    def predict(self, image: Image.Image, gate: threading.Semaphore | None = None) -> dict[str, Any]:
        """One image -> {class, class_index, score (softmax), latency_ms, queue_ms} (`from_artifact` only).

        Args:
            image: RGB image.
            gate: shared by all models of a runtime: at most that many inferences run at once on the box.
                Without it, the model with less traffic (the challenger) would mostly run while the other one
                runs too and look slower than it is; with it, every inference meets the same contention.

        `latency_ms` is preprocessing + inference without the wait for the gate and a free infer request
        (`queue_ms`), which grows with a model's share of the traffic; latency_ms is what the rule compares.
        """
        t0 = time.perf_counter()
        x = preprocess_image(image, self.artifact.preprocess)[None]  # (1, 3, H, W)
        t1 = time.perf_counter()
        with gate or contextlib.nullcontext():
            req = self._pool.get()
            t2 = time.perf_counter()
            try:
                logits = np.array(req.infer({self._input: x})[self._output][0], dtype=np.float64)  # copy first
            finally:
                self._pool.put(req)
            t3 = time.perf_counter()
        p = np.exp(logits - logits.max())
        p /= p.sum()
        i = int(p.argmax())
        ms, queue_ms = (t1 - t0 + t3 - t2) * 1e3, (t2 - t1) * 1e3
        return {
            "class": self.class_names[i],
            "class_index": i,
            "score": float(p[i]),
            "margin": float(p[i] - np.partition(p, -2)[-2]) if len(p) > 1 else 1.0,  # top-1 - top-2 probability
            **self.artifact.decide(p),  # p_good and the decision at the manifest's threshold
            "latency_ms": ms,
            "queue_ms": queue_ms,
        }


class OnnxInferencer:
    """A sealed ONNX artifact run by onnxruntime on CPU: the same batch `infer` as `Inferencer`.

    Raises:
        ArtifactError: onnxruntime is missing or cannot load the file.
    """

    def __init__(self, artifact: Artifact) -> None:
        try:
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(artifact.model_path), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ArtifactError(f"{artifact.model_path} cannot be loaded by onnxruntime ({one_line(e)})") from None
        self.artifact = artifact
        self._input = artifact.manifest.get("input_name") or self.session.get_inputs()[0].name

    @property
    def class_names(self) -> list[str]:
        return self.artifact.class_names

    def infer(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, classes) logits."""
        return np.asarray(self.session.run(None, {self._input: x})[0])
