"""The edge's frame store: the frames worth a label, kept with their verdicts under a disk quota.

    store = FrameStore("frames/", FrameRule(low_margin=0.15, random_rate=0.02), quota_mb=500)
    store.offer(record, image_bytes)       -> list of reasons it was kept ([] = not kept)
    store.label(frame_id, "scratch", who)  -> the stored Frame, now labelled (an unkept frame still held is kept)
    store.review_queue()                   frames waiting for an operator, most doubtful first
    store.labelled_since(seq)              labelled frames after a cursor (what sync uploads)
    store.get(frame_id)                    -> (Frame, image bytes) or None

Selected (each switchable in `FrameRule`): a frame the operator corrected (label != served class), a low-margin
verdict (top-1 minus top-2 probability below ``low_margin``), a champion/challenger disagreement (shadow mode
or a pinned comparison), and a seeded random sample. A frame labelled after it was served (`FrameStore.label`) is
kept whatever the rule says, a confirmation as much as a correction (both are training data): from the recent
buffer, or from the bytes the caller still holds (its ``served``). The image bytes are stored as received, named by
their sha256 (the same bytes twice are one file); the index is one sqlite file. Over the quota, the oldest frames go
first: unlabelled ones, then labelled ones already uploaded; labelled frames not yet uploaded are never
dropped (the store refuses new frames instead, counted in ``stats()``).

A camera keeps at most ``camera_frames`` unlabelled frames per ``camera_window_s`` (a token bucket), or one noisy
camera (60 low-margin frames in 6 s) tops the review queue; a frame over it is only held ``recent`` (a label still
keeps it) and counted (``stats()``; ``count``: the service's ``frames_over_camera_quota``).

Torch-free (stdlib + sqlite): the service, sync and the operator UI share it. Thread-safe (one lock).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deploy.edge.limits import RateLimiter
from spt_core.portable.errors import SensituneError, one_line
from spt_core.portable.io import write_bytes

INDEX = "frames.db"
log = logging.getLogger("sensitune.frames")
REASONS = ("corrected", "confirmed", "low_margin", "disagreement", "random")


class FrameError(SensituneError):
    """A frame store call with a bad argument (unknown frame id, empty label)."""


@dataclass(frozen=True)
class FrameRule:
    """Which frames are kept. ``recent`` frames are held in memory so that a later correction can keep them."""

    corrected: bool = True
    low_margin: float = 0.15  # keep when top-1 - top-2 probability < this (0 = off)
    disagreement: bool = True
    random_rate: float = 0.01  # fraction of all frames kept at random (0 = off)
    seed: int = 0
    recent: int = 256  # frames (image bytes) remembered for a late operator correction
    # unlabelled frames kept per camera per window, bursts as large (0 = no limit): an operator labels a few frames
    # a minute, so a camera over 20 a minute is noise, not a dataset
    camera_frames: int = 20
    camera_window_s: float = 60.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> FrameRule:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise FrameError(f"frames: unknown key(s) {unknown}; use {[f.name for f in fields(cls)]}")
        rule = cls(**d)
        if rule.camera_frames > 0 and not rule.camera_window_s > 0:
            raise FrameError(f"frames: camera_window_s={rule.camera_window_s}; give seconds > 0 (or camera_frames: 0)")
        return rule


@dataclass
class Frame:
    """One kept frame and what is known about it. ``seq`` orders frames by when they were kept or labelled."""

    frame_id: str
    sha256: str
    camera_id: str
    ts: str
    line: str = ""
    model_version: str = ""
    role: str = ""
    predicted: str = ""  # the served class
    score: float | None = None
    margin: float | None = None
    other: str | None = None  # the other arm's class (shadow), when known
    reasons: list[str] = field(default_factory=list)
    label: str | None = None
    labelled_by: str | None = None
    labelled_at: str | None = None
    uploaded_at: str | None = None
    size: int = 0
    suffix: str = ".png"
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = [f.name for f in fields(Frame)]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _suffix(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    return ".bmp" if data[:2] == b"BM" else ".img"


def margin_of(probs: list[float] | None) -> float | None:
    """Top-1 minus top-2 probability (None without at least two)."""
    if not probs or len(probs) < 2:
        return None
    a, b = sorted(probs, reverse=True)[:2]
    return float(a - b)


class FrameStore:
    """Frames + verdicts on disk: ``root/images/<sha[:2]>/<sha><suffix>`` and ``root/frames.db``.

    Args:
        root: The store's directory (created).
        rule: What is kept (`FrameRule`).
        quota_mb: Disk quota for the image files.
        count: Called with ``"frames_over_camera_quota"`` per frame a camera's quota held back (``metrics.count``).
        clock: Monotonic seconds for the per-camera windows.
    """

    def __init__(self, root: str | Path, rule: FrameRule | None = None, quota_mb: float = 500.0,
                 count: Callable[[str], None] = lambda _: None, clock: Callable[[], float] = time.monotonic,
                 ) -> None:  # fmt: skip
        self.root, self.rule = Path(root), rule or FrameRule()
        self._count, self._per_camera, self.over_camera_quota = count, RateLimiter(clock=clock), 0
        self.quota_bytes = int(quota_mb * 1e6)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._rng = random.Random(self.rule.seed)
        self._recent: OrderedDict[str, tuple[dict[str, Any], bytes]] = OrderedDict()
        self.refused = 0
        self._db = sqlite3.connect(str(self.root / INDEX), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        types = {"score": "REAL", "margin": "REAL", "size": "INTEGER", "seq": "INTEGER"}
        cols = ", ".join(f"{c} {types.get(c, 'TEXT')}" for c in _COLUMNS if c != "frame_id")
        self._db.execute(f"CREATE TABLE IF NOT EXISTS frames (frame_id TEXT PRIMARY KEY, {cols})")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER)")

    # ------------------------------------------------------------------------------------------------ writes
    def offer(self, record: dict[str, Any], image: bytes) -> list[str]:
        """Consider one served frame; returns the reasons it was kept ([] when not).

        Args:
            record: ``frame_id``, ``camera_id`` and, as known, ``line``, ``model_version``, ``role``, ``class``
                (served), ``score``, ``probs`` (all classes) or ``margin``, ``other`` (the other arm's class),
                ``label`` (an operator's label given with the frame).
            image: The frame's bytes as received.
        """
        rec = dict(record)
        if not rec.get("frame_id") or not rec.get("camera_id"):
            raise FrameError("offer: the record needs frame_id and camera_id")
        margin = rec.get("margin", margin_of(rec.get("probs")))
        reasons = []
        r = self.rule
        if r.corrected and rec.get("label") is not None and rec["label"] != rec.get("class"):
            reasons.append("corrected")
        if r.low_margin > 0 and margin is not None and margin < r.low_margin:
            reasons.append("low_margin")
        if r.disagreement and rec.get("other") is not None and rec["other"] != rec.get("class"):
            reasons.append("disagreement")
        with self._lock:
            if r.random_rate > 0 and self._rng.random() < r.random_rate:
                reasons.append("random")
            quota = r.camera_frames > 0 and rec.get("label") is None  # a labelled frame is never held back
            if reasons and quota and self._per_camera.spend(rec["camera_id"], r.camera_frames, r.camera_window_s):
                self.over_camera_quota, reasons = self.over_camera_quota + 1, []
                self._count("frames_over_camera_quota")
            if not reasons:
                if r.recent > 0:  # a later correction may still keep it
                    self._recent[rec["frame_id"]] = (rec, image)
                    while len(self._recent) > r.recent:
                        self._recent.popitem(last=False)
                return []
            return reasons if self._keep(rec, image, reasons, margin) else []

    def offer_other(self, frame_id: str, other: str) -> list[str]:
        """The other arm's class for a frame already offered (shadow mode): kept on a disagreement."""
        with self._lock:
            frame = self._row(frame_id)
            if frame is not None:
                frame.other = other
                if other != frame.predicted and self.rule.disagreement and "disagreement" not in frame.reasons:
                    frame.reasons = [*frame.reasons, "disagreement"]
                self._put(frame)
                return frame.reasons
            recent = self._recent.get(frame_id)
        if recent is None:
            return []
        with self._lock:
            self._recent.pop(frame_id, None)
        return self.offer({**recent[0], "other": other}, recent[1]) if other != recent[0].get("class") else []

    def label(
        self, frame_id: str, label: str, who: str = "operator", served: tuple[dict[str, Any], bytes] | None = None
    ) -> Frame | None:
        """Attach an operator's label; a frame not stored yet is kept now, confirmed or corrected alike.

        Args:
            served: The served record (as for `offer`) and the frame's bytes, for a frame that is neither stored nor
                in the recent buffer any more (the caller still holds it, or the labeller sent it).

        Returns:
            The labelled `Frame`, or None when its bytes are nowhere (neither stored, recent nor ``served``) or the
            quota has no room for them.
        """
        if not label:
            raise FrameError(f"label for frame {frame_id!r}: give a non-empty class name")
        with self._lock:
            if self._row(frame_id) is None:
                held = self._recent.pop(frame_id, None) or served
                if held is None:
                    return None
                rec, image = held
                reason = "confirmed" if rec.get("class") == label else "corrected"
                if not self._keep({**rec, "frame_id": frame_id, "label": label}, image, [reason],
                                  rec.get("margin", margin_of(rec.get("probs")))):  # fmt: skip
                    return None
            frame = self._row(frame_id)
            assert frame is not None
            frame.label, frame.labelled_by, frame.labelled_at = label, who, _now()
            if frame.predicted and label != frame.predicted and "corrected" not in frame.reasons:
                frame.reasons = [*frame.reasons, "corrected"]
            frame.uploaded_at, frame.seq = None, self._next_seq()  # a relabel is uploaded again
            self._put(frame)
            return frame

    def mark_uploaded(self, frame_ids: list[str]) -> None:
        """Record that these labelled frames reached the training side (their files may now be evicted)."""
        with self._lock:
            ts = _now()
            for fid in frame_ids:
                self._db.execute("UPDATE frames SET uploaded_at=? WHERE frame_id=?", (ts, fid))

    # ------------------------------------------------------------------------------------------------- reads
    def get(self, frame_id: str) -> tuple[Frame, bytes] | None:
        """The frame and its image bytes, or None when not stored."""
        with self._lock:
            frame = self._row(frame_id)
        if frame is None:
            return None
        return frame, self.image_path(frame).read_bytes()

    def image_path(self, frame: Frame) -> Path:
        return self.root / "images" / frame.sha256[:2] / f"{frame.sha256}{frame.suffix}"

    def review_queue(self, limit: int = 50, camera_id: str | None = None) -> list[Frame]:
        """Unlabelled frames, most doubtful first (smallest margin, then newest)."""
        sql = "SELECT * FROM frames WHERE label IS NULL" + (" AND camera_id=?" if camera_id else "")
        sql += " ORDER BY COALESCE(margin, 1e9), seq DESC LIMIT ?"
        return self._query(sql, ((camera_id,) if camera_id else ()) + (int(limit),))

    def labelled_since(self, seq: int = 0, limit: int = 1000, not_uploaded: bool = False) -> list[Frame]:
        """Labelled frames with ``seq > seq``, oldest first (pass the last one's seq as the next cursor)."""
        sql = "SELECT * FROM frames WHERE label IS NOT NULL AND seq > ?"
        sql += " AND uploaded_at IS NULL" if not_uploaded else ""
        return self._query(sql + " ORDER BY seq LIMIT ?", (int(seq), int(limit)))

    def unlabelled(self, limit: int = 1000) -> list[Frame]:
        return self._query("SELECT * FROM frames WHERE label IS NULL AND uploaded_at IS NULL ORDER BY seq LIMIT ?",
                           (int(limit),))  # fmt: skip

    def stats(self) -> dict[str, Any]:
        with self._lock:
            n, labelled, size = self._db.execute(
                "SELECT COUNT(*), COUNT(label), COALESCE(SUM(size), 0) FROM frames"
            ).fetchone()
        return {"frames": n, "labelled": labelled, "bytes": size, "quota_bytes": self.quota_bytes,
                "refused": self.refused, "over_camera_quota": self.over_camera_quota}  # fmt: skip

    def close(self) -> None:
        self._db.close()

    # -------------------------------------------------------------------------------------------- internals
    def _keep(self, rec: dict[str, Any], image: bytes, reasons: list[str], margin: float | None) -> bool:
        """Store one frame (caller holds the lock); False when the quota cannot make room."""
        if self._row(rec["frame_id"]) is not None:
            return True
        sha = hashlib.sha256(image).hexdigest()
        frame = Frame(
            frame_id=str(rec["frame_id"]), sha256=sha, camera_id=str(rec["camera_id"]), ts=rec.get("ts") or _now(),
            line=str(rec.get("line") or ""), model_version=str(rec.get("model_version") or ""),
            role=str(rec.get("role") or ""), predicted=str(rec.get("class") or ""), score=rec.get("score"),
            margin=margin, other=rec.get("other"), reasons=reasons, size=len(image), suffix=_suffix(image),
        )  # fmt: skip
        if rec.get("label") is not None:  # labelled with the frame (e.g. by the reject station)
            frame.label, frame.labelled_by, frame.labelled_at = str(rec["label"]), rec.get("labelled_by"), _now()
        if not self._make_room(len(image)):
            self.refused += 1
            return False
        path = self.image_path(frame)
        if not path.exists():
            write_bytes(path, image)
        frame.seq = self._next_seq()
        self._put(frame)
        return True

    def _make_room(self, need: int) -> bool:
        used = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM frames").fetchone()[0]
        if used + need <= self.quota_bytes:
            return True
        victims = self._query_locked(
            "SELECT * FROM frames WHERE label IS NULL OR uploaded_at IS NOT NULL "
            "ORDER BY (label IS NOT NULL), seq LIMIT 10000",
            (),
        )
        for v in victims:
            if used + need <= self.quota_bytes:
                break
            self._db.execute("DELETE FROM frames WHERE frame_id=?", (v.frame_id,))
            if not self._db.execute("SELECT 1 FROM frames WHERE sha256=?", (v.sha256,)).fetchone():
                self.image_path(v).unlink(missing_ok=True)
            used -= v.size
        return used + need <= self.quota_bytes

    def _next_seq(self) -> int:
        row = self._db.execute("SELECT v FROM meta WHERE k='seq'").fetchone()
        seq = (row[0] if row else 0) + 1
        self._db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('seq', ?)", (seq,))
        return seq

    def _put(self, frame: Frame) -> None:
        d = frame.to_dict()
        d["reasons"] = json.dumps(d["reasons"])
        marks = ", ".join("?" for _ in _COLUMNS)
        self._db.execute(f"INSERT OR REPLACE INTO frames ({', '.join(_COLUMNS)}) VALUES ({marks})",
                         [d[c] for c in _COLUMNS])  # fmt: skip

    def _row(self, frame_id: str) -> Frame | None:
        rows = self._query_locked("SELECT * FROM frames WHERE frame_id=?", (frame_id,))
        return rows[0] if rows else None

    def _query(self, sql: str, args: tuple) -> list[Frame]:
        with self._lock:
            return self._query_locked(sql, args)

    def _query_locked(self, sql: str, args: tuple) -> list[Frame]:
        cur = self._db.execute(sql, args)
        names = [c[0] for c in cur.description]
        out = []
        for row in cur.fetchall():
            d = dict(zip(names, row))
            d["reasons"] = json.loads(d["reasons"] or "[]")
            for k in ("score", "margin"):
                d[k] = None if d[k] is None else float(d[k])
            d["size"], d["seq"] = int(d["size"]), int(d["seq"])
            out.append(Frame(**d))
        return out


class GuardedFrames:
    """The frame store as the service calls it: a full disk or a broken index never fails a prediction."""

    def __init__(self, store: FrameStore) -> None:
        self.store, self.errors = store, 0

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.store, name)

        def guarded(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except Exception as e:
                self.errors += 1
                log.error("frame store %s: %s", name, one_line(e))
                return None

        return guarded
