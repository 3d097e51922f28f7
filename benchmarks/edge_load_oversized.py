"""The edge service under the 2026-12 probes (issues 15 and 29): `benchmarks/edge_load.py --scenario oversized`.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        .venv/bin/python benchmarks/edge_load.py --scenario oversized --rate 20 --seconds 60 --every 3 --size 64 \\
        --rounds 3 --block-s 10

One service (with tokens, as on the line) and one open-loop schedule of normal frames at ``--rate`` req/s for the
whole run, cut into blocks of ``--block-s`` seconds that alternate clean and mixed (the same frames plus the probes:
a 25 MP 8-bit RGB PNG and a 4999 x 4999 16-bit PNG, both within the default limits and so decoded, and a 144 Mpx PNG,
refused from its header). Side by side at a grain of seconds, the machine's own drift falls on both phases alike:
when whole clean and mixed minutes alternated, the clean p99 alone moved 19.7-24.1 ms from minute to minute.

A round is ``--seconds`` of clean blocks and as many of mixed ones (60 s at 10 s: 6 + 6 blocks, alternating, clean
first). Each round's mixed blocks get one probe per ``--every`` s of their time, spread evenly over them, the three
kinds in turn, none in a mixed block's last second (`PROBE_TAIL_S`: its answer lands in its own block; a probe that
still ends late is counted). A warm-up pair of blocks (clean, then mixed with one probe of each kind) comes first and
is not counted. Per round and pooled over the rounds: the normal frames' p50/p90/p99 clean and mixed, the p99 ratio,
the service's own time, the probes' answers, peak VmRSS per phase and VmHWM (`benchmarks.proc_memory`). Writes
``--out`` (results/edge_load_oversized.md) atomically with the command, machine, load average at the start and date.
Exit 1 unless the pooled mixed p99 <= 1.5 x clean, no normal frame failed, the service is alive, and its VmHWM at the
end is within the warm-up clean block's + the limits' worst case (``decode_concurrency x (max_decoded_bytes +
max_pixels)``). Wall time: 2 x rounds x seconds + 2 x block_s, plus about a minute to build the artifacts.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from benchmarks.edge_box import CAMERAS, build_lite0, demo_frames, start_service
from benchmarks.edge_load_oversized_table import write_table
from benchmarks.load_clients import Planned, Sent, open_loop
from benchmarks.proc_memory import MemorySampler, Sample, tree_kb

PROBE_CAMERA = "cam-probe"  # the probes' camera id: their own answers are kept out of the normal frames' percentiles
PROBE_TAIL_S = 1.0  # no probe starts in a mixed block's last second: its ~0.4-0.7 s answer stays in that block
WARMUP = -1  # the warm-up pair's round number
LEAD_S = 0.5  # the schedule starts this long after it is handed to the clients
Probe = tuple[str, bytes]  # (what it is, the PNG bytes)


@dataclass(frozen=True)
class Block:
    """A stretch of the run: its round (`WARMUP` for the warm-up pair), phase (clean or mixed) and seconds."""

    round: int
    phase: str
    start_s: float
    end_s: float


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def probes() -> list[Probe]:
    """The 2026-12 probes: smooth ramps (a few hundred KB on the wire, under ``max_body_bytes``) whose decode costs
    what their size says. 5000 x 5000 RGB decodes to exactly ``max_decoded_bytes`` (4 bytes a pixel in Pillow)."""
    from PIL import Image

    ramp = (np.arange(5000) % 256).astype(np.uint8)
    rgb = Image.fromarray(np.repeat(np.broadcast_to(ramp, (5000, 5000))[..., None], 3, axis=2))
    deep = Image.fromarray(np.repeat((np.arange(4999, dtype=np.uint16) * 13)[None, :], 4999, axis=0))  # I;16
    return [("25 MP 8-bit RGB PNG, 5000 x 5000", _png(rgb)), ("16-bit PNG, 4999 x 4999", _png(deep)),
            ("144 Mpx PNG, 12000 x 12000", _png(Image.new("L", (12000, 12000), 0)))]  # fmt: skip


def layout(rounds: int, seconds: float, block_s: float) -> list[Block]:
    """The warm-up pair, then per round ``seconds / block_s`` (rounded, at least 1) clean and as many mixed blocks,
    alternating, back to back from 0 s."""
    if not 0 < block_s <= seconds or rounds < 1:
        raise SystemExit(f"--block-s={block_s:g} --seconds={seconds:g} --rounds={rounds}: give 0 < block-s <= seconds "
                         "and rounds >= 1, e.g. --block-s 10 --seconds 60")  # fmt: skip
    per_phase = max(1, round(seconds / block_s))
    kinds = [(WARMUP, "clean"), (WARMUP, "mixed")]
    kinds += [(r, phase) for r in range(rounds) for _ in range(per_phase) for phase in ("clean", "mixed")]
    return [Block(r, phase, i * block_s, (i + 1) * block_s) for i, (r, phase) in enumerate(kinds)]


def probe_times(blocks: list[Block], every: float, kinds: int) -> list[tuple[float, int]]:
    """(seconds, probe kind) of every probe: per round ``round(mixed seconds / every)`` (the warm-up: one of each
    kind), block j of a round's m mixed blocks taking ``floor((j+1)P/m) - floor(jP/m)`` of its P, evenly spaced in
    the block less `PROBE_TAIL_S`; the kinds in turn over the whole run, so each round has them all at the rate."""
    out: list[tuple[float, int]] = []
    k = 0
    for r in sorted({b.round for b in blocks}):
        mixed = [b for b in blocks if b.round == r and b.phase == "mixed"]
        total = kinds if r == WARMUP else max(1, round(sum(b.end_s - b.start_s for b in mixed) / every))
        for j, b in enumerate(mixed):
            n = (j + 1) * total // len(mixed) - j * total // len(mixed)
            span = b.end_s - b.start_s
            window = span - min(PROBE_TAIL_S, span / 4)
            for q in range(n):
                out.append((b.start_s + (q + 0.5) * window / n, k % kinds))
                k += 1
    return out


def plan(blocks: list[Block], rate: float, every: float, frames: list[bytes], mix: list[Probe]) -> list[Planned]:
    """The run's open-loop schedule: normal frames at `rate`/s over all blocks (12 camera ids in turn, frame ids
    ``n<i>``), and the probes (`probe_times`, camera `PROBE_CAMERA`, frame ids ``p<k>``, tagged with their kind)."""
    n = int(blocks[-1].end_s * rate)
    out = [Planned(i / rate, CAMERAS[i % len(CAMERAS)], frames[i % len(frames)], f"n{i}") for i in range(n)]
    out += [Planned(at, PROBE_CAMERA, mix[kind][1], f"p{k}", mix[kind][0])
            for k, (at, kind) in enumerate(probe_times(blocks, every, len(mix)))]  # fmt: skip
    return sorted(out, key=lambda p: p.at_s)


def block_index(blocks: list[Block], at_s: float) -> int:
    """The index of the block a request scheduled at `at_s` belongs to."""
    return max(0, bisect.bisect_right([b.start_s for b in blocks], at_s) - 1)


def _pct(values: list[float], qs: list[int]) -> list[float]:
    return [float(v) for v in np.percentile(values, qs)] if values else [float("nan")] * len(qs)


def phase_stats(sent: list[Sent], server_ms: list[float], samples: list[Sample]) -> dict[str, Any]:
    """One phase of a round (or of all rounds) as one sample: the normal frames' percentiles (of the pool, not a
    mean of per-block percentiles), the service's own times, errors, and the peak VmRSS sampled during it."""
    ms = [s.ms for s in sent if s.ok]
    errors = [s.why for s in sent if not s.ok]
    p50, p90, p99 = _pct(ms, [50, 90, 99])
    s50, s99 = _pct(server_ms, [50, 99])
    return {"ok": len(ms), "errors": len(errors), "error_kinds": sorted(set(errors)), "p50": p50, "p90": p90,
            "p99": p99, "server_p50": s50, "server_p99": s99,
            "rss_mb": max((s.rss_kb for s in samples), default=0) / 1024}  # fmt: skip


