"""Load test of the edge service: the real `sensitune-edge` process on loopback, N camera clients, real images.

    .venv/bin/python benchmarks/load_test.py --requests 2000 --clients 8 --size 112 --hints LATENCY,THROUGHPUT

Builds an OpenVINO FP32 artifact of the embedded EfficientNet-Lite0 (4-class head, untrained: speed only) through
`deploy.export` (twice: champion v1 and challenger v2, 25 % of the cameras on the challenger, so the A/B path is
what is measured), starts the service in its own process (so the clients do not share its GIL), sends a bounded
number of multipart PNG frames from 12 camera ids, and writes benchmarks/results/load_test.md.

Latency here is the client's round trip (HTTP + decode + preprocessing + inference + logging); the service's own
view (/metrics) is reported beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ok", "scratch", "spot", "crack"]
CAMERAS = [f"cam-{i}" for i in range(12)]


def build_lite0(work: Path, size: int) -> tuple[dict[str, Path], str]:
    """Lite0 -> ONNX -> OpenVINO FP32 for versions 1 and 2 (same weights, separate sealed directories)."""
    from deploy.export import compile_openvino, export_onnx, write_manifest
    from spt_core.model import create_model

    model, info = create_model("tf_efficientnet_lite0", num_classes=4, weights="embedded", img_size=size)
    onnx_path = export_onnx(model, info.preprocess, work / "model.onnx")
    arts = {}
    for v in ("1", "2"):
        d = compile_openvino(onnx_path, work / "artifacts" / v, "fp32")
        common = dict(model_name="tf_efficientnet_lite0", class_names=CLASSES, pre=info.preprocess, model_version=v)
        write_manifest(d, precision="fp32", plan_hash=None, data_version=None, **common)
        arts[v] = d
    return arts, f"tf_efficientnet_lite0 (embedded weights, random 4-class head) FP32 IR at {size} px"


def demo_frames(work: Path, size: int, n_per_class: int = 16) -> tuple[list[bytes], str]:
    """PNG bytes of demo defect images (the generator of spt_core, else skimage photo crops) and what they are."""
    try:
        from spt_core.demo import generate_demo_defects

        root = Path(generate_demo_defects(work / "images", n_per_class=n_per_class, seed=0, size=size))
        return [p.read_bytes() for p in sorted(root.glob("*/*.png"))], "spt_core demo defect PNGs"
    except ImportError:
        from PIL import Image
        from skimage import data

        out = []
        for name in ("astronaut", "coffee", "chelsea", "rocket"):
            img = Image.fromarray(getattr(data, name)())
            for k in range(n_per_class):
                w, h = img.size
                x, y = (k * 37) % (w - size * 2), (k * 53) % (h - size * 2)
                buf = io.BytesIO()
                img.crop((x, y, x + size * 2, y + size * 2)).resize((size, size)).save(buf, "PNG")
                out.append(buf.getvalue())
        return out, "skimage photo crops as PNG (spt_core.demo.generate_demo_defects not available)"


def cpu_info() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}; {os.cpu_count()} logical CPUs visible; ISA: {', '.join(isa) or 'none of avx2/avx512/amx'}"


def run_clients(base: str, frames: list[bytes], total: int, clients: int, max_s: float) -> dict:
    """`clients` threads share a request budget of `total`; stops early at `max_s` seconds."""
    lock, next_i = threading.Lock(), [0]
    lat: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + max_s

    def worker() -> None:
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline:
                with lock:
                    i = next_i[0]
                    if i >= total:
                        return
                    next_i[0] += 1
                cam = CAMERAS[i % len(CAMERAS)]
                t0 = time.perf_counter()
                try:
                    r = client.post(
                        f"{base}/predict",
                        files={"file": ("f.png", frames[i % len(frames)], "image/png")},
                        data={"camera_id": cam, "frame_id": f"lt-{i}"},
                    )
                    ok = r.status_code == 200
                    why = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    ok, why = False, type(e).__name__
                ms = (time.perf_counter() - t0) * 1e3
                with lock:
                    (lat.append(ms) if ok else errors.append(why))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
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
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load_test.md")
    args = ap.parse_args()
    command = "python benchmarks/load_test.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    work = Path(tempfile.mkdtemp(prefix="sensitune-load-"))
    runs = []
    try:
        arts, model_desc = build_lite0(work, args.size)
        frames, frames_desc = demo_frames(work, 128)
        for hint in args.hints.split(","):
            runs.append((hint, *serve_and_load(work, arts, hint, frames, args)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import openvino

    lines = [
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
            f"{hint}: service-side request time (/metrics, incl. warm-up) {_q(metrics['latency_ms'])}; model time "
            "(preprocess + infer, queueing excluded): "
            + "; ".join(f"{k} {_q(v['latency_ms'])}" for k, v in metrics["models"].items())
            + f"; requests per model {json.dumps(split)}"
            + (f"; error kinds: {', '.join(res['error_kinds'])}" if res["errors"] else ""),
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if all(r[1]["errors"] == 0 for r in runs) else 1


def serve_and_load(
    work: Path, arts: dict[str, Path], hint: str, frames: list[bytes], args: argparse.Namespace
) -> tuple:
    """Start the service with this PERFORMANCE_HINT, warm it up, load it; (client result, /metrics, load avg)."""
    cfg = work / f"rollout-{hint}.yaml"
    ref = lambda v: {"version": v, "path": str(arts[v])}  # noqa: E731
    cfg.write_text(yaml.safe_dump({"line": "bench", "champion": ref("1"), "challenger": ref("2"),
                                   "challenger_share": 0.25, "openvino": {"PERFORMANCE_HINT": hint},
                                   "log_dir": f"logs-{hint}"}))  # fmt: skip
    port = _free_port()
    cmd = [sys.executable, "-m", "deploy.service", "--config", str(cfg), "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, proc)
        run_clients(base, frames, 40, args.clients, 30)  # warm-up
        res = run_clients(base, frames, args.requests, args.clients, args.max_seconds)
        return res, httpx.get(f"{base}/metrics").json(), os.getloadavg()[0]
    finally:
        proc.terminate()
        proc.wait(10)


def _q(q: dict) -> str:
    return f"p50 {q['p50']:.1f} / p90 {q['p90']:.1f} / p99 {q['p99']:.1f} ms"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with code {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the service at {base} was not ready after {timeout} s")


if __name__ == "__main__":
    sys.exit(main())
