"""The measurements of `benchmarks/edge_box.py` (issue 30): simulated cameras against the real service, OpenVINO's
own ``benchmark_app`` on the same IR with the same streams and threads (the box's ceiling), preprocessing + inference
against inference alone for each input variant, and each variant's accuracy.

Variants: ``host`` (the box decodes, resizes and normalises: `spt_core.portable.preprocess`) and ``graph`` (the box
decodes, the compiled model resizes and normalises: `deploy.edge.inferencer.graph_input`), each on a frame decoded in
full or in JPEG draft mode (`deploy.edge.decoding.draft`, what the service does).
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.load_clients import closed_loop
from deploy.edge.artifact import Artifact
from deploy.edge.decoding import draft
from deploy.edge.inferencer import OpenVINOInferencer
from deploy.edge.limits import Limits, decode, open_header

BENCHMARK_APP = Path(sys.executable).with_name("benchmark_app")
LIMITS = Limits(max_body_bytes=2**31, max_pixels=10**9, max_decoded_bytes=2**34)  # the variants' own decodes


def full_size_frames(images: list[Image.Image], size: tuple[int, int], fmt: str) -> list[bytes]:
    """Each image resized (bicubic) to a camera's full frame (width, height) and encoded as `fmt` (JPEG at quality
    90, as a camera's encoder would; PNG)."""
    out = []
    for im in images:
        buf = io.BytesIO()
        options = {"quality": 90} if fmt == "JPEG" else {}
        im.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buf, fmt, **options)
        out.append(buf.getvalue())
    return out


def run_cameras(base: str, frames: list[bytes], cameras: int, seconds: float, fmt: str) -> dict[str, Any]:
    """`cameras` threads, one camera each, post frames back to back for `seconds` (a closed loop: the next frame goes
    when the last one is answered); per-camera latencies in ms, answers, errors and the wall time."""
    pick = lambda k, j, i: (f"cam-{k}", frames[(k * 7 + j) % len(frames)], None)  # noqa: E731
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    sent, wall = closed_loop(base, cameras, pick, seconds, mime=mime, timeout=60)
    lat: dict[str, list[float]] = {f"cam-{k}": [] for k in range(cameras)}
    roles: dict[str, set[str]] = {cam: set() for cam in lat}
    for s in sent:
        if s.ok:
            lat[s.camera_id].append(s.ms)
            roles[s.camera_id].add(s.role)
    errors = [s.why for s in sent if not s.ok]
    n = sum(len(v) for v in lat.values())
    p50s = [float(np.percentile(v, 50)) for v in lat.values() if v]
    p99s = [float(np.percentile(v, 99)) for v in lat.values() if v]
    return {"frames": n, "fps": n / wall, "errors": len(errors), "error_kinds": sorted(set(errors)), "wall_s": wall,
            "p50": float(np.median(p50s)) if p50s else float("nan"), "p99": max(p99s, default=float("nan")),
            "roles": {cam: sorted(r) for cam, r in roles.items()}}  # fmt: skip


def compiled_settings(artifact: Artifact, props: dict[str, Any]) -> dict[str, int]:
    """Streams, threads and requests OpenVINO gives this IR under `props` over its runtime_config: what the service
    compiled (the same properties, the same cores), for benchmark_app to run with."""
    inf = OpenVINOInferencer.from_artifact(artifact, props)
    get = inf.compiled.get_property
    streams, threads = int(get("NUM_STREAMS")), int(get("INFERENCE_NUM_THREADS"))
    return {"streams": streams, "threads": threads, "requests": inf.n_requests}


