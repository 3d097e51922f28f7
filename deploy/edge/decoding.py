"""Line frames off the inference path: a bounded pool of decode workers turns each frame into every model's input,
and only those model-sized inputs go on to inference.

Before, a request decoded its frame and then held the full-size frame, and its decode slot, through the champion's
inference (and the challenger's, and a fallback's): decode slots waited on inference and inference on slots. Now a
slot (``limits.decode_concurrency``, the same `DecodeGate` the pages' thumbnails take; 503 after 10 s without one) is
held from the decode to the models' inputs only, a few milliseconds, and the cameras' inferences overlap with the
next frames' decodes. A model that takes the decoded frame itself (a graph variant, which resizes in its compiled
model: `deploy.edge.inferencer.graph_input`) gets the frame, and then the slot is held until the frame's answer, so
full-size frames stay bounded by ``decode_concurrency`` as before. The workers are threads (Pillow's decoders and
resampling release the GIL); their number follows the slots in use. Frames over ``limits.large_frame_bytes`` never
come here: the large-frame lane (`deploy.edge.lane`) makes their inputs the same way, in its own process.

JPEG draft mode: a camera's JPEG is usually far larger than a model's input (2448 x 2048 for 128 x 128). libjpeg can
decode it at 1/2, 1/4 or 1/8 scale directly from the DCT coefficients, ~9x faster at 5 MP than a full decode (10 vs
91 ms on the main job's box). `draft` picks the smallest scale that still leaves ``DRAFT_MARGIN`` (2) x every served
model's input in both directions, so the bicubic resize that follows still antialiases from at least twice the
size. Tolerance, stated and tested (tests/test_edge_box.py): each model input stays within a mean of 1 grey level
(of 255) of the full decode's (measured 0.25 mean, 0.49 worst on 5 MP frames of the test split and photos); on the
main job's model no decision changed and P(good) moved by at most 0.05 (p95 0.018; benchmarks/results/edge_box.md).
PNG and TIFF frames are decoded in full, as before.

The operator pages' thumbnail of a frame (`View`) is made here too, from the same decode: a frame is decoded once on
the box. The pages used to decode every answered frame a second time, at full size, in the service process after its
answer; a 25 MP frame that the large-frame lane had decoded at low priority was then decoded again at normal
priority, and the line's frames waited (issue 29; benchmarks/results/edge_load_oversized.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from PIL import Image

from deploy.edge.limits import DecodeGate, decode
from deploy.edge.rollout.manifest import CHALLENGER, CHAMPION
from spt_core.portable.preprocess import Preprocess, model_image, to_8bit

DRAFT_MARGIN = 2  # a drafted JPEG keeps at least this many times each model's input size
VIEW = "view"  # the key of the pages' thumbnail among a frame's inputs (`model_inputs`)
Input = tuple[Image.Image | Exception, float]  # a model's input (or why it failed) and the ms its preprocessing took
Wanted = Mapping[str, tuple[Preprocess, bool]]  # role -> (its preprocessing, whether it takes the decoded frame)


@dataclass(frozen=True)
class View:
    """The operator pages' thumbnail of a frame: at most `px` on its longest side, made 8-bit by `bit_depth` (the
    champion's ``preprocess.bit_depth``: the frame as the model sees it)."""

    px: int
    bit_depth: int | None = None


