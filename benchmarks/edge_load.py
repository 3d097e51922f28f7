"""Load of the edge service: the real `sensitune-edge` process on loopback, N camera clients, real images.

    .venv/bin/python benchmarks/edge_load.py --requests 2000 --clients 8 --size 112 --hints LATENCY,THROUGHPUT
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \
        .venv/bin/python benchmarks/edge_load.py --scenario oversized --rate 20 --seconds 60 --every 3 --size 64 \
        --rounds 3 --block-s 10

Builds an OpenVINO FP32 artifact of the embedded EfficientNet-Lite0 (4-class head, untrained: speed only) through
`deploy.compile.export` (twice: champion v1 and challenger v2, 25 % of the cameras on the challenger, so the A/B path is
what is measured), starts the service in its own process (so the clients do not share its GIL; `edge_box.py`), sends
a bounded number of multipart PNG frames from 12 camera ids, and writes benchmarks/results/edge_load.md.

Latency here is the client's round trip (HTTP + decode + preprocessing + inference + logging); the service's own
view (/metrics) is reported beside it.

``--scenario oversized`` (issues 15 and 29; `edge_load_oversized.py`) paces normal frames through blocks of a few
seconds that alternate clean and with the 2026-12 probes mixed in (25 MP 8-bit, 4999 x 4999 16-bit, 144 Mpx PNGs),
and writes results/edge_load_oversized.md; it exits 1 unless the mixed p99 is within 1.5x of the clean one and the
service's peak RSS stays bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import yaml

from benchmarks.edge_box import CAMERAS, build_lite0, cpu_info, demo_frames, quantiles, start_service
from benchmarks.edge_load_oversized import run_oversized
from benchmarks.load_clients import closed_loop

RESULTS = Path(__file__).resolve().parent / "results"


def run_clients(base: str, frames: list[bytes], total: int, clients: int, max_s: float) -> dict:
    """`clients` threads share a request budget of `total` over the 12 camera ids (closed loop); stops early at
    `max_s` seconds."""
    pick = lambda k, j, i: (CAMERAS[i % len(CAMERAS)], frames[i % len(frames)], f"lt-{i}")  # noqa: E731
    sent, wall = closed_loop(base, clients, pick, max_s, total=total)
    lat = [s.ms for s in sent if s.ok]
    errors = [s.why for s in sent if not s.ok]
    q = np.percentile(lat, [50, 90, 99]) if lat else [float("nan")] * 3
    return {"ok": len(lat), "errors": len(errors), "error_kinds": sorted(set(errors)), "wall_s": wall,
            "rps": len(lat) / wall, "p50": q[0], "p90": q[1], "p99": q[2]}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=90.0)
    ap.add_argument("--size", type=int, default=112, help="model input side (Lite0 at 96-128 px here)")
    ap.add_argument("--hints", default="LATENCY,THROUGHPUT", help="OpenVINO PERFORMANCE_HINTs, one run each")
    ap.add_argument("--out", type=Path, help="default results/edge_load.md (results/edge_load_oversized.md)")
    ap.add_argument("--scenario", choices=["throughput", "oversized"], default="throughput")
    ap.add_argument("--rate", type=float, default=20.0, help="oversized: normal frames per second")
    ap.add_argument("--seconds", type=float, default=60.0, help="oversized: clean (and mixed) seconds per round")
    ap.add_argument("--every", type=float, default=3.0, help="oversized: one probe (rotating) per this many mixed s")
    ap.add_argument("--rounds", type=int, default=1, help="oversized: rounds of alternating clean and mixed blocks")
    ap.add_argument("--block-s", type=float, default=10.0, help="oversized: seconds of one clean or mixed block")
    args = ap.parse_args()
    command = "python benchmarks/edge_load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.scenario == "oversized":
        args.out = args.out or RESULTS / "edge_load_oversized.md"
        return run_oversized(args, command)
    args.out = args.out or RESULTS / "edge_load.md"
    return run_throughput(args, command)


def run_throughput(args: argparse.Namespace, command: str) -> int:
    """One fresh service per PERFORMANCE_HINT, loaded by --clients threads; the table; exit 1 on any error."""
    work = Path(tempfile.mkdtemp(prefix="sensitune-load-"))
    runs = []
    try:
        arts, model_desc = build_lite0(work, args.size)
        frames, frames_desc = demo_frames(work, 128)
        for hint in args.hints.split(","):
            runs.append((hint, *serve_and_load(work, arts, hint, frames, args)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = _throughput_head(args, command, model_desc, frames, frames_desc)
    _write(args.out, head + _throughput_rows(runs))
    return 0 if all(r[1]["errors"] == 0 for r in runs) else 1


def _throughput_head(args: argparse.Namespace, command: str, model_desc: str, frames: list[bytes],
                     frames_desc: str) -> list[str]:  # fmt: skip
    import openvino

    return [
        "# Edge service load test",
        "",
        "```",
        command,
        "```",
        "",
        f"- Model: {model_desc}; champion v1 + challenger v2 (same weights), challenger_share 0.25 of 12 cameras",
        f"- Frames: {len(frames)} {frames_desc} at 128 px, multipart POST /predict, {args.clients} client threads"
        " on loopback; a fresh service per row, 40 warm-up requests not counted",
        f"- Service: one `sensitune-edge` process (uvicorn, 1 worker), OpenVINO {openvino.__version__} CPU, "
        "INFERENCE_PRECISION_HINT=f32 (export manifest); PERFORMANCE_HINT from the rollout manifest's `openvino`",
        f"- CPU: {cpu_info()}; the machine was shared with other jobs (load average per row)",
        f"- Python {platform.python_version()}, {platform.system()} {platform.release()}",
        "",
    ]


def _throughput_rows(runs: list[tuple]) -> list[str]:
    lines = [
        "| PERFORMANCE_HINT | requests ok | errors | wall s | sustained req/s | p50 ms | p90 ms | p99 ms | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for hint, res, _, load in runs:
        lines.append(
            f"| {hint} | {res['ok']} | {res['errors']} | {res['wall_s']:.1f} | {res['rps']:.1f} | {res['p50']:.1f} "
            f"| {res['p90']:.1f} | {res['p99']:.1f} | {load:.1f} |"
        )
    lines += [
        "",
        "Latency: the client's round trip (HTTP + image decode + preprocessing + inference + JSONL logging).",
        "",
    ]
    for hint, res, metrics, _ in runs:
        split = {k: v["requests"] for k, v in metrics["models"].items()}
        lines += [
            f"{hint}: service-side request time (/metrics, incl. warm-up) {quantiles(metrics['latency_ms'])}; model "
            "time (preprocess + infer, queueing excluded): "
            + "; ".join(f"{k} {quantiles(v['latency_ms'])}" for k, v in metrics["models"].items())
            + f"; requests per model {json.dumps(split)}"
            + (f"; error kinds: {', '.join(res['error_kinds'])}" if res["errors"] else ""),
            "",
        ]
    return lines


def _write(out: Path, lines: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def serve_and_load(
    work: Path, arts: dict[str, Path], hint: str, frames: list[bytes], args: argparse.Namespace
) -> tuple:
    """Start the service with this PERFORMANCE_HINT, warm it up, load it; (client result, /metrics, load avg)."""
    cfg = work / f"rollout-{hint}.yaml"
    ref = lambda v: {"version": v, "path": str(arts[v])}  # noqa: E731
    cfg.write_text(yaml.safe_dump({"line": "bench", "champion": ref("1"), "challenger": ref("2"),
                                   "challenger_share": 0.25, "openvino": {"PERFORMANCE_HINT": hint},
                                   "log_dir": f"logs-{hint}"}))  # fmt: skip
    proc, base = start_service(cfg)
    try:
        run_clients(base, frames, 40, args.clients, 30)  # warm-up
        res = run_clients(base, frames, args.requests, args.clients, args.max_seconds)
        return res, httpx.get(f"{base}/metrics").json(), os.getloadavg()[0]
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