def benchmark_app(xml: Path, size: tuple[int, int], settings: dict[str, int], seconds: float) -> dict[str, Any]:
    """``benchmark_app`` on the IR, batch 1, f32 compute (the manifest's INFERENCE_PRECISION_HINT), with the service's
    streams and threads (its UI needs ``-hint none`` for those); throughput (FPS) and median latency."""
    cmd = [str(BENCHMARK_APP), "-m", str(xml), "-d", "CPU", "-hint", "none", "-nstreams", str(settings["streams"]),
           "-nthreads", str(settings["threads"]), "-nireq", str(max(settings["requests"], settings["streams"])),
           "-t", str(max(1, round(seconds))), "-data_shape", f"[1,3,{size[0]},{size[1]}]",
           "-infer_precision", "f32"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 4 + 120)
    fps = re.search(r"Throughput:\s+([\d.]+)\s+FPS", out.stdout)
    median = re.search(r"Median:\s+([\d.]+)\s+ms", out.stdout)
    if out.returncode != 0 or fps is None:
        raise SystemExit(f"benchmark_app failed ({out.returncode}): {(out.stdout + out.stderr)[-600:]}")
    shown = " ".join(c if not c.startswith("/") else Path(c).name for c in cmd[1:])
    return {"fps": float(fps.group(1)), "median_ms": float(median.group(1)) if median else float("nan"),
            "command": f"benchmark_app {shown}"}  # fmt: skip


def open_variants(artifact: Artifact) -> dict[str, Any]:
    """The host variant, and the graph variant when this tree has it (`graph_input.open_variant`), LATENCY hint."""
    props = {"PERFORMANCE_HINT": "LATENCY"}
    out: dict[str, Any] = {"host": OpenVINOInferencer.from_artifact(artifact, props)}
    try:
        from deploy.edge.inferencer.graph_input import open_variant
    except ImportError:  # the in-graph preprocessing is not in this tree: its rows say so
        return out
    out["graph"] = open_variant(artifact, props, variant="graph")
    return out


def decoded(data: bytes, drafted: bool, pre: Any) -> Image.Image:
    """A frame as the service decodes it: in full, or in draft mode for `pre`'s size."""
    header = open_header(data, LIMITS)
    return decode(draft(header, [pre]) if drafted else header)


def _p50(fn: Callable[[bytes], Any], frames: list[bytes], rounds: int) -> float:
    times = []
    for r in range(rounds):
        data = frames[r % len(frames)]
        t0 = time.perf_counter()
        fn(data)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50))


def latency_rows(variants: dict[str, Any], frames: list[bytes], rounds: int) -> list[tuple[str, float]]:
    """(row, p50 ms) one frame at a time: inference alone on a ready tensor, then for each variant and decode the
    frame's bytes -> decode -> the model's input -> inference (the service's work for a frame, less HTTP and logs)."""
    host = variants["host"]
    pre = host.card.preprocess
    x = host.model_input(decoded(frames[0], True, pre))
    for data in frames[:3]:  # warm-up: first inferences and the decoders' tables
        for model in variants.values():
            model.predict(decoded(data, True, pre))
    rows = [("inference alone (host IR, ready tensor)", _p50(lambda _: host.infer(x), frames, rounds))]
    for name, model in variants.items():
        for drafted in (False, True):
            label = f"{name}: {'draft' if drafted else 'full'} decode + preprocessing + inference"
            rows.append((label, _p50(lambda d, m=model, dr=drafted: m.predict(decoded(d, dr, pre)), frames, rounds)))
    return rows


def accuracy_rows(variants: dict[str, Any], originals: list[Image.Image], labels: list[int], frames: list[bytes]
                  ) -> list[tuple[str, float, str]]:  # fmt: skip
    """(variant, accuracy %, agreement with host on the full decode) on the test split as stored, and on its images
    made full-size frames (the same frames the cameras post)."""
    host = variants["host"]
    pre, names = host.card.preprocess, host.class_names
    acc = lambda answers: 100.0 * np.mean([names.index(a["class"]) == y for a, y in zip(answers, labels)])  # noqa: E731
    rows = []
    for name, model in variants.items():
        rows.append((f"{name}, test images as stored", acc([model.predict(im) for im in originals]), "-"))
    base = [host.predict(decoded(d, False, pre)) for d in frames]
    for name, model in variants.items():
        for drafted in (False, True):
            got = [model.predict(decoded(d, drafted, pre)) for d in frames]
            same = sum(a["class"] == b["class"] and a["decision"] == b["decision"] for a, b in zip(got, base))
            dp = max(abs(a["p_good"] - b["p_good"]) for a, b in zip(got, base))
            note = f"{same}/{len(base)} same answer, max dP(good) {dp:.3f}"
            rows.append((f"{name}, full-size frames, {'draft' if drafted else 'full'} decode", acc(got), note))
    return rows


