"""The rollout's append-only JSON-lines logs (predictions, feedback, decisions) and their reader."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deploy.edge.rollout.manifest import RolloutError


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class JsonlLog:
    """Append-only JSON-lines file; one write() per record so concurrent writers never interleave a line.

    Records reach the OS on every append; fsync runs every `fsync_every` records or `fsync_interval_s` seconds,
    whichever comes first (group commit: a power cut loses at most that much, a process crash nothing).
    """

    def __init__(self, path: Path, fsync_every: int = 1, fsync_interval_s: float = 0.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._every, self._interval = max(1, fsync_every), fsync_interval_s
        self._pending, self._last_sync = 0, time.monotonic()
        size = os.fstat(self._fd).st_size
        if size:  # a crash may have torn the last line: end it so the next record starts clean
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise RolloutError(f"{self.path}: log already closed")
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self._pending += 1
            now = time.monotonic()
            if self._pending >= self._every or now - self._last_sync >= self._interval:
                os.fsync(self._fd)
                self._pending, self._last_sync = 0, now

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None


class JsonlReader:
    """The records of a JSONL file one at a time (memory bounded by one line), from byte `offset` on; after the loop
    ``records`` and ``skipped`` count the readable records and the unreadable lines (a torn line after a crash), and
    ``offset`` is where the next pass starts. With `whole_lines` a last line without its newline (a record still
    being written) is left for the next pass; without, it is read (and counted skipped if torn)."""

    def __init__(self, path: Path, offset: int = 0, whole_lines: bool = False) -> None:
        self.path, self.records, self.skipped = Path(path), 0, 0
        self.offset, self.whole_lines = offset, whole_lines

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.records = self.skipped = 0  # a pass counts its own lines: the next one goes on from `offset`
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            for raw in f:
                if self.whole_lines and not raw.endswith(b"\n"):
                    break
                self.offset += len(raw)
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError:
                    self.skipped += 1
                    continue
                if isinstance(rec, dict):
                    self.records += 1
                    yield rec
                else:
                    self.skipped += 1


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """All records of a JSONL file and the number of unreadable lines skipped (a torn tail after a crash); for a
    log that grows without bound (predictions), iterate a `JsonlReader` instead."""
    reader = JsonlReader(path)
    return list(reader), reader.skipped
