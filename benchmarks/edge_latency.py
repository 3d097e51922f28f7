"""Edge latency: PyTorch eager vs every export precision (ONNX Runtime FP32 / INT8, OpenVINO FP32 / FP16 / INT8), side
by side in one run.

Builds each precision of `deploy.edge.precision` (``--precisions``, default all) as `deploy.compile.export` does
(`deploy.compile.build`, the artifacts the edge gets) and runs each through the one model runner
(`deploy.compile.inferencer.open_inferencer`), then measures, interleaved per round so a
noisy machine hits every format alike: batch-1 latency p50/p90/p99 with preprocessing excluded (a ready tensor)
and included (`spt_core.portable.preprocess.preprocess_image` on a full-size real photo), and batch throughput. Writes a
markdown table headed by the exact command, the CPU (model, ISA flags), threads, versions and precision hints.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        .venv/bin/python benchmarks/edge_latency.py            # ~2-3 min on 2 cores

The malloc variables keep glibc from returning PyTorch's freed activations to the OS after every call (mmap +
munmap page faults would otherwise be timed as inference). ``--accuracy-dir`` adds an accuracy column (needs a
fine-tuned ``--weights`` file; the default head is untrained).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import os
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import skimage.data
import torch

from benchmarks.protocol import ISA_FLAGS, cpu_info
from deploy.compile.build import build
from deploy.compile.export import export_onnx
from deploy.compile.inferencer import TorchInferencer, open_inferencer
from deploy.compile.verify import verify
from deploy.edge.precision import PRECISIONS, SOURCE
from spt_core.portable.preprocess import Preprocess, preprocess_batch, preprocess_image

RUNTIMES = {"openvino": "openvino", "onnx": "onnxruntime"}  # manifest format -> the runtime a row is named by
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Preprocess, str]:
    """The model to benchmark, its preprocessing and a note on where its weights came from."""
    try:
        from spt_core.api import create_model
    except ImportError as e:  # spt_core.model is optional here: fall back to a random-init timm model
        import timm

        model = timm.create_model(args.model, num_classes=args.num_classes).eval()
        size = args.img_size or 224
        return model, Preprocess(size=(size, size)), f"random init (spt_core.model unavailable: {e})"
    model, info = create_model(args.model, num_classes=args.num_classes, weights=args.weights, img_size=args.img_size)
    return model.eval(), info.preprocess, info.weights


def photos() -> list[np.ndarray]:
    """Real full-size photos (300x451 to 512x512, uint8): the preprocessing-included inputs."""
    return [skimage.data.coffee(), skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.rocket()]


def calibration_crops(n: int, seed: int = 0) -> list[np.ndarray]:
    """n random crops of the photos, standing in for a training split when calibrating INT8."""
    rng, imgs, out = np.random.default_rng(seed), photos(), []
    for i in range(n):
        img = imgs[i % len(imgs)]
        h, w = img.shape[:2]
        c = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        out.append(img[y : y + c, x : x + c])
    return out


def image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """An ImageFolder split: one sub-directory per class (sorted), images inside."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(f for f in (root / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [k] * len(files)
    if not paths:
        raise SystemExit(f"error: --accuracy-dir {root} holds no class sub-directories with images")
    return paths, labels, classes


def label(name: str) -> str:
    """The row name of a precision in the table: runtime-weights (``onnx_int8`` -> ``onnxruntime-int8``)."""
    row = PRECISIONS[name]
    return f"{RUNTIMES[row.format]}-{row.weights}"


