"""What INT8 recovery (`export.int8_recovery`, `deploy.compile.recovery`) recovers: plain post-training INT8 against
its two retries and FP32, on the demo and on an imbalanced 16-bit (Mono12) set.

Per set: the merged model and its export as the pipeline makes them (demo: the main job's ``runs/main``; Mono12:
`sensitune demo` with ``demo.bit_depth: 12`` and 90 % good parts, then prepare, measure, plan, train, merge and
export with the main job's recipe, in ``--work``), then INT8 rebuilt from the export's ONNX file and calibration
tensors by ``accuracy_control`` (on the validation split) and by ``ignored_scope``. The retries are forced here,
whatever the gate said of plain INT8, to show what each would recover. Every artifact runs on the test split:
accuracy, balanced accuracy, escape rate and overkill at the model's threshold, agreement with FP32's top-1, and
the gate's verdict (`deploy.compile.verify.verify`: accuracy drop against PyTorch within ``export.int8_max_drop``).

    nice -n 5 .venv/bin/python benchmarks/int8_recovery.py [--work /tmp/int8_recovery] [--sets demo mono12]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploy.compile.inferencer import open_inferencer
from deploy.compile.quantize import calibration_fingerprint, float_layers, nncf_model_type, weighted_layers
from deploy.compile.recovery import RECOVERABLE, line_outcome, rebuild_int8, validation_tensors
from deploy.compile.verify import verify
from deploy.edge.precision import artifact_dir
from pipelines import stages
from pipelines.cli import run_order
from pipelines.config import load_params
from pipelines.layout import FILES
from pipelines.models import load_merged
from spt_core.api import ModelInfo, load_dataset_info, scan_split
from spt_core.portable.io import write_text
from spt_core.portable.metrics import softmax
from spt_core.portable.operating_point import OperatingPoint
from spt_core.portable.preprocess import preprocess_batch, preprocess_image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "int8_recovery.md"
METHODS = ("accuracy_control", "ignored_scope")
MONO_COUNTS = [450, 24, 16, 10]  # ok, scratch, spot, crack: 90 % good, the rare defects ~10 images each


def mono12_params(work: Path) -> dict[str, Any]:
    """The main job's params on a Mono12 demo line of 500 parts, 90 % good, under `work`."""
    sets = {"paths.raw": str(work / "raw"), "paths.data": str(work / "prepared"), "paths.run": str(work / "run"),
            "demo.counts": MONO_COUNTS, "demo.bit_depth": 12, "export.int8_recovery": "none"}  # fmt: skip
    return load_params(ROOT / "params.yaml", sets)


def build_mono12(params: dict[str, Any]) -> None:
    """`sensitune run`'s stages (demo images first), skipped when the export is already there (a re-run reuses it)."""
    if (stages.run_dir(params) / FILES["export"] / "model.onnx").is_file():
        return
    if not Path(params["paths"]["raw"]).is_dir():
        stages.demo_stage(params)
    for s in run_order():
        print(f"[mono12] {s.name}", flush=True)
        stages.call(s, params)


def calibration_of(params: dict[str, Any], pre: Any) -> list[np.ndarray]:
    """The calibration tensors `pipelines.stages.export_stage` gave plain INT8 (train split, seeded order)."""
    data_dir, e = Path(params["paths"]["data"]), params["export"]
    names = load_dataset_info(data_dir).class_names
    train = [p for p, _ in scan_split(data_dir / "train", names)]
    g = torch.Generator().manual_seed(0)
    picked = [train[i] for i in torch.randperm(len(train), generator=g)[: e["calibration_size"]].tolist()]
    return [preprocess_image(p, pre)[None] for p in picked]


