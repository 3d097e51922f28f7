"""OpenVINO: one IR compiled from the verified bytes for a device (CPU by default; GPU, NPU or AUTO as the rollout
manifest's ``device`` says), run through an ``AsyncInferQueue`` of its optimal number of infer requests.

The one place the project compiles and calls an OpenVINO model (the edge service, `deploy.compile.verify`,
`sensitune predict`, the benchmarks), so an IR is compiled with the same properties and fed the same way everywhere.
Many cameras' threads share one model: each call takes a free request (the wait `predict` reports as ``queue_ms``),
starts it asynchronously and waits for its callback, so as many inferences run at once as the compiled model has
requests (1 under LATENCY, one per stream under THROUGHPUT; `deploy.edge.serving`). With ``batching`` on, frames
from several cameras are gathered into one inference first (`batching.MicroBatcher`). OpenVINO is imported on first
use.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from deploy.edge.artifact import INPUT_NAME, MANIFEST, OUTPUT_NAME, Artifact, ArtifactError
from deploy.edge.inferencer.base import Inferencer, Logits, ModelCard, check_input
from deploy.edge.inferencer.batching import MicroBatcher
from deploy.edge.serving import Batching
from spt_core.portable.errors import one_line

_core_lock = threading.Lock()
_core: Any = None
# An inference that failed inside OpenVINO never calls back (its future is never set): the caller gives up after this
# long and gets an error, which the service answers as any failed inference. A healthy one takes milliseconds.
RESULT_TIMEOUT_S = 30.0


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


def _batch_of_one(port: Any) -> Any:
    """The port's shape with its first (batch) dimension fixed to 1."""
    import openvino as ov

    shape = port.get_partial_shape()
    return ov.PartialShape([1, *list(shape)[1:]])


def check_device(core: Any, device: str) -> None:
    """Refuse a device this box's OpenVINO does not see (no driver, no such chip) before compiling for it; AUTO is
    always there (it picks among the devices present)."""
    seen = list(core.available_devices)
    if device == "AUTO" or any(d == device or d.split(".")[0] == device for d in seen):
        return
    raise ArtifactError(f"device={device}: this box's OpenVINO sees only {seen}; install the {device} driver "
                        "(docs/edge-box.md) or set device: CPU (or AUTO) in the rollout manifest")  # fmt: skip


