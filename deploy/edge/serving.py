"""How the box runs its models: the device OpenVINO compiles them for, how many cameras feed it (which picks the
performance hint), optional micro-batching across cameras, and the input variant it serves. Keys of the rollout
manifest (all optional)::

    device: CPU                 # CPU | GPU | NPU | AUTO (GPU.1: the second GPU): compile_model's device
    cameras: {count: 8}         # cameras posting to this box; 1 (or absent): LATENCY, more: THROUGHPUT
    batching: {max_batch: 4, window_ms: 2, p99_target_ms: 50}   # off (max_batch 1) unless set
    preprocess: auto            # auto | host | graph: which input variant the box serves (`Serving.variant_choice`)

Why the hint follows the camera count: one camera has at most one frame in flight, so the box should spend every
core on that one inference (LATENCY: one stream, one infer request). Several cameras keep several frames in flight;
THROUGHPUT splits the cores into streams that each run one inference, which finishes more frames a second at some
cost to each frame's latency. ``PERFORMANCE_HINT_NUM_REQUESTS`` tells OpenVINO how many requests the cameras can keep
busy, so a box with 16 cores and 2 cameras makes 2 streams of 8 threads, not 8 streams with 6 idle. The manifest's
own ``openvino`` properties are laid over these and win (an explicit ``PERFORMANCE_HINT`` stays as written).

Batching (`deploy.edge.inferencer.batching`) gathers frames of one model that arrive within ``window_ms`` into one
inference of up to ``max_batch`` frames; a frame never waits longer than ``p99_target_ms`` minus the recent p99 of a
batch's inference, so when inference alone nears the target the window closes.

The export's parity gate decides whether an artifact *may* be served with its preprocessing in the graph (it ships
``input_variant: graph``, `deploy.edge.graph_spec`); the box decides whether it *is*. ``auto`` serves the graph variant
on a GPU or AUTO, where the resize runs on the accelerator and frees the host's cores, and host preprocessing on a CPU,
where Pillow measured faster than OpenVINO's resize (docs/graph-preprocessing.md), and on an NPU, which compiles
static shapes while the graph takes frames of any size. Torch-free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deploy.edge.graph_spec import GRAPH, HOST

LATENCY, THROUGHPUT = "LATENCY", "THROUGHPUT"
DEVICES = ("CPU", "GPU", "NPU", "AUTO")
PREPROCESS = ("auto", HOST, GRAPH)  # the rollout key `preprocess`
_GRAPH_DEVICES = ("GPU", "AUTO")  # where `auto` serves the graph variant (module docstring)
_DEVICE = re.compile(r"(CPU|GPU(\.\d+)?|NPU|AUTO)")  # GPU.N: the N-th GPU, as OpenVINO's available_devices names it


@dataclass(frozen=True)
class Batching:
    """Micro-batching across cameras (module docstring); ``max_batch`` 1 is off."""

    max_batch: int = 1
    window_ms: float = 2.0  # the longest a first frame waits for others
    p99_target_ms: float = 50.0  # per-camera p99 the window must leave room for

    @property
    def on(self) -> bool:
        return self.max_batch > 1


@dataclass(frozen=True)
class Serving:
    """The device, the camera count, the batching and the input variant choice of one rollout manifest."""

    device: str = "CPU"
    cameras: int | None = None  # None: not stated; served as one camera (LATENCY), as before the key existed
    batching: Batching = field(default_factory=Batching)
    preprocess: str = "auto"  # `PREPROCESS`: which input variant to serve (`variant_choice`)

    @property
    def hint(self) -> str:
        """THROUGHPUT for several cameras, LATENCY for one (module docstring)."""
        return THROUGHPUT if (self.cameras or 1) > 1 else LATENCY

    def compile_properties(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The performance hint for the camera count, with the manifest's ``openvino`` properties (`given`) over it.

        THROUGHPUT also sets ``PERFORMANCE_HINT_NUM_REQUESTS`` to the inferences the cameras keep in flight: one per
        camera, or one per batch of ``max_batch`` cameras when batching is on."""
        props: dict[str, Any] = {"PERFORMANCE_HINT": self.hint}
        if self.hint == THROUGHPUT:
            props["PERFORMANCE_HINT_NUM_REQUESTS"] = math.ceil((self.cameras or 1) / self.batching.max_batch)
        return props | dict(given or {})

    def variant_choice(self, shipped: str) -> tuple[str, str]:
        """The input variant this box serves for an artifact that ships `shipped` (``host`` or ``graph``), and why
        (/healthz says it). host: host always; graph: graph where the artifact ships it; auto: graph where the artifact
        ships it and the device is a GPU or AUTO (module docstring), else host."""
        if self.preprocess == HOST:
            return HOST, "preprocess: host"
        if shipped != GRAPH:
            return HOST, (f"preprocess: {self.preprocess}, but the artifact ships host preprocessing only (its "
                          "export's parity gate did not pass, or export.graph_preprocess: off)")  # fmt: skip
        if self.preprocess == GRAPH:
            return GRAPH, "preprocess: graph"
        if self.device.split(".")[0] in _GRAPH_DEVICES:
            return GRAPH, f"preprocess: auto on {self.device}: the resize runs on the accelerator"
        if self.device == "NPU":
            return HOST, "preprocess: auto on NPU: it compiles static shapes, the graph takes frames of any size"
        return HOST, f"preprocess: auto on {self.device}: Pillow resizes faster than the graph there"

    def variant_for(self, shipped: str) -> str:
        """The input variant served for an artifact that ships `shipped` (`variant_choice`)."""
        return self.variant_choice(shipped)[0]

    def to_manifest(self) -> dict[str, Any]:
        """The top-level manifest keys (``cameras.count`` goes into the manifest's ``cameras`` mapping)."""
        b = self.batching
        out: dict[str, Any] = {"device": self.device, "preprocess": self.preprocess}
        if b.on:
            out["batching"] = {"max_batch": b.max_batch, "window_ms": b.window_ms, "p99_target_ms": b.p99_target_ms}
        return out


