"""An edge box on loopback: Lite0 artifacts, demo frames, and the service in its own process or in a thread; and,
run as a script, the box as a multi-camera appliance (issue 30).

`benchmarks/edge_load.py` (both scenarios) builds its champion and challenger here, starts the real
`sensitune-edge` process on a free port (so the clients do not share its GIL) and waits until it is ready;
`serve` runs an app under uvicorn in this process (the demo line of `benchmarks/ui_pages.py`, and the edge tests).

    .venv/bin/python benchmarks/edge_box.py            # the main job's IR, 1/2/4/8 cameras of 5 MP JPEGs, ~6 min
    .venv/bin/python benchmarks/edge_box.py --cameras 1,2 --seconds 2 --frame-size 320x240 --bench-seconds 2 \
        --rounds 10 --out /tmp/edge_box.md --latency-args "--weights embedded --img-size 32 --precisions fp32 \
        --rounds 3 --warmup 1 --batch-rounds 1 --calibration-size 4 --out /tmp/edge_latency.md"   # a smoke run

For 1, 2, 4 and 8 simulated cameras posting full-size frames to the real service (a fresh `sensitune-edge` process
per count, its manifest saying ``cameras: {count: n}``, so the hint is the one the box would run), frames/s and
per-camera p50/p99; beside them OpenVINO's ``benchmark_app`` on the same IR with the same streams and threads (the
box's ceiling); p50 of decode + preprocessing + inference against inference alone for the host and graph input
variants, each decoded in full or in JPEG draft mode; each variant's accuracy; and, in the same run,
`benchmarks/edge_latency.py` re-made (``--latency-args``). Writes results/edge_box.md with the command, the machine,
its load (``uptime``) and the issue's targets with the margin by which each is met or missed.
"""

from __future__ import annotations

import io
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.protocol import cpu_info as protocol_cpu_info

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ok", "scratch", "spot", "crack"]
CAMERAS = [f"cam-{i}" for i in range(12)]


def build_lite0(work: Path, size: int) -> tuple[dict[str, Path], str]:
    """Lite0 -> ONNX -> OpenVINO FP32 for versions 1 and 2 (same weights, separate sealed directories)."""
    from deploy.compile.build import compile_openvino
    from deploy.compile.export import export_onnx, write_manifest
    from spt_core.api import create_model

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
        from spt_core.api import generate_demo_defects

        root = Path(generate_demo_defects(work / "images", n_per_class=n_per_class, seed=0, size=size, counts=None))
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
    """The machine line's CPU part: model, logical CPUs visible, ISA (`benchmarks.protocol.cpu_info`)."""
    model, isa = protocol_cpu_info()
    return f"{model}; {os.cpu_count()} logical CPUs visible; ISA: {', '.join(isa) or 'none of avx2/avx512/amx'}"


def start_service(config: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`python -m deploy.edge.service --config CONFIG` on a free loopback port, ready; (process, base URL). The
    caller terminates the process."""
    port = free_port()
    cmd = [sys.executable, "-m", "deploy.edge.service", "--config", str(config), "--port", str(port), *extra,
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
    except BaseException:
        proc.terminate()
        proc.wait(10)
        raise
    return proc, base


def quantiles(q: dict) -> str:
    """The service's /metrics quantiles as one cell."""
    return f"p50 {q['p50']:.1f} / p90 {q['p90']:.1f} / p99 {q['p99']:.1f} ms"


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it; a later bind may still race, rarely)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run the app under a real uvicorn server on 127.0.0.1 in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until /readyz answers 200; exits when the service died or is not ready after `timeout` s."""
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


# ------------------------------------------------------------------------------------ the multi-camera benchmark
MAIN_IR = ROOT / "runs/main/export/openvino/fp32"
TEST_SPLIT = ROOT / "data/prepared/test"
# the command that made results/edge_latency.md, with the merged weights where the main job now writes them
LATENCY_ARGS = ("--weights runs/main/merged/model.safetensors --img-size 128 --threads 1 --calibration-size 160 "
                "--accuracy-dir data/prepared/test")  # fmt: skip
LATENCY_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def uptime() -> str:
    """`uptime`'s line (the load the numbers were taken under)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def image_folder(root: Path, class_names: list[str]) -> tuple[list[Any], list[int]]:
    """An ImageFolder split's images (RGB) and their indices in `class_names`."""
    from PIL import Image

    items = [(p, class_names.index(p.parent.name)) for p in sorted(root.glob("*/*")) if p.parent.name in class_names]
    return [Image.open(p).convert("RGB") for p, _ in items], [y for _, y in items]