class OpenVINOInferencer(Inferencer):
    """An OpenVINO IR compiled for `device`, run through an ``AsyncInferQueue`` of ``OPTIMAL_NUMBER_OF_INFER_REQUESTS``
    requests; thread-safe.

    Build it with `from_artifact` for a sealed artifact (what the edge serves), or directly on a bare ``model.xml``
    for batch `infer` only.

    Args:
        xml_path: ``model.xml``; its ``model.bin`` lies beside it.
        config: OpenVINO compile properties (e.g. the manifest's ``runtime_config`` + ``PERFORMANCE_HINT``).
        input_name: Input tensor name; None takes the first input.
        output_name: Output tensor name; None takes the first output.
        artifact: The verified artifact the IR belongs to, if any: its bytes are compiled, not the files.
        card: What the logits mean (`ModelCard`), if known.
        device: OpenVINO's device name (``CPU``, ``GPU``, ``GPU.1``, ``NPU``, ``AUTO``).
        batching: Micro-batching of `predict`'s frames (`deploy.edge.serving.Batching`); None or max_batch 1: off.

    Raises:
        ArtifactError: The device is not on this box, OpenVINO cannot read or compile the IR, or it has no tensor of
            that name.
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
        device: str = "CPU",
        batching: Batching | None = None,
    ) -> None:
        xml = Path(xml_path)
        super().__init__(card, str(artifact.dir if artifact is not None else xml), config)
        core = _ov_core()
        check_device(core, device)
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
            model = self._prepare(model)
            if device.startswith("NPU"):  # the NPU compiles static shapes: one frame per inference, never a batch
                port = model.input(input_name) if input_name else model.input(0)
                model.reshape({port: _batch_of_one(port)})
                batching = None
            compiled = core.compile_model(model, device, self.config)
            self._input = compiled.input(input_name) if input_name else compiled.input(0)
            self._output = compiled.output(output_name) if output_name else compiled.output(0)
        except Exception as e:  # OpenVINO raises RuntimeError for bad IR, unknown names, bad config
            raise ArtifactError(
                f"{xml} cannot be loaded by OpenVINO ({one_line(e)}): the file is corrupt or does not fit its "
                "manifest; re-export it"
            ) from None
        self.compiled, self.artifact, self.device = compiled, artifact, device
        self._shape = self._input.get_partial_shape()  # what `_start` checks each input against
        self.n_requests = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._free = threading.BoundedSemaphore(self.n_requests)  # taken before a start: start_async never waits
        self._queue_lock = threading.Lock()  # start_async picks a request, then fills it: one start at a time
        self._queue = self._new_queue()
        self._retired: list[Any] = []  # queues replaced after a failure (rare): kept alive, a request may still run
        self.batcher = MicroBatcher(self._infer_now, batching, self.n_requests) if batching and batching.on else None

    def _prepare(self, model: Any) -> Any:
        """The ``openvino.Model`` to compile, given the IR as read: itself here; the graph variant
        (`graph_input.FrameInferencer`) adds its preprocessing."""
        return model

    @classmethod
    def from_artifact(
        cls, artifact: Artifact, config: Mapping[str, Any] | None = None, *, device: str = "CPU",
        batching: Batching | None = None,
    ) -> OpenVINOInferencer:  # fmt: skip
        """Compile a verified OpenVINO artifact for `device` with its ``runtime_config``, ``config`` laid over it.

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
        inf = cls(artifact.model_path, merged, **names, artifact=artifact, card=ModelCard.of(artifact), device=device,
                  batching=batching)  # fmt: skip
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
        """(N, 3, H, W) float32 -> (N, classes) logits, copied out of the request's reused buffer (never batched with
        other calls: a batch is the caller's)."""
        return self._infer_now(x)

    @contextlib.contextmanager
    def _slot(self) -> Iterator[Logits]:
        """`predict`'s logits function: through the micro-batcher when batching is on (it waits for requests itself),
        else on a free infer request taken here (waits for one)."""
        if self.batcher is not None:
            yield lambda x: np.asarray(self.batcher.submit(x).result(RESULT_TIMEOUT_S))
            return
        with self._request():
            yield lambda x: self._start(x).result(RESULT_TIMEOUT_S)

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        self._free.acquire()
        try:
            yield
        finally:
            self._free.release()

    def _infer_now(self, x: np.ndarray) -> np.ndarray:
        with self._request():
            return self._start(x).result(RESULT_TIMEOUT_S)

    def _new_queue(self) -> Any:
        import openvino as ov

        q = ov.AsyncInferQueue(self.compiled, self.n_requests)
        q.set_callback(self._done)
        return q

    def _done(self, request: Any, future: Future) -> None:
        """The queue's callback, on OpenVINO's thread: the logits into the caller's future. It must not raise: an
        exception here would be re-raised by every later start of the queue."""
        try:
            future.set_result(np.array(request.get_tensor(self._output).data))  # a copy: the request is reused
        except BaseException as e:  # handed to the waiting caller instead
            if not future.done():
                future.set_exception(e)

    def _start(self, x: np.ndarray) -> Future:
        """Start one inference of `x` on an idle request (the caller holds `_free`, so one is idle) -> its future.

        An input the model cannot take is refused here: inside the queue its failure would never call back and would
        poison the request it ran on. A queue poisoned anyway (an inference failed inside OpenVINO: every later start
        re-raises that failure) is replaced by a fresh one and the start tried once more."""
        shape = self._shape
        if shape.rank.is_static and (x.ndim != len(shape) or any(
            d.is_static and d.get_length() != n for d, n in zip(shape, x.shape)
        )):  # fmt: skip
            raise ValueError(f"{self.source}: input of shape {tuple(x.shape)} does not fit the model's {shape}")
        future: Future = Future()
        with self._queue_lock:
            try:
                self._queue.start_async({self._input: x}, future)
            except RuntimeError:
                self._retired.append(self._queue)
                self._queue = self._new_queue()
                self._queue.start_async({self._input: x}, future)
        return future