def summarize(blocks: list[Block], sent: list[Sent], server: list[tuple[float, float]], samples: list[Sample],
              t0: float) -> list[dict[str, Any]]:  # fmt: skip
    """One row per round and one pooled over the rounds (the warm-up pair left out): each phase's `phase_stats`, the
    p99 ratio, the probes sent in its mixed blocks (with those answered after their block ended: ``late``), VmHWM
    and load average at its end. `server`: (scheduled s, ms) of the served normal frames; `t0`: the run's 0 s."""
    of = lambda at: block_index(blocks, at)  # noqa: E731
    normal = [(of(s.at_s), s) for s in sent if s.camera_id != PROBE_CAMERA]
    probe = [(of(s.at_s), s) for s in sent if s.camera_id == PROBE_CAMERA]
    timed = [(of(at), ms) for at, ms in server]
    sampled = [(of(s.t - t0), s) for s in samples if t0 + blocks[0].start_s <= s.t < t0 + blocks[-1].end_s]
    rounds = sorted({b.round for b in blocks} - {WARMUP})
    rows = []
    for name, keep in [(f"round {r + 1}", {r}) for r in rounds] + [("pooled", set(rounds))]:
        row: dict[str, Any] = {"name": name}
        of_phase = {
            p: {i for i, b in enumerate(blocks) if b.round in keep and b.phase == p} for p in ("clean", "mixed")
        }
        for phase, idx in of_phase.items():
            row[phase] = phase_stats([s for i, s in normal if i in idx], [ms for i, ms in timed if i in idx],
                                     [s for i, s in sampled if i in idx])  # fmt: skip
            row[phase]["blocks"] = len(idx)
        row["probes"] = [s for i, s in probe if i in of_phase["mixed"]]
        row["late"] = sum(s.at_s + s.ms / 1e3 > blocks[i].end_s for i, s in probe if i in of_phase["mixed"])
        row["ratio"] = row["mixed"]["p99"] / row["clean"]["p99"]
        end = t0 + max(b.end_s for b in blocks if b.round in keep)
        before = [s for s in samples if s.t < end]
        row["hwm_mb"] = max((s.hwm_kb for s in before), default=0) / 1024
        row["load"] = before[-1].load if before else float("nan")
        rows.append(row)
    return rows


