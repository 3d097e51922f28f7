"""What the rollout report costs a box as its predictions log grows: a fold from the first line (every call before)
against the kept fold (`deploy.edge.rollout.fold`: each call reads only the lines appended since).

A synthetic log in the box's own record format: `--frames` frames from 4 cameras, each the champion's served answer
and, on 70 % of them, the challenger's shadow answer; 2 % labelled within 100 frames. Then one minute of a busy line
(4 cameras x 10 frames/s) is appended, and the two ways of reporting are timed side by side, in one process, one
after the other: a fresh fold of the whole log, and the kept fold's update. Last, a label for a frame older than the
kept fold's window (a late label: the kept fold reads the logs again from the first line). Seconds are wall time on
this box (the load is recorded beside them); the held memory is tracemalloc's, in a separate pass.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
      .venv/bin/python -m benchmarks.rollout_report --frames 400000 --out benchmarks/results/rollout_report.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchmarks.protocol import cpu_info, script
from deploy.edge.rollout import fold, stats
from spt_core.portable.io import atomic_path

MINUTE = 4 * 10 * 60  # frames a busy line adds in a minute
VERSIONS = {"champion_version": "1", "challenger_version": "2"}


def write_frames(preds: Path, feedback: Path, start: int, n: int, rng: random.Random) -> None:
    """Frames start..start+n-1 appended to both logs (JsonlLog's compact separators)."""
    with open(preds, "a") as p, open(feedback, "a") as f:
        for i in range(start, start + n):
            base = {"ts": "2026-12-06T10:00:00.000+00:00", "frame_id": f"{rng.getrandbits(128):032x}",
                    "camera_id": f"cam{i % 4}", "latency_ms": round(8 + rng.random() * 6, 3)}  # fmt: skip
            cls = "ok" if rng.random() < 0.9 else "scratch"
            p.write(json.dumps({**base, "role": "champion", "model_version": "1", "class": cls, "decision": cls,
                                "p_good": 0.97, "served": True}, separators=(",", ":")) + "\n")  # fmt: skip
            if rng.random() < 0.7:
                p.write(json.dumps({**base, "role": "challenger", "model_version": "2", "class": cls, "served": False,
                                    "shadow": True}, separators=(",", ":")) + "\n")  # fmt: skip
            if rng.random() < 0.02:
                f.write(json.dumps({"camera_id": base["camera_id"], "frame_id": base["frame_id"], "label": cls}) + "\n")


def timed(call) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def held_mb(call) -> float:
    tracemalloc.start()
    kept = call()  # noqa: F841  (held while measured)
    cur = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return cur / 2**20


def measure(frames: int, work: Path) -> list[tuple[str, float, str]]:
    rng = random.Random(0)
    preds, feedback = work / "predictions.jsonl", work / "feedback.jsonl"
    write_frames(preds, feedback, 0, frames, rng)
    rows = [("log", preds.stat().st_size / 2**20, "MB of predictions")]
    t, _ = timed(lambda: stats.compare(preds, feedback, keep=True, **VERSIONS))
    rows.append(("first report, kept fold (reads the whole log)", t, "s"))
    write_frames(preds, feedback, frames, MINUTE, rng)
    t_full, full = timed(lambda: stats.compare(preds, feedback, **VERSIONS))
    t_kept, kept = timed(lambda: stats.compare(preds, feedback, keep=True, **VERSIONS))
    if full != kept:
        raise AssertionError("the kept fold's report differs from a fold of the whole log")
    rows += [(f"report after one more minute ({MINUTE:,} frames): fold of the whole log", t_full, "s"),
             ("the same: kept fold's update", t_kept, "s"), ("ratio", t_full / t_kept, "x")]  # fmt: skip
    first = json.loads(preds.open().readline())  # the oldest frame: long out of the window
    with open(feedback, "a") as f:
        f.write(json.dumps({"camera_id": first["camera_id"], "frame_id": first["frame_id"], "label": "ok"}) + "\n")
    t_late, _ = timed(lambda: stats.compare(preds, feedback, keep=True, **VERSIONS))
    rows.append(("a late label (kept fold reads again from the first line)", t_late, "s"))
    rows.append(("held: a fold of the whole log (one-off)",
                 held_mb(lambda: fold.LogFold(preds, feedback, {"champion": "1", "challenger": "2"}, window=0)), "MB"))
    rows.append(("held: a kept fold", held_mb(lambda: fold.LogFold(preds, feedback, {"champion": "1",
                                                                                     "challenger": "2"})), "MB"))
    return rows


def markdown(rows: list[tuple[str, float, str]], frames: int, load: tuple[float, float], command: str) -> str:
    lines = ["# The rollout report's cost as the predictions log grows", "", f"Command: `{command}`", "",
             f"Date {dt.date.today()}, {cpu_info()[0]}, {os.cpu_count()} cores, load average {load[0]:.2f} at start, "
             f"{load[1]:.2f} at end; {frames:,} frames before the extra minute; `LABEL_WINDOW` "
             f"{fold.LABEL_WINDOW:,} frames.", "", "| what | value | unit |", "|---|---:|---|"]  # fmt: skip
    lines += [f"| {what} | {v:,.2f} | {unit} |" for what, v, unit in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=400_000)
    ap.add_argument("--out", type=Path, help="write the table here (default: print it)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        rows = measure(args.frames, Path(work))
    text = markdown(rows, args.frames, (load0, os.getloadavg()[0]),
                    "python -m benchmarks.rollout_report " + " ".join(argv))  # fmt: skip
    if args.out is None:
        print(text, end="")
        return None
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(text)
    return args.out


if __name__ == "__main__":
    script(main)