def parse_serving(data: Mapping[str, Any], errors: list[str]) -> Serving:
    """``device``, ``cameras.count``, ``batching`` and ``preprocess`` of a loaded manifest -> `Serving`; each bad
    value is appended to `errors` in one line (the manifest's own checks report the rest of ``cameras``)."""
    device = data.get("device", "CPU")
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        errors.append(f"device={device!r}: use one of {', '.join(DEVICES)} (GPU.1 for a second GPU)")
        device = "CPU"
    cameras = data.get("cameras")
    count = cameras.get("count") if isinstance(cameras, dict) else None
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 4096):
        errors.append(f"cameras.count={count!r}: give the number of cameras feeding this box, an integer in [1, 4096]")
        count = None
    preprocess = data.get("preprocess", "auto")
    if preprocess not in PREPROCESS:
        errors.append(f"preprocess={preprocess!r}: use one of {', '.join(PREPROCESS)} (the input variant to serve)")
        preprocess = "auto"
    return Serving(device, count, _batching(data.get("batching"), errors), preprocess)


def _batching(value: Any, errors: list[str]) -> Batching:
    if value is None:
        return Batching()
    keys = list(Batching.__dataclass_fields__)
    if not isinstance(value, dict) or set(value) - set(keys):
        errors.append(f"batching={value!r}: give a mapping with keys {keys}, e.g. {{max_batch: 4}}")
        return Batching()
    out, bounds = {}, {"max_batch": (1, 64), "window_ms": (0.0, 100.0), "p99_target_ms": (1.0, 10_000.0)}
    for key, (lo, hi) in bounds.items():
        v = value.get(key, getattr(Batching(), key))
        kind = int if key == "max_batch" else (int, float)
        if isinstance(v, bool) or not isinstance(v, kind) or not lo <= v <= hi:
            errors.append(f"batching.{key}={v!r}: give a{'n integer' if kind is int else ' number'} in [{lo}, {hi}]")
        else:
            out[key] = v if key == "max_batch" else float(v)
    return Batching(**out)