def measure(key: str, name: str, params: dict[str, Any], work: Path) -> dict[str, Any]:
    """Rows of one set (`name`; its retries are built under ``work/key``): FP32, plain INT8, INT8 by each retry.
    Kept in ``work/key/result.json``: a re-run with the same ``--work`` reuses a finished set (delete it to redo)."""
    if (done_before := work / key / "result.json").is_file():
        return json.loads(done_before.read_text())
    run, data_dir = stages.run_dir(params), Path(params["paths"]["data"])
    model, info = load_merged(run / FILES["merged"])
    pre, op = ModelInfo.from_dict(info).preprocess, OperatingPoint.from_dict(info)
    classes = load_dataset_info(data_dir).class_names
    test = scan_split(data_dir / "test", classes)
    images, labels = [p for p, _ in test], np.array([y for _, y in test])
    export, budget = run / FILES["export"], params["export"]["int8_max_drop"]
    calibration = calibration_of(params, pre)
    ptq = artifact_dir(export, RECOVERABLE)
    recorded = open_inferencer(ptq, RECOVERABLE).artifact.manifest["calibration"]
    assert calibration_fingerprint(calibration) == recorded, f"{name}: not the calibration plain INT8 was built with"
    val = validation_tensors([p for p, _ in scan_split(data_dir / "val", classes)], images, pre)
    arts: dict[str, tuple[str, Path, dict]] = {"FP32": ("fp32", artifact_dir(export, "fp32"), {}),
                                               "INT8 ptq": (RECOVERABLE, ptq, {})}  # fmt: skip
    for method in METHODS:
        target = work / key / method
        shutil.rmtree(target, ignore_errors=True)  # a re-run rebuilds: retries are cheap next to training
        print(f"[{key}] rebuilding INT8 by {method}", flush=True)
        kind, outcome = nncf_model_type(model), line_outcome(op.to_dict(), classes)
        xml, done = rebuild_int8(method, export / "model.onnx", target, calibration, val, budget, kind, outcome)
        arts[f"INT8 {method}"] = (RECOVERABLE, xml, done)
    logits = {k: _logits(path, prec, images, pre) for k, (prec, path, _) in arts.items()}
    rows, fp32_decisions = [], op.decisions(softmax(logits["FP32"]), classes)
    for k, (prec, path, done) in arts.items():
        m = op.metrics(labels, softmax(logits[k]), classes)
        same_decision = 100.0 * float(np.mean(op.decisions(softmax(logits[k]), classes) == fp32_decisions))
        gate = verify(model, {prec: path}, images, labels.tolist(), pre, max_drop={RECOVERABLE: budget})
        rows.append({
            "artifact": k, "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "escape": m["at_threshold"]["escape_rate"], "overkill": m["at_threshold"]["overkill"],
            "agreement": 100.0 * float(np.mean(logits[k].argmax(1) == logits["FP32"].argmax(1))),
            "same_decision": same_decision,
            "drop": gate["accuracy_drop"][prec], "promotable": gate["promotable"][prec],
            "float_layers": len(float_layers(_ir(path))) if prec == RECOVERABLE else None,
            "seconds": done.get("seconds"),
        })  # fmt: skip
    n_layers = len(weighted_layers(_ir(ptq)))
    result = {"name": name, "rows": rows, "n_test": len(images), "n_val": len(val), "classes": classes,
              "n_defects": int((labels != classes.index(op.ok_class)).sum()), "threshold": op.threshold,
              "n_layers": n_layers, "budget": budget}  # fmt: skip
    write_text(done_before, json.dumps(result, indent=1) + "\n")
    return result


def _logits(path: Path, precision: str, images: list[Path], pre: Any) -> np.ndarray:
    inf = open_inferencer(path, precision)
    return np.concatenate([inf.infer(preprocess_batch(images[i : i + 16], pre)) for i in range(0, len(images), 16)])


def _ir(path: Path) -> Any:
    """The OpenVINO model of an artifact dir or its model.xml (its FakeQuantize nodes tell what is quantized)."""
    import openvino as ov

    path = Path(path)
    return ov.Core().read_model(str(path if path.suffix == ".xml" else path / "model.xml"))


def _pct(r: dict[str, Any]) -> str:
    return f"{100 * r['value']:.1f} % ({r['k']}/{r['n']})"


def render(results: list[dict[str, Any]], command: str, load_before: str, load_after: str, seconds: float) -> str:
    lines = ["# INT8 recovery: plain post-training INT8, its two retries, FP32", "", "```bash", command, "```", "",
             f"Machine load (`uptime`) before: `{load_before}`; after: `{load_after}`; wall {seconds / 60:.1f} min. "
             "Shared 2-core dev box: build seconds are CPU-contended, compare them within a table only.",
             ""]  # fmt: skip
    for res in results:
        lines += [f"## {res['name']}", "",
                  f"Test split: {res['n_test']} images ({res['n_defects']} defects), classes "
                  f"{', '.join(res['classes'])}; "
                  f"threshold {res['threshold']:.4f} on P(ok); accuracy control measured agreement (top-1 and "
                  f"decision) on {res['n_val']} validation images; INT8 budget {res['budget']} pt; "
                  f"{res['n_layers']} weighted layers.", "",
                  "| artifact | test acc | balanced acc | escape @thr | overkill @thr | top-1 = FP32 | "
                  "decision = FP32 | drop vs PyTorch (pt) | promotable | layers in float | build s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in res["rows"]:
            lines.append(
                f"| {r['artifact']} | {100 * r['accuracy']:.2f} % | {100 * r['balanced_accuracy']:.2f} % | "
                f"{_pct(r['escape'])} | {_pct(r['overkill'])} | {r['agreement']:.1f} % | {r['same_decision']:.1f} % | "
                f"{r['drop']:.2f} | "
                f"{'yes' if r['promotable'] else 'no'} | {'-' if r['float_layers'] is None else r['float_layers']} | "
                f"{r['seconds'] if r['seconds'] is not None else '-'} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/int8_recovery"))
    ap.add_argument("--sets", nargs="+", choices=("demo", "mono12"), default=["demo", "mono12"])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    load_before, t0 = _uptime(), time.perf_counter()
    results = []
    if "demo" in args.sets:
        results.append(measure("demo", "Demo (runs/main, the main job)", load_params(ROOT / "params.yaml"), args.work))
    if "mono12" in args.sets:
        params = mono12_params(args.work / "mono12_line")
        build_mono12(params)
        results.append(measure("mono12", "Mono12 16-bit frames, 90 % good", params, args.work))
    given = sys.argv[1:] if argv is None else argv
    command = "nice -n 5 .venv/bin/python benchmarks/int8_recovery.py " + " ".join(given)
    write_text(args.out, render(results, command.strip(), load_before, _uptime(), time.perf_counter() - t0))
    print(args.out.read_text())


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