def main(argv: list[str] | None = None) -> int:
    """The benchmark (module docstring); exit 1 when a camera got an error."""
    import argparse
    import shutil
    import tempfile

    import yaml

    from benchmarks import edge_cameras as ec
    from deploy.edge.artifact import load_artifact
    from deploy.edge.serving import Batching, Serving

    ap = argparse.ArgumentParser(description="The edge box as a multi-camera appliance (issue 30).")
    ap.add_argument("--artifact", type=Path, help=f"an OpenVINO artifact dir; default {MAIN_IR.relative_to(ROOT)}, "
                    "else a Lite0 built here (speed only)")  # fmt: skip
    ap.add_argument("--size", type=int, default=128, help="input side of the Lite0 built without --artifact")
    ap.add_argument("--cameras", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured per camera count")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each measurement")
    ap.add_argument("--frame-size", default="2448x2048", help="the cameras' frames, WxH (5 MP: a GigE area camera)")
    ap.add_argument("--format", default="JPEG", choices=["JPEG", "PNG"])
    ap.add_argument("--frames", type=int, default=16, help="distinct frames the cameras cycle through")
    ap.add_argument("--accuracy-dir", type=Path, default=TEST_SPLIT if TEST_SPLIT.is_dir() else None)
    ap.add_argument("--max-batch", type=int, default=1, help="the service's batching.max_batch (1: off)")
    ap.add_argument("--bench-seconds", type=float, default=15.0, help="benchmark_app -t")
    ap.add_argument("--rounds", type=int, default=100, help="frames timed per variant, one at a time")
    ap.add_argument("--latency-args", default=LATENCY_ARGS, help="benchmarks/edge_latency.py's arguments")
    ap.add_argument("--no-latency", action="store_true", help="do not re-make edge_latency.md")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/edge_box.md")
    args = ap.parse_args(argv)
    command = "python benchmarks/edge_box.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    load_start, counts = uptime(), [int(c) for c in args.cameras.split(",")]
    frame_size = tuple(int(v) for v in args.frame_size.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="sensitune-edge-box-"))
    try:
        art_dir = args.artifact or (MAIN_IR if (MAIN_IR / "manifest.json").is_file() else None)
        model_desc = f"{art_dir} (the main job's fp32 IR)" if art_dir else ""
        if art_dir is None:
            arts, model_desc = build_lite0(work, args.size)
            art_dir = arts["1"]
        artifact = load_artifact(art_dir)
        if args.accuracy_dir is not None:
            images, labels = image_folder(args.accuracy_dir, artifact.class_names)
        else:
            from PIL import Image

            images, labels = [Image.open(io.BytesIO(b)) for b in demo_frames(work, 128)[0]], []
        frames = ec.full_size_frames(images[: args.frames], frame_size, args.format)
        batching = Batching(max_batch=args.max_batch)
        rows = []
        for n in counts:
            cfg = work / f"rollout-{n}.yaml"
            manifest = {"line": "bench", "champion": {"version": artifact.version, "path": str(art_dir)},
                        "cameras": {"count": n}, "log_dir": f"logs-{n}"}  # fmt: skip
            if batching.on:
                manifest["batching"] = {"max_batch": args.max_batch}
            cfg.write_text(yaml.safe_dump(manifest))
            proc, base = start_service(cfg)
            try:
                ec.run_cameras(base, frames, n, args.warmup, args.format)
                res = ec.run_cameras(base, frames, n, args.seconds, args.format)
                res["server"] = httpx.get(f"{base}/metrics").json()["latency_ms"]
            finally:
                proc.terminate()
                proc.wait(10)
            res |= {"cameras": n, "hint": Serving(cameras=n, batching=batching).compile_properties({}),
                    "load": os.getloadavg()[0]}  # fmt: skip
            rows.append(res)
        top = Serving(cameras=max(counts), batching=batching).compile_properties({})
        settings = ec.compiled_settings(artifact, top)
        ceiling = ec.benchmark_app(art_dir / "model.xml", artifact.preprocess.size, settings, args.bench_seconds)
        variants = ec.open_variants(artifact)
        timing = ec.latency_rows(variants, frames, args.rounds)
        accuracy = ec.accuracy_rows(variants, images, labels, ec.full_size_frames(images, frame_size, args.format)) \
            if labels else []  # fmt: skip
        latency = None if args.no_latency else remake_latency(args.latency_args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = f"{cpu_info()}; Python {platform.python_version()}, {platform.system()} {platform.release()}"
    lines = ec.report(args, command, model_desc, machine, frames, rows, settings, ceiling, timing, accuracy, latency,
                      (load_start, uptime()))  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if any(r["errors"] for r in rows) else 0


def remake_latency(latency_args: str) -> str:
    """Run benchmarks/edge_latency.py with `latency_args` (and the malloc settings its recorded command used); the
    file it wrote."""
    argv = shlex.split(latency_args)
    cmd = [sys.executable, str(ROOT / "benchmarks/edge_latency.py"), *argv]
    out = subprocess.run(cmd, cwd=ROOT, env=os.environ | LATENCY_ENV, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"edge_latency.py failed: {out.stderr[-800:]}")
    return argv[argv.index("--out") + 1] if "--out" in argv else "benchmarks/results/edge_latency.md"


if __name__ == "__main__":
    sys.exit(main())