P99_TARGET_MS, PRE_TARGET, CEILING_TARGET = 50.0, 1.3, 0.8  # issue 30's targets


def _verdict(ok: bool, value: float, target: float, higher_is_better: bool) -> str:
    if ok:
        return "met"
    gap = target / value - 1 if higher_is_better else value / target - 1
    return f"missed by {gap:.0%}"


def targets(rows: list[dict], ceiling: dict, timing: list[tuple[str, float]]) -> list[str]:
    """The issue's two targets as table rows: preprocessing + inference p50 within 1.3x of inference alone (each
    path), and the service's frames/s within 0.8x of benchmark_app's at per-camera p99 <= 50 ms for the largest
    camera count that holds it."""
    alone = timing[0][1]
    out = []
    for name, p50 in timing[1:]:
        ratio = p50 / alone
        out.append(f"| {name}: p50 <= {PRE_TARGET}x inference alone | {p50:.1f} / {alone:.1f} ms = {ratio:.2f}x "
                   f"| {_verdict(ratio <= PRE_TARGET, ratio, PRE_TARGET, False)} |")  # fmt: skip
    held = [r for r in rows if r["p99"] <= P99_TARGET_MS]
    if held:
        r = max(held, key=lambda r: r["cameras"])
        ratio = r["fps"] / ceiling["fps"]
        out.append(f"| service frames/s >= {CEILING_TARGET}x benchmark_app at per-camera p99 <= {P99_TARGET_MS:.0f} "
                   f"ms ({r['cameras']} cameras, the most that held it) | {r['fps']:.1f} / {ceiling['fps']:.1f} = "
                   f"{ratio:.2f}x | {_verdict(ratio >= CEILING_TARGET, ratio, CEILING_TARGET, True)} |")  # fmt: skip
    else:
        best = min(rows, key=lambda r: r["p99"])
        gap = best["p99"] / P99_TARGET_MS - 1
        out.append(f"| per-camera p99 <= {P99_TARGET_MS:.0f} ms for some camera count | best: {best['cameras']} "
                   f"camera(s), p99 {best['p99']:.1f} ms | missed by {gap:.0%} |")  # fmt: skip
    return out


def why(rows: list[dict], ceiling: dict, timing: list[tuple[str, float]]) -> list[str]:
    """Where the time goes, from the same run's numbers: what a missed target is made of."""
    alone = timing[0][1]
    fastest_name, fastest = min(timing[1:], key=lambda t: t[1])
    one = min(rows, key=lambda r: r["cameras"])
    per_frame = 1e3 / one["fps"] if one["fps"] else float("nan")
    return [
        "", "## Why the targets are missed", "",
        f"- Preprocessing: the fastest path ({fastest_name}) spends {fastest - alone:.1f} of its {fastest:.1f} ms "
        f"p50 before the model: decoding the camera's frame (even in JPEG draft mode) and resizing it cost more than "
        f"the model itself ({alone:.1f} ms). Moving the resize into the graph does not change that on a CPU, where "
        "both run on the same cores; the target is within reach only for frames near the model's input size, or "
        "where an accelerator runs the graph variant (`preprocess: auto` serves graph on GPU/NPU).",
        f"- Throughput: benchmark_app runs inference on ready tensors. Each service frame at {one['cameras']} "
        f"camera(s) takes {per_frame:.1f} ms of the box ({one['fps']:.1f} frames/s), of which inference is about "
        f"{alone:.1f} ms; the rest is the decode and resize above, HTTP, multipart parsing and the JSON answer, on the "
        f"same 2 cores. More cameras add queueing, not frames/s: the cores are already busy with decoding.",
    ]  # fmt: skip