def make_runners(model: torch.nn.Module, art: dict[str, Path], threads: int) -> tuple[dict[str, Callable], dict]:
    """row label -> f(x (N,3,H,W) float32) -> logits, and row label -> settings actually in effect."""
    torch.set_num_threads(threads)
    runners: dict[str, Callable] = {"pytorch": TorchInferencer(model).infer}
    settings = {"pytorch": f"eager fp32, torch.set_num_threads({torch.get_num_threads()})"}
    for name, path in art.items():  # the edge's own inferencers, with the manifest's runtime_config
        row = PRECISIONS[name]
        if row.format == "openvino":
            cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        else:
            # ORT's pool spin-waits after each run by default, stealing the cores from the next format's call
            # (PyTorch measured 4x slower behind it on a 2-core box); an edge box runs one runtime, so this costs
            # ORT nothing real.
            cfg = {"intra_op_num_threads": threads, "inter_op_num_threads": 1, "session.intra_op.allow_spinning": "0"}
        inferencer = open_inferencer(path, name, config=cfg)
        runners[label(name)] = inferencer.infer
        if row.format == "openvino":
            props = ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS")
            values = (inferencer.compiled.get_property(k) for k in props)
            settings[label(name)] = ", ".join(f"{k}={_text(v)}" for k, v in zip(props, values))
        else:
            threading = f"intra_op_num_threads={threads}, allow_spinning=0"
            settings[label(name)] = f"CPUExecutionProvider {row.weights}, {threading}"
    return runners, settings


def _text(value: object) -> str:
    return value.to_string() if isinstance(value, ov.Type) else str(value)  # ov.Type prints as "<Type: 'float32'>"


