"""The frames this service served, so that feedback can only label a real answer.

Every answered frame gets a server-issued ``frame_id`` (a random 128-bit hex id); the camera's own id, if it sent
one, is kept beside it as ``client_frame_id`` and is unique only per camera. Feedback names the server id, or the
pair (camera_id, client_frame_id); anything else is refused. Two cameras that both call their frame "17" therefore
never share a label, and the logs join on the server id alone.

The index is bounded (`Limits.served_frames`, oldest forgotten first) and rebuilt from ``predictions.jsonl`` at
start, so feedback for frames served before a restart still joins. Thread-safe.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServedFrame:
    frame_id: str  # server-issued
    camera_id: str
    client_frame_id: str | None
    sha256: str | None = None  # of the bytes received: a label that brings the frame along must bring these
    predicted: str = ""  # the served class and version, the provenance of a frame kept only when labelled
    model_version: str = ""

    def record(self) -> dict[str, str | None]:
        """What a frame store keeps about it (`deploy.edge.frame_store.FrameStore.label`'s ``served``)."""
        return {"frame_id": self.frame_id, "camera_id": self.camera_id, "class": self.predicted or None,
                "model_version": self.model_version}  # fmt: skip


class ServedFrames:
    """Server frame id -> `ServedFrame`, and (camera, client frame id) -> the latest server id; bounded."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._by_id: OrderedDict[str, ServedFrame] = OrderedDict()
        self._by_client: dict[tuple[str, str], str] = {}

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def add(self, frame: ServedFrame) -> None:
        with self._lock:
            self._by_id[frame.frame_id] = frame
            self._by_id.move_to_end(frame.frame_id)
            if frame.client_frame_id is not None:
                self._by_client[(frame.camera_id, frame.client_frame_id)] = frame.frame_id
            while len(self._by_id) > self.capacity:
                _, old = self._by_id.popitem(last=False)
                key = (old.camera_id, old.client_frame_id)
                if old.client_frame_id is not None and self._by_client.get(key) == old.frame_id:
                    del self._by_client[key]

    def get(self, frame_id: str) -> ServedFrame | None:
        with self._lock:
            return self._by_id.get(frame_id)

    def by_client(self, camera_id: str, client_frame_id: str) -> ServedFrame | None:
        with self._lock:
            fid = self._by_client.get((camera_id, client_frame_id))
            return self._by_id.get(fid) if fid else None

    def load(self, pred_log: Path) -> int:
        """Index the served answers at the end of a predictions log (read from its last ~512 bytes x `capacity`, so a
        large log costs bounded time and memory at start); returns how many were indexed."""
        try:
            with open(pred_log, "rb") as f:
                f.seek(0, os.SEEK_END)
                start = max(0, f.tell() - 512 * self.capacity)
                f.seek(start)
                if start:
                    f.readline()  # a partial line
                lines = f.read().splitlines()
        except FileNotFoundError:
            return 0
        n = 0
        for raw in lines:
            try:
                r = json.loads(raw)
            except ValueError:  # a torn line after a crash
                continue
            if isinstance(r, dict) and r.get("served") and r.get("frame_id") and r.get("camera_id"):
                client = r.get("client_frame_id")
                self.add(ServedFrame(str(r["frame_id"]), str(r["camera_id"]), str(client) if client else None,
                                     r.get("sha256"), str(r.get("class") or ""), str(r.get("model_version") or "")))
                n += 1
        return min(n, self.capacity)

    def __len__(self) -> int:
        return len(self._by_id)
