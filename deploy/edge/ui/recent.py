"""The last frames per camera, for the line view: a small ring of thumbnails and the class counts of the last hour.

Memory is bounded by construction: ``per_camera`` thumbnails (JPEG, longest side ``thumb_px``, a few KB each) for
at most ``max_cameras`` cameras (the camera seen least recently is forgotten first), and per camera one class
counter per minute for the last 60 minutes. The default 8 x 256 cameras x ~5 KB is about 10 MB at most.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from deploy.edge.decoding import View, view_image
from spt_core.portable.operating_point import REJECT, OperatingPoint

HOUR_S = 3600


@dataclass
class Shot:
    """One served frame as the line view shows it."""

    frame_id: str
    camera_id: str
    ts: float  # unix seconds
    role: str
    version: str
    cls: str
    score: float
    p_good: float | None  # P(ok class): from the answer, or the score when the served class is the good class
    rejected: bool  # the served decision took the part off the line (`OperatingPoint.decision_of`)
    thumb: bytes  # JPEG
    label: str | None = None  # set when an operator labels it through the UI


@dataclass
class _Camera:
    shots: deque[Shot]
    minutes: dict[int, Counter[str]] = field(default_factory=dict)  # unix minute -> class counts
    rejects: Counter[int] = field(default_factory=Counter)  # unix minute -> parts rejected


def jpeg(image: Image.Image, quality: int = 60) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def thumbnail(data: bytes, px: int, quality: int = 60, bit_depth: int | None = None) -> bytes:
    """A frame's bytes -> a JPEG of at most ``px`` on its longest side, as `deploy.edge.decoding.view_image` makes it
    (``draft`` lets a large JPEG decode at a fraction of the cost): a frame the box kept, decoded again for the Review
    page. An answered frame's thumbnail comes from its one decode instead (`RecentFrames.add`)."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (px, px))
        return jpeg(view_image(im, View(px, bit_depth)), quality)


def p_good_of(body: dict[str, Any], ok_class: str | None) -> float | None:
    """P(good) from a /predict answer: its ``p_good`` when the service gives one, else the score of a good verdict.

    A defect verdict without ``p_good`` leaves it unknown (it is at most 1 - score); the view says so."""
    if body.get("p_good") is not None:
        return float(body["p_good"])
    return float(body["score"]) if body.get("class") == ok_class else None


class RecentFrames:
    """Thread-safe ring of the last frames per camera (see the module docstring)."""

    def __init__(self, per_camera: int = 8, max_cameras: int = 256, thumb_px: int = 96) -> None:
        self.per_camera, self.max_cameras, self.thumb_px = per_camera, max_cameras, thumb_px
        self._lock = threading.Lock()
        self._cams: OrderedDict[str, _Camera] = OrderedDict()
        self._by_id: dict[str, Shot] = {}

    def add(self, view: Image.Image, body: dict[str, Any], op: OperatingPoint, now: float | None = None) -> Shot:
        """Record one answered frame (``body`` is the /predict answer) with its decision at the champion's operating
        point ``op`` (`deploy.edge.ui.views.operating_point`); `view` is its thumbnail as its decode made it
        (`deploy.edge.decoding.view_image` at ``thumb_px``), kept as a JPEG."""
        thumb = jpeg(view)
        now = time.time() if now is None else now
        shot = Shot(
            frame_id=str(body["frame_id"]),
            camera_id=str(body["camera_id"]),
            ts=now,
            role=str(body.get("role", "")),
            version=str(body.get("model_version", "")),
            cls=str(body.get("class", "")),
            score=float(body.get("score", 0.0)),
            p_good=p_good_of(body, op.ok_class),
            rejected=op.decision_of(body) == REJECT,
            thumb=thumb,
        )
        minute = int(now // 60)
        with self._lock:
            cam = self._cams.get(shot.camera_id)
            if cam is None:
                cam = self._cams[shot.camera_id] = _Camera(deque(maxlen=self.per_camera))
                while len(self._cams) > self.max_cameras:
                    _, old = self._cams.popitem(last=False)
                    for s in old.shots:
                        self._by_id.pop(s.frame_id, None)
            self._cams.move_to_end(shot.camera_id)
            if len(cam.shots) == cam.shots.maxlen:
                self._by_id.pop(cam.shots[0].frame_id, None)
            cam.shots.append(shot)
            self._by_id[shot.frame_id] = shot
            cam.minutes.setdefault(minute, Counter())[shot.cls] += 1
            cam.rejects[minute] += shot.rejected
            for m in [m for m in cam.minutes if m <= minute - 60]:
                del cam.minutes[m]
                cam.rejects.pop(m, None)
        return shot

    def get(self, frame_id: str) -> Shot | None:
        with self._lock:
            return self._by_id.get(frame_id)

    def mark_labelled(self, frame_id: str, label: str) -> None:
        with self._lock:
            if frame_id in self._by_id:
                self._by_id[frame_id].label = label

    def cameras(self, now: float | None = None) -> dict[str, tuple[list[Shot], Counter[str], int]]:
        """camera -> (its shots, newest first; its class counts and its parts rejected over the last hour)."""
        now = time.time() if now is None else now
        first = int((now - HOUR_S) // 60) + 1
        with self._lock:
            out = {}
            for cid, cam in self._cams.items():
                counts: Counter[str] = Counter()
                for m, c in cam.minutes.items():
                    if m >= first:
                        counts.update(c)
                rejected = sum(n for m, n in cam.rejects.items() if m >= first)
                out[cid] = (list(reversed(cam.shots)), counts, rejected)
            return out