def measure(runners: dict[str, Callable], pre: Preprocess, args: argparse.Namespace) -> dict[str, dict]:
    """Interleaved timing: each round runs every format once per measurement, the order rotating by one per round
    so that each format follows every other equally often (a preceding pool's spin-wait or cache state)."""
    imgs = photos()
    x1 = preprocess_batch(imgs[:1], pre)  # (1, 3, H, W)
    xb = preprocess_batch([imgs[i % len(imgs)] for i in range(args.batch)], pre)  # (B, 3, H, W)
    names = list(runners)
    for _ in range(args.warmup):
        for n in names:
            runners[n](x1), runners[n](xb)
    t: dict[str, dict[str, list[float]]] = {n: {"excl": [], "incl": [], "batch": []} for n in names}
    clock = time.perf_counter
    gc.disable()  # a collection inside one format's call would be charged to that format
    try:
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            img = imgs[r % len(imgs)]
            for n in order:
                s = clock()
                runners[n](x1)
                t[n]["excl"].append(clock() - s)
                s = clock()
                runners[n](preprocess_image(img, pre)[None])
                t[n]["incl"].append(clock() - s)
                if r % max(1, args.rounds // args.batch_rounds) == 0:
                    s = clock()
                    runners[n](xb)
                    t[n]["batch"].append(clock() - s)
    finally:
        gc.enable()
    return t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", default="embedded", help="embedded | none | hub | path to a merged weights file")
    ap.add_argument("--num-classes", type=int, default=4)
    ap.add_argument("--img-size", type=int, default=None, help="default: the model's own input size")
    ap.add_argument("--rounds", type=int, default=150, help="batch-1 calls per format and mode")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8, help="throughput batch size")
    ap.add_argument("--batch-rounds", type=int, default=15, help="timed throughput calls per format")
    ap.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="threads per runtime (default: all cores, as on an edge box; use 1 on a shared, oversubscribed machine)",
    )
    ap.add_argument("--calibration-size", type=int, default=300)
    ap.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS),
                    help="rows of deploy.edge.precision to build and time (default: all)")  # fmt: skip
    ap.add_argument("--accuracy-dir", type=Path, default=None, help="ImageFolder split: adds an accuracy column")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "edge_latency.md")
    args = ap.parse_args(argv)
    command = " ".join(
        [f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ]
        + [shlex.quote(a) for a in [sys.executable.replace(os.getcwd() + "/", ""), *sys.argv]]
    )
    load_start = os.getloadavg()
    random.seed(0)
    torch.manual_seed(0)
    model, pre, weights = build_model(args)

    with tempfile.TemporaryDirectory(prefix="edge_latency.") as tmp:
        t0 = time.time()
        source = export_onnx(model, pre, Path(tmp) / "model.onnx")
        calib = [preprocess_image(im, pre)[None] for im in calibration_crops(args.calibration_size)]  # (1, 3, H, W)
        art = {n: source if n == SOURCE else build(n, source, Path(tmp) / n, calib) for n in args.precisions}
        export_s = time.time() - t0
        sizes = {label(n): (p.with_suffix(".bin") if p.suffix == ".xml" else p).stat().st_size for n, p in art.items()}
        runners, settings = make_runners(model, art, args.threads)
        t0 = time.time()
        times = measure(runners, pre, args)
        measure_s = time.time() - t0
        accuracy: dict[str, float] = {}
        if args.accuracy_dir is not None:
            paths, labels, classes = image_folder(args.accuracy_dir)
            if len(classes) != args.num_classes:
                raise SystemExit(f"error: --accuracy-dir has {len(classes)} classes, --num-classes {args.num_classes}")
            acc = verify(model, art, paths, labels, pre)["accuracy"]
            accuracy = {"pytorch": acc["pytorch"]} | {label(n): acc[n] for n in art}

    cpu, isa = cpu_info()
    versions = {"torch": torch.__version__, "onnxruntime": ort.__version__, "openvino": ov.get_version()}
    versions["nncf"] = importlib.metadata.version("nncf")
    ms = {n: {k: np.asarray(v) * 1e3 for k, v in d.items()} for n, d in times.items()}
    base = float(np.percentile(ms["pytorch"]["excl"], 50))
    lines = [
        f"# Edge latency: {args.model} at {pre.size[0]}x{pre.size[1]}",
        "",
        f"Command: `{command}`",
        "",
        f"- Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}; weights: {weights}",
        f"- CPU: {cpu}; ISA: {', '.join(isa) or 'none of ' + '/'.join(ISA_FLAGS)}; "
        f"OpenVINO sees {ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}",
        f"- Threads: {args.threads} per runtime, {os.cpu_count()} logical CPUs; load average at start "
        f"{load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f} (shared machine: compare rows, not runs)",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}",
        f"- Export + INT8 calibration ({len(calib)} crops): {export_s:.0f} s; timing: {measure_s:.0f} s",
        f"- {args.rounds} interleaved rounds after {args.warmup} warm-up rounds; batch-{args.batch} throughput over "
        f"{len(times['pytorch']['batch'])} calls, preprocessing excluded. Preprocessing included = "
        "`preprocess_image` (PIL bicubic resize) on a full-size photo (300x451 to 512x512) + inference.",
        "",
        "| format | p50 ms | p90 ms | p99 ms | p50 ms incl. pre | p90 incl. | p99 incl. "
        f"| batch-{args.batch} img/s | speed-up (p50) | weights MB |" + (" accuracy % |" if accuracy else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if accuracy else ""),
    ]
    formats = ["pytorch", *map(label, art)]
    for n in formats:
        e, i = (np.percentile(ms[n][k], [50, 90, 99]) for k in ("excl", "incl"))
        tput = args.batch / (np.median(ms[n]["batch"]) / 1e3)
        size = f"{sizes[n] / 2**20:.1f}" if n in sizes else "-"
        row = f"| {n} | {e[0]:.2f} | {e[1]:.2f} | {e[2]:.2f} | {i[0]:.2f} | {i[1]:.2f} | {i[2]:.2f} | {tput:.0f} "
        row += f"| {base / e[0]:.2f}x | {size} |" + (f" {accuracy[n]:.1f} |" if accuracy else "")
        lines.append(row)
    lines += ["", "Runtime settings in effect:", ""] + [f"- {n}: {settings[n]}" for n in formats]
    lines += [
        "",
        "All OpenVINO rows compile with `INFERENCE_PRECISION_HINT=f32`, as their manifests tell the edge to: on this "
        "CPU the plugin would otherwise compute in bf16. FP16 = FP16-stored weights computed in f32; INT8 keeps its "
        "non-quantized ops in f32. INT8 gains most with VNNI/AMX.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".{args.out.name}.tmp")
    tmp_out.write_text("\n".join(lines))
    os.replace(tmp_out, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
