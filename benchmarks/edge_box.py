"""An edge box on loopback: Lite0 artifacts, demo frames, and the service in its own process or in a thread.

`benchmarks/edge_load.py` (both scenarios) builds its champion and challenger here, starts the real
`sensitune-edge` process on a free port (so the clients do not share its GIL) and waits until it is ready;
`serve` runs an app under uvicorn in this process (the demo line of `benchmarks/ui_pages.py`, and the edge tests).
"""

from __future__ import annotations

import io
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

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
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16") if f in flags]
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