def view_image(image: Image.Image, view: View) -> Image.Image:
    """A decoded (or draft-opened) frame -> its RGB thumbnail (`View`). Made 8-bit (`to_8bit`: a Mono12 frame scaled by
    4095, neither clipped to white nor shown as a dark 0..15) and shrunk before it becomes RGB, so a full-size frame
    costs 1 byte a pixel on top of its decode, not 4."""
    small = to_8bit(image, view.bit_depth)
    w, h = small.size
    scale = min(1.0, view.px / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != small.size:  # a new image (never `thumbnail`, which works in place on the decoded frame)
        small = small.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    return small.convert("RGB")


def draft(header: Image.Image, specs: Iterable[Preprocess]) -> Image.Image:
    """`header` (a frame `deploy.edge.limits.open_header` passed, not decoded yet) set to decode at the smallest
    libjpeg scale that keeps ``DRAFT_MARGIN`` x the largest of `specs`' input sizes; a frame that is not a JPEG, or
    too small to shrink, as it is. Its ``size`` is the drafted one afterwards (what its decode costs)."""
    sizes = [p.size for p in specs]  # (height, width)
    if header.format == "JPEG" and sizes:
        h, w = (max(s[i] for s in sizes) * DRAFT_MARGIN for i in (0, 1))
        header.draft(None, (w, h))  # Pillow picks the largest 1/8..1/2 reduction whose result is still >= (w, h)
    return header


def takes_frame(model: Any) -> bool:
    """A graph variant resizes in its compiled model, so it is given the decoded frame, not a host-made model image."""
    from deploy.edge.inferencer.graph_input import FrameInferencer

    return isinstance(model, FrameInferencer)


def wanted(rt: Any, camera_id: str) -> dict[str, tuple[Preprocess, bool]]:
    """The inputs a line frame needs from runtime `rt` (`deploy.edge.runtime.Runtime`): the champion's always (it
    answers, or stands in for a failing challenger); the challenger's when the camera is on its arm (as the model
    takes it), or when it will run in shadow (model-sized always: a shadow run comes after the answer, outside the
    slot)."""
    out = {CHAMPION: (rt.champion.artifact.preprocess, takes_frame(rt.champion))}
    challenger = rt.challenger
    if challenger is not None and rt.arm(camera_id) == CHALLENGER:
        out[CHALLENGER] = (challenger.artifact.preprocess, takes_frame(challenger))
    elif challenger is not None and rt.config.shadow and not rt.health.disabled:
        out[CHALLENGER] = (challenger.artifact.preprocess, False)
    return out


def model_inputs(header: Image.Image, want: Wanted, view: View | None = None) -> dict[str, Input]:
    """In a decode worker (or the large-frame lane's): decode `header`, then each role's input, timed: the frame
    itself for a model that takes it, else `model_image` at its size (a spec seen before is made once), and with
    `view` the pages' thumbnail under `VIEW`. A failure is kept for the role it belongs to, raised where that model
    runs, as its own preprocessing would have; a frame that does not decode raises `LimitError` 415 here."""
    image = decode(header)
    made: list[tuple[Preprocess, Input]] = []
    out: dict[str, Input] = {}
    for role, (pre, whole) in want.items():
        if whole:
            out[role] = (image, 0.0)  # the graph resizes it; its time counts in the model's own latency
            continue
        same = next((given for spec, given in made if spec == pre), None)
        if same is None:
            t0 = time.perf_counter()
            try:
                same = (model_image(image, pre), (time.perf_counter() - t0) * 1e3)
            except Exception as e:
                same = (e, 0.0)
            made.append((pre, same))
        out[role] = same
    if view is not None:
        t0 = time.perf_counter()
        try:
            out[VIEW] = (view_image(image, view), (time.perf_counter() - t0) * 1e3)
        except Exception as e:  # the pages go without this frame's thumbnail; the line is answered all the same
            out[VIEW] = (e, 0.0)
    return out


class DecodePool:
    """The decode workers of one service (module docstring). Thread-safe.

    Args:
        max_workers: A ceiling only: the workers in use follow the decode slots taken (at most
            ``limits.decode_concurrency`` of each runtime's gate).
    """

    def __init__(self, max_workers: int = 256) -> None:
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="decode")

    @contextmanager
    def inputs(
        self, gate: DecodeGate, header: Image.Image, want: Wanted, during: AbstractContextManager | None = None,
        view: View | None = None,
    ) -> Iterator[dict[str, Input]]:  # fmt: skip
        """Each role's input of the frame (and its `view`), made in a worker inside a slot of `gate`; for the body of
        the `with` the slot stays held only while an input is the full-size frame. `during` is entered once the slot is
        taken and left after the body (the large-frame lane yields to the line meanwhile). `LimitError` 503 when no
        slot frees up in time, 415 when the frame does not decode."""
        with ExitStack() as frame:
            slot = frame.enter_context(ExitStack())
            slot.enter_context(gate.hold())
            if during is not None:
                frame.enter_context(during)
            made = self._pool.submit(model_inputs, header, want, view).result()
            if not any(whole for _, whole in want.values()):
                slot.close()  # only model-sized inputs are left: the slot is free before inference
            yield made

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