def report(args: Any, command: str, model_desc: str, machine: str, frames: list[bytes], rows: list[dict],
           settings: dict, ceiling: dict, timing: list, accuracy: list, latency: str | None,
           loads: tuple[str, str]) -> list[str]:  # fmt: skip
    """results/edge_box.md."""
    import openvino

    kb = np.mean([len(f) for f in frames]) / 1024
    lines = ["# The edge box as a multi-camera appliance (issue 30)", "", "```", command, "```", "",
             f"- Date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; machine: {machine}; OpenVINO {openvino.__version__}",
             f"- Load (`uptime`) at start: `{loads[0]}`; at end: `{loads[1]}`",
             f"- Model: {model_desc}",
             f"- Frames: {len(frames)} test images made {args.frame_size} {args.format} frames ({kb:.0f} KB each on "
             f"average), multipart POST /predict by one closed-loop thread per camera on loopback (the next frame "
             f"when the last is answered) for {args.seconds:.0f} s after {args.warmup:.0f} s of warm-up",
             f"- Service: a fresh `sensitune-edge` process (uvicorn, 1 worker) per camera count, champion only, "
             f"manifest `cameras: {{count: n}}` (the hint below), device CPU, batching.max_batch {args.max_batch}",
             "", "| cameras | compile properties | frames/s | per-camera p50 ms (median camera) | per-camera p99 ms "
             "(worst camera) | service-side p50 / p99 ms | errors | load avg | / benchmark_app |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        hint = ", ".join(f"{k.removeprefix('PERFORMANCE_')}={v}" for k, v in r["hint"].items())
        errs = f"{r['errors']} ({', '.join(r['error_kinds'])})" if r["errors"] else "0"
        lines.append(f"| {r['cameras']} | {hint} | {r['fps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{r['server']['p50']:.1f} / {r['server']['p99']:.1f} | {errs} | {r['load']:.1f} | "
                     f"{r['fps'] / ceiling['fps']:.2f}x |")  # fmt: skip
    lines += ["", f"The box's ceiling: `{ceiling['command']}` (the service's {settings['streams']} streams and "
              f"{settings['threads']} threads at {max(r['cameras'] for r in rows)} cameras): **{ceiling['fps']:.1f} "
              f"FPS**, median latency {ceiling['median_ms']:.1f} ms.", "",
              "## Decode + preprocessing + inference against inference alone", "",
              f"One frame at a time in the benchmark's process, {args.rounds} frames per row, the {args.frame_size} "
              f"{args.format} frames above; LATENCY hint.", "", "| path | p50 ms | / inference alone |",
              "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {name} | {p50:.2f} | {p50 / timing[0][1]:.2f}x |" for name, p50 in timing]
    if not any(name.startswith("graph") for name, _ in timing):
        lines += ["", "The graph variant (`deploy/edge/inferencer/graph_input.py`) is not in this tree: no graph rows."]
    if accuracy:
        lines += ["", "## Accuracy of each variant (test split)", "", "| variant | accuracy % | against host, full "
                  "decode, on the same frames |", "|---|---:|---|"]  # fmt: skip
        lines += [f"| {name} | {acc:.1f} | {note} |" for name, acc, note in accuracy]
    lines += ["", "## Targets (issue 30)", "", "| target | measured | |", "|---|---|---|"]
    lines += targets(rows, ceiling, timing)
    lines += why(rows, ceiling, timing)
    if latency:
        lines += ["", f"`benchmarks/edge_latency.py {args.latency_args}` was re-run in the same run: {latency}."]
    return lines