def server_times(log: Path, at_of: dict[str, float]) -> list[tuple[float, float]]:
    """(scheduled s, ``request_ms``) of each served normal frame of the schedule in the service's predictions log,
    matched by the frame id the client sent (`at_of`: frame id -> scheduled s)."""
    out = []
    for line in log.read_bytes().splitlines():
        r = json.loads(line)
        at = at_of.get(r.get("client_frame_id") or "")
        if at is not None and r.get("served") and "request_ms" in r and r.get("camera_id") != PROBE_CAMERA:
            out.append((at, float(r["request_ms"])))
    return out


def _start(work: Path, arts: dict[str, Path]) -> tuple[Any, str, dict[str, str]]:
    """The service with a camera token, champion v1 + challenger v2 at share 0.25; (process, base URL, headers)."""
    token = "load-test-camera-token"
    digest = hashlib.sha256(token.encode()).hexdigest()
    (work / "tokens.yaml").write_text(
        yaml.safe_dump({"tokens": [{"name": "cams", "role": "camera", "sha256": digest}]})
    )
    cfg = work / "rollout.yaml"
    ref = lambda v: {"version": v, "path": str(arts[v])}  # noqa: E731
    cfg.write_text(yaml.safe_dump({"line": "bench", "champion": ref("1"), "challenger": ref("2"),
                                   "challenger_share": 0.25, "log_dir": "logs"}))  # fmt: skip
    proc, base = start_service(cfg, "--tokens", str(work / "tokens.yaml"))
    return proc, base, {"Authorization": f"Bearer {token}"}


def run_oversized(args: argparse.Namespace, command: str) -> int:
    """The run (module docstring): one service, one schedule of alternating blocks, one table."""
    blocks = layout(args.rounds, args.seconds, args.block_s)
    start = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load": os.getloadavg()}
    work = Path(tempfile.mkdtemp(prefix="sensitune-load-"))
    try:
        arts, model_desc = build_lite0(work, args.size)
        frames, frames_desc = demo_frames(work, 128)
        mix = probes()
        schedule = plan(blocks, args.rate, args.every, frames, mix)
        proc, base, headers = _start(work, arts)
        try:
            with httpx.Client(timeout=30, headers=headers) as c:  # the service's first inferences, not counted
                for i in range(40):
                    c.post(f"{base}/predict", files={"file": ("f.png", frames[i % len(frames)])},
                           data={"camera_id": CAMERAS[i % 12]})  # fmt: skip
            t0 = time.perf_counter() + LEAD_S
            with MemorySampler(proc.pid) as mem:
                sent = open_loop(base, schedule, t0, headers)
                time.sleep(1.0)  # the group fsync of the last records
            final_hwm_mb = tree_kb(proc.pid, "VmHWM") / 1024
            alive = proc.poll() is None
            server = server_times(work / "logs" / "predictions.jsonl", {p.frame_id: p.at_s for p in schedule})
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = summarize(blocks, sent, server, mem.samples, t0)
    warm = blocks[0]
    base_kb = max((s.hwm_kb for s in mem.between(t0 - LEAD_S, t0 + warm.end_s)), default=0)
    memory = {"base_mb": base_kb / 1024, "final_mb": max(final_hwm_mb, rows[-1]["hwm_mb"])}
    warm_errors = sum(not s.ok for s in sent if s.camera_id != PROBE_CAMERA and s.at_s < blocks[2].start_s)
    return write_table(args, command, start, model_desc, (frames, frames_desc), mix, blocks, rows, memory, alive,
                       warm_errors)  # fmt: skip
