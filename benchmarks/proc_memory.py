"""A service's memory as a load benchmark sees it, from /proc (Linux): VmRSS (resident now) and VmHWM (the kernel's
high-water mark since the process started) of a process and its descendants (the edge's large-frame worker),
summed, sampled over time with the machine's 1-minute load average.

The sampler shares the benchmark's cores, so it keeps its own cost small: one read of each process's status file
per sample for both values, and the descendants re-listed (a walk of every /proc/<id>/stat) once a second only, which
still finds a large-frame worker that was restarted after its OOM kill.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

KEYS = ("VmRSS", "VmHWM")


def status_kb(pid: int, keys: tuple[str, ...] = KEYS) -> dict[str, int]:
    """The ``kB`` lines `keys` of /proc/<pid>/status; 0 for each when the process is gone."""
    out = dict.fromkeys(keys, 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return out


def children(pid: int) -> list[int]:
    """The ids of `pid`'s descendants, from each /proc/<id>/stat's parent id."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, then ppid
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], list(parents.get(pid, []))
    while todo:
        out.append(child := todo.pop())
        todo += parents.get(child, [])
    return out


def tree_kb(pid: int, key: str) -> int:
    """`status_kb`'s `key` summed over `pid` and its descendants."""
    return sum(status_kb(p, (key,))[key] for p in [pid, *children(pid)])


@dataclass(frozen=True)
class Sample:
    """One look at the process tree: when (`time.perf_counter`), VmRSS and VmHWM summed (kB), 1-min load average."""

    t: float
    rss_kb: int
    hwm_kb: int
    load: float


class MemorySampler:
    """`Sample`s of process `pid` and its descendants every `every_s` seconds in a thread, for the body of a `with`.
    Summed high-water marks bound the tree's peak from above (each process's own peak may fall at another time)."""

    def __init__(self, pid: int, every_s: float = 0.02, rescan_s: float = 1.0) -> None:
        self.pid, self.every_s, self.rescan_s = pid, every_s, rescan_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids, scanned = [self.pid], float("-inf")
        while not self._stop.is_set():
            now = time.perf_counter()
            if now - scanned >= self.rescan_s:
                pids, scanned = [self.pid, *children(self.pid)], now
            seen = [status_kb(p) for p in pids]
            load = os.getloadavg()[0]
            self.samples.append(Sample(now, sum(s["VmRSS"] for s in seen), sum(s["VmHWM"] for s in seen), load))
            self._stop.wait(self.every_s)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> list[Sample]:
        """The samples taken in [t0, t1) (`time.perf_counter` seconds)."""
        return [s for s in self.samples if t0 <= s.t < t1]
