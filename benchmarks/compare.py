"""The method against its baselines at equal budget: accuracy, memory and speed, one backbone x one task per run.

For a backbone, a task and a budget, runs every method of `benchmarks/methods.py` (linear probe, BitFit, full
fine-tuning, peft LoRA, random sparse, SPT-LoRA, SPT-Adapter, sparse-only) with the same data, epochs, schedule
(`spt_core.train.fit`, `TrainConfig.scaled`) and validation-only epoch selection; only the learning rate differs,
chosen per method from a small grid on validation accuracy with seed 0, then reused for the other seeds.
BatchNorm running statistics stay frozen for every method, full fine-tuning included.

With ``--imbalance 0.9`` the task becomes a line's data (`benchmarks/imbalance.py`: one good class at 90 %, few
defects, a proportional split) and every method runs in each ``--variants`` (class balancing, augmentation); rows
then add balanced accuracy and escape rate / overkill at the validation-chosen threshold.

Each (method, seed, lr) and each sensitivity pass runs in its own subprocess so that its peak memory (CPU:
ru_maxrss; CUDA: max_memory_allocated) is its own. Rows are appended to the JSON as they finish; a re-run skips
rows already there (resume), and refuses a table made with other settings (`PROTOCOL`: input size, epochs, data, ...).
Writes benchmarks/results/compare_<backbone>_<task>.{json,md,png}.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
      .venv/bin/python benchmarks/compare.py --backbone lite0 --task digits --budget 2% --seeds 2 --epochs 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks.methods` and `spt_core` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.methods import (  # noqa: E402
    FULL_LR_METHODS,
    METHODS,
    SENSITIVITY_METHODS,
    setup_method,
)
from benchmarks.report import chosen_lr, rows_tied_without_loss, summary_metrics, write_report  # noqa: E402
from spt_core.portable.errors import SensituneError  # noqa: E402
from spt_core.portable.io import write_json  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
BACKBONES = {  # preset: (timm name, weights, img_size)
    "lite0": ("tf_efficientnet_lite0", "embedded", 64),
    "vit-s14": (
        "vit_small_patch14_dinov2",
        str(Path("~/.cache/sensitune-fixtures/vit_small_patch14_dinov2.safetensors").expanduser()),
        84,
    ),
    "vit-b16": ("vit_base_patch16_224.augreg_in21k", "hub", 224),
    "test-effnet": ("test_efficientnet", "none", 32),
}
SENS_BATCHES, SENS_BATCH_SIZE, PROBE_EPOCHS = 16, 32, 50  # SPT: 16 x 32 = 512 training images


# ------------------------------------------------------------------------------------------------ child jobs
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM), so that loading the weights does not set the training peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # not Linux, or not allowed: fall back to ru_maxrss (a lifetime peak)
        return False


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc); the malloc variables only stop *automatic* trimming."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may then include freed memory
        pass


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))


def _build(job: dict) -> tuple[Any, Any, dict]:
    import torch

    from benchmarks.imbalance import parse_variant
    from spt_core.data import Augment, load_dataset_info, make_loaders
    from spt_core.model import create_model

    torch.set_num_threads(job["threads"])
    balance, aug = parse_variant(job.get("variant", "none"))
    aug = aug or job.get("augment", False)  # --augment: every method of the table trains on augmented images
    n_classes = len(load_dataset_info(Path(job["data_dir"])).class_names)
    torch.manual_seed(job["seed"])  # the seeded random head, as spt_core.stages.build_model
    model, info = create_model(job["model"], n_classes, weights=job["weights"], img_size=job["img_size"])
    model.to(job["device"])
    loaders = make_loaders(
        Path(job["data_dir"]),
        info.preprocess,
        batch_size=job["batch"],
        seed=job["seed"],
        num_workers=job.get("workers", 0),
        balance=balance if job["kind"] == "train" else "none",
        augment=Augment() if aug and job["kind"] == "train" else None,
    )
    return model, info, loaders


def sensitivity_job(job: dict) -> dict:
    """Fit a linear probe head (cached features), then measure SPT sensitivity on 16 x 32 training images."""
    import torch

    from spt_core.sensitivity import measure_task

    model, _, loaders = _build(job)
    device = torch.device(job["device"])
    if device.type == "cuda":  # the peak covers the probe's feature pass too; the Σg² backward dominates it
        torch.cuda.reset_peak_memory_stats(device)
    sens = measure_task(
        model,
        loaders["train"].dataset,
        {"train": loaders["train"], "val": loaders["val"]},
        head="probe",
        probe_epochs=PROBE_EPOCHS,
        batches=SENS_BATCHES,
        batch_size=SENS_BATCH_SIZE,
        seed=job["seed"],
        device=device,
    )
    sens.save(job["sens_path"])
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
    return {
        "kind": "sensitivity",
        "seed": job["seed"],
        "seconds": sens.meta["seconds"],
        "images": sens.meta["images"],
        "probe_seconds": sens.meta["probe_seconds"],
        "probe_val_acc": sens.meta["probe_val_acc"],
        "peak_memory_mb": round(peak, 1),
    }


def train_job(job: dict) -> dict:
    """Build the model, apply the method, `fit` it; returns the row (counts, accuracies, memory, times)."""
    import torch

    from spt_core.evaluate import evaluate
    from spt_core.sensitivity import Sensitivity
    from spt_core.train import TrainConfig, fit

    t_start = time.perf_counter()
    model, _, loaders = _build(job)
    sens = Sensitivity.load(job["sens_path"]) if job["method"] in SENSITIVITY_METHODS else None
    model, minfo = setup_method(model, job["method"], job["budget"], sensitivity=sens, seed=job["seed"])
    model.to(job["device"])
    del sens
    gc.collect()
    _malloc_trim()  # freed weight/score buffers would otherwise sit in the baseline and hide training's first MBs
    base_rss = _rss_mb()
    hwm_reset = job["device"] == "cpu" and _reset_peak_rss()
    from benchmarks.imbalance import line_metrics, parse_variant

    ok_index = job.get("ok_index")
    cfg = TrainConfig.scaled(
        job["epochs"], lr=job["lr"], batch_size=job["batch"], seed=job["seed"], device=job["device"], progress=False,
        balance=parse_variant(job.get("variant", "none"))[0], select=job.get("select", "accuracy"),
    )  # fmt: skip
    curve: list[dict] = []

    def record(epoch: dict) -> None:  # --curves: the selection study's per-epoch numbers (never used to select)
        test = evaluate(model, loaders["test"], torch.device(job["device"]))
        curve.append({"epoch": epoch["epoch"], "val_acc": epoch["val_acc"], "val_loss": round(epoch["val_loss"], 6),
                      "test_acc": test["accuracy"]})  # fmt: skip
        if ok_index is not None:  # a line: balanced accuracy, and escape / overkill at that epoch's threshold
            lm = line_metrics(model, loaders, ok_index, job["max_escape_rate"])
            curve[-1].update({"val_bacc": lm["val_balanced_acc"], "test_bacc": lm["test_balanced_acc"],
                              "test_escape": lm["escape_rate"], "test_overkill": lm["overkill"]})  # fmt: skip

    hist = fit(model, loaders, cfg, None, ok_index=ok_index, max_escape_rate=job.get("max_escape_rate", 0.0),
               on_epoch=record if job.get("curves") else None)  # fmt: skip
    line = line_metrics(model, loaders, ok_index, job["max_escape_rate"]) if ok_index is not None else {}
    fit_peak = _hwm_mb() if hwm_reset else hist.peak_memory_mb
    t0 = time.perf_counter()  # one validation pass, to split s/epoch into training and validation time
    evaluate(model, loaders["val"], torch.device(job["device"]))
    val_s = time.perf_counter() - t0
    n_ep = len(hist.epochs)
    s_epoch = hist.train_seconds / n_ep
    return {
        "kind": "train",
        "method": job["method"],
        "seed": job["seed"],
        "lr": job["lr"],
        "budget": job["budget_label"],
        "budget_count": job["budget"],
        "trainable_backbone": minfo.trainable_backbone,
        "trainable_head": minfo.trainable_head,
        "trainable_pct": round(minfo.trainable_pct, 4),
        "backbone_params": minfo.backbone_params,
        "details": minfo.details,
        "val_acc": hist.best_val_acc,
        "val_loss": round(hist.best_val_loss, 6),  # the chosen epoch's
        "test_acc": hist.test_acc,
        "best_epoch": hist.best_epoch,
        "epochs": n_ep,
        "peak_memory_mb": round(hist.peak_memory_mb, 1),
        "peak_memory_kind": hist.peak_memory_kind,
        "train_overhead_mb": round(fit_peak - base_rss, 1) if job["device"] == "cpu" else None,
        "overhead_peak": "vmhwm_reset_trim" if hwm_reset else "ru_maxrss",  # ru_maxrss includes the weight-load spike
        "s_per_epoch": round(s_epoch, 2),
        "s_per_train_epoch": round(s_epoch - val_s, 2),
        "wall_s": round(time.perf_counter() - t_start, 1),
        **({"curve": curve} if curve else {}),
        **({"variant": job["variant"], "select": cfg.select, **line} if ok_index is not None else {}),
    }


def run_job(job: dict, in_process: bool, log_path: Path) -> dict:
    """One job in a fresh subprocess (own peak memory), or in this process (tests)."""
    if in_process:
        return sensitivity_job(job) if job["kind"] == "sensitivity" else train_job(job)
    env = {**os.environ, **MALLOC_ENV, "SENSITUNE_NO_PROGRESS": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        out = subprocess.run(
            [sys.executable, __file__, "--job", json.dumps(job)], env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"error": f"exit {out.returncode}, see {log_path}"}
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------------------------------------ the harness
def _versions() -> dict:
    import peft
    import timm
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "peft": peft.__version__}  # fmt: skip


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (CUDA), {os.cpu_count()} CPU cores"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores (shared with other jobs), CPU"


def log_to_mlflow(results_json: Path) -> dict:
    """`pipelines.tracking.log_benchmark` with this table's summary; prints the outcome (never raises for MLflow)."""
    from pipelines.tracking import log_benchmark

    res = log_benchmark(results_json, summary=summary_metrics(json.loads(results_json.read_text())))
    print(f"MLflow: {res['status']} {results_json.name} -> {res['tracking_uri']} run {res.get('run_id')} "
          f"({res['children']} row runs){' ' + res['error'] if 'error' in res else ''}")  # fmt: skip
    return res


def _parse_lrs(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x]
    except ValueError as e:
        raise SensituneError(f"--lr grid {s!r}: give comma-separated floats, e.g. 1e-3,3e-3") from e


def task_source(task: str, work_dir: Path, n_images: int) -> str:
    """`prepare`'s source for a task. The builtin demo set has 100 images a class; for the 1k protocol (800 + 200 +
    a test set) generate as many as the splits need, with the generator's defaults otherwise (96 px, seed 0)."""
    if task != "demo-defects":
        return task
    from spt_core.demo import DEMO_CLASSES, generate_demo_defects

    per_class = -(-n_images // len(DEMO_CLASSES))
    src = work_dir / "data" / f"demo-defects-source_{per_class}"
    if not (src / ".complete").is_file():  # a half-written folder from an interrupted run is completed in place
        generate_demo_defects(src, n_per_class=per_class)
        (src / ".complete").touch()
    return str(src)


ROWS = {False: "rows", True: "kfold"}  # where a row lives: the table's rows, or --kfold's (never in the table)


def kfold_dirs(data_dir: Path, k: int) -> tuple[list[Path], Path]:
    """K stratified folds of train+val and the refit split, prepared beside `data_dir` (seed 0, idempotent).

    Fold i trains on the other folds and validates on fold i; the refit trains on all of train+val (its val split
    is the original val, which the k-fold rule never reads). Every one keeps the original test split.

    Raises:
        SensituneError: the folds were made from another version of `data_dir` (its data hash changed).
    """
    import random

    from spt_core.data import load_dataset_info, prepare
    from spt_core.data.loaders import scan_split

    root = data_dir.parent / f"{data_dir.name}_kfold{k}"
    outs = [root / f"fold{i}" for i in range(k)] + [root / "refit"]
    info = load_dataset_info(data_dir)
    stamp = root / "source.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("data_hash") != info.data_hash:
        raise SensituneError(f"{root}: folds of another version of {data_dir}; delete {root} and run again")
    if all((d / "dataset.json").is_file() for d in outs):
        return outs[:-1], outs[-1]
    names = info.class_names
    pool = [(f"{split}_{p.name}", p, y) for split in ("train", "val") for p, y in scan_split(data_dir / split, names)]
    fold_of: dict[tuple[int, str], int] = {}  # (label, file): names are unique within a class only
    for label in range(len(names)):  # stratified: each class dealt round-robin after a seeded shuffle
        mine = sorted(n for n, _, y in pool if y == label)
        random.Random(f"{label}").shuffle(mine)
        fold_of |= {(label, n): (j + label) % k for j, n in enumerate(mine)}  # spare images spread over folds
    test = scan_split(data_dir / "test", names)
    for i, out in enumerate(outs):
        src = root / "src" / out.name
        for name, path, y in pool:
            split = "train" if i == k or fold_of[y, name] != i else "val"
            _link(src / split / names[y] / name, path)
        for path, y in scan_split(data_dir / "val", names) if i == k else []:
            _link(src / "val" / names[y] / f"val_{path.name}", path)
        for path, y in test:
            _link(src / "test" / names[y] / path.name, path)
        prepare(str(src), out, n_train=None, n_val=None, n_test=None, seed=0)
    write_json(stamp, {"data_hash": info.data_hash, "k": k})
    return outs[:-1], outs[-1]


def _link(dst: Path, target: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.is_symlink():
        dst.symlink_to(target.resolve())


def key_of(r: dict) -> tuple:
    """A row's identity in a table: (method, seed, lr, budget, variant, fold)."""
    return r.get("method"), r.get("seed"), r.get("lr"), r.get("budget"), r.get("variant", "none"), r.get("fold")


def retire(state: dict, rows: list[dict], why: str) -> None:
    """Move `rows` (objects of ``state["rows"]``) to ``state["replaced"]`` with the reason, before they re-run."""
    state["replaced"] = state.get("replaced", []) + [{**r, "replaced_because": why} for r in rows]
    state["rows"] = [r for r in state["rows"] if not any(r is x for x in rows)]


# The settings every row of one table shares: a resumed, re-run or merged table refuses rows made under others (a
# --img-size 56 run must not resume a 224 px table of the same backbone and task). Paths by file name only: a table
# travels between machines.
PROTOCOL = ("backbone", "weights", "img_size", "task", "data_dir", "budget", "epochs", "batch", "augment", "n_train",
            "device", "freeze_bn_stats", "sens_images", "imbalance", "select")  # fmt: skip
PATHS = ("weights", "data_dir")


def protocol_differences(table: dict, run: dict) -> list[str]:
    """`key=run's (table: table's)` for each PROTOCOL setting in which a run's meta differs from a table's; a setting
    an older table did not record counts as off (None)."""

    def value(meta: dict, k: str) -> Any:
        v = meta.get(k) or None
        return Path(v).name if k in PATHS and v else v

    return [f"{k}={run.get(k)!r} (table: {table.get(k)!r})" for k in PROTOCOL if value(table, k) != value(run, k)]


def write_any_report(state: dict, stem: Path) -> None:
    """stem.md/.png of a results JSON: the imbalanced-line report when its meta records `imbalance`, else the
    method table."""
    if state["meta"].get("imbalance") is not None:
        from benchmarks.imbalance import write_imbalance_report

        write_imbalance_report(state, stem)
    else:
        write_report(state, stem)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="lite0", help=f"preset ({', '.join(BACKBONES)}) or a timm model name")
    ap.add_argument("--weights", help="override the preset's weights: embedded | hub | none | PATH")
    ap.add_argument("--img-size", type=int, help="override the preset's input size")
    ap.add_argument(
        "--task", default="digits", help="digits | fashion-mnist | mnist | lfw-faces | demo-defects | a VTAB-1k dir"
    )
    ap.add_argument("--n-train", type=int, default=800)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=2000, help="test images (fewer when the source has fewer); 0 = all")
    ap.add_argument("--budget", default="1%", help="trainable backbone values: 1%%, 0.4M, 40000")
    ap.add_argument("--curve-budgets", default="", help="extra budgets for the accuracy-vs-params curve (seed 0)")
    ap.add_argument("--curve-methods", default="sparse-only,spt-lora,peft-lora")
    ap.add_argument(
        "--curve-seeds", type=int, default=1, help="seeds of the curve budgets (--seeds: the budget chosen on val)"
    )
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument(
        "--seed-start", type=int, default=0, help="run only seeds >= N at the first lr of each grid (a parallel shard)"
    )
    ap.add_argument(
        "--grid-seeds", type=int, default=1, help="seeds that run the whole lr grid (the selection study: >1)"
    )
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr-grid", default="1e-3,3e-3", help="lr grid of every method but full fine-tuning")
    ap.add_argument("--lr-grid-full", default="1e-4,3e-4", help="lr grid of full fine-tuning")
    ap.add_argument("--lr-grid-linear", default="", help="lr grid of the linear probe (default: --lr-grid)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the harness is the same)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (a GPU run: 2-4)")
    ap.add_argument(
        "--parallel", type=int, default=1, help="runs at a time (each its own process; shared CPU/GPU: times slow)"
    )
    ap.add_argument("--work-dir", type=Path, default=Path("~/.cache/sensitune-compare").expanduser())
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--in-process", action="store_true", help="no subprocesses (tests; memory is then shared)")
    ap.add_argument("--merge", type=Path, help="add the rows of a shard's JSON (from --seed-start) and rewrite")
    ap.add_argument(
        "--rerun-stale",
        action="store_true",
        help="re-run the table's rows (main budget, chosen lr) whose CPU memory was measured by an older harness "
        "(no heap trim before the baseline); the old rows are kept under 'replaced' in the JSON",
    )
    ap.add_argument(
        "--rerun-ties",
        action="store_true",
        help="re-run the rows tied on validation in a budget-on-val choice that lack val_loss (made before rows "
        "recorded it), so the tie-break is the product's; run with the table's own options; old rows kept under "
        "'replaced'",
    )
    ap.add_argument("--report-only", type=Path, help="rewrite the .md/.png of this JSON and exit")
    ap.add_argument(
        "--mlflow", action="store_true", help="log the table to MLflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    ap.add_argument("--imbalance", type=float, help="good-class fraction (e.g. 0.9): the imbalanced line protocol")
    ap.add_argument("--n-images", type=int, default=1000, help="--imbalance: images in all, good + defects")
    ap.add_argument("--split", default="0.6,0.15,0.25", help="--imbalance: train,val,test fractions per class")
    ap.add_argument("--min-per-class", type=int, default=2, help="--imbalance: fewest val and test images a class")
    ap.add_argument("--variants", default="none", help="--imbalance: <none|loss|sampler|both>[+aug], comma-separated")
    ap.add_argument("--select", default="balanced_accuracy", help="--imbalance: the epoch-selection metric")
    ap.add_argument("--max-escape-rate", type=float, default=0.005, help="--imbalance: escape ceiling on validation")
    ap.add_argument(
        "--curves",
        action="store_true",
        help="also record each epoch's val accuracy, val loss and test accuracy (for benchmarks/selection.py; "
        "selection still reads validation only; costs one test pass per epoch)",
    )
    ap.add_argument(
        "--kfold",
        type=int,
        default=0,
        help="also run K stratified folds of train+val and a refit on train+val at every lr of the grid "
        "(curves recorded; benchmarks/selection.py replays the k-fold rule)",
    )
    ap.add_argument("--kfold-seeds", type=int, default=0, help="seeds of the --kfold runs (default: --grid-seeds)")
    ap.add_argument(
        "--augment",
        action="store_true",
        help="train every method on augmented images (timm flips, scale/aspect and colour jitter; "
        "`spt_core.data.Augment`); the table is <task>-aug",
    )
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kfold == 1 or args.kfold < 0:
        raise SensituneError(f"--kfold {args.kfold}: give 2 or more folds (0: no k-fold runs)")
    if args.parallel < 1:
        raise SensituneError(f"--parallel {args.parallel}: give 1 or more runs at a time")
    if args.job:
        job = json.loads(args.job)
        print("RESULT " + json.dumps(sensitivity_job(job) if job["kind"] == "sensitivity" else train_job(job)))
        return Path()
    if args.report_only:
        write_any_report(json.loads(args.report_only.read_text()), args.report_only.with_suffix(""))
        if args.mlflow:
            log_to_mlflow(args.report_only)
        return args.report_only

    from spt_core.data import prepare
    from spt_core.plan import parse_budget

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SensituneError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    name, weights, img = BACKBONES.get(args.backbone, (args.backbone, "hub", None))
    weights, img = args.weights or weights, args.img_size or img
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SensituneError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    task_slug = Path(args.task).name if Path(args.task).is_dir() else args.task
    line: dict[str, Any] = {}
    if args.imbalance is not None:
        from benchmarks.imbalance import imbalanced_source, parse_variant

        for v in args.variants.split(","):
            parse_variant(v)
        task_slug = f"{task_slug}-imbalanced{round(100 * args.imbalance)}"
    if args.augment:
        task_slug += "-aug"
    slug = f"{args.backbone.replace('/', '-')}_{task_slug}"
    work = args.work_dir / slug
    if args.imbalance is not None:
        split = [float(x) for x in args.split.split(",")]
        src, ok_class, counts = imbalanced_source(args.task, args.work_dir, args.n_images, args.imbalance)
        data_dir = args.work_dir / "data" / f"{task_slug}_{args.n_images}_{args.split}_{args.min_per_class}"
        if not (data_dir / "dataset.json").is_file():
            prepare(src, data_dir, split=split, min_per_class=args.min_per_class, ok_class=ok_class, seed=0)
        ds = json.loads((data_dir / "dataset.json").read_text())
        line = {"imbalance": args.imbalance, "ok_class": ok_class, "counts": counts, "split": split,
                "min_per_class": args.min_per_class, "split_counts": ds["counts"], "select": args.select,
                "max_escape_rate": args.max_escape_rate, "variants": args.variants}  # fmt: skip
    else:
        data_dir = args.work_dir / "data" / f"{task_slug}_{args.n_train}_{args.n_val}_{args.n_test}"
    if not (data_dir / "dataset.json").is_file():
        prepare(task_source(args.task, args.work_dir, args.n_train + args.n_val + (args.n_test or 2000)), data_dir,
                n_train=args.n_train, n_val=args.n_val, n_test=args.n_test or None, seed=0)  # fmt: skip
    out_json = args.out_dir / f"compare_{slug}.json"
    state = json.loads(out_json.read_text()) if out_json.is_file() else {"rows": [], "sensitivity": []}
    command = (
        " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
        + " python "
        + " ".join(["benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])])
    )
    old_meta = state.get("meta")
    meta = {
        "command": command, "machine": _machine(args.device), "versions": _versions(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "backbone": name,
        "weights": weights, "img_size": img, "task": args.task, "data_dir": str(data_dir), "budget": args.budget,
        "epochs": args.epochs, "batch": args.batch, "device": args.device, "threads": args.threads,
        "freeze_bn_stats": True, "sens_images": SENS_BATCHES * SENS_BATCH_SIZE, "n_train": args.n_train,
        "parallel": args.parallel, "augment": args.augment, **line,
    }  # fmt: skip
    differ = protocol_differences(old_meta, meta) if old_meta else []
    if args.merge and not differ:  # the shard's rows too
        shard = json.loads(args.merge.read_text())["meta"]
        differ = [f"{args.merge.name}: {d}" for d in protocol_differences(old_meta or meta, shard)]
    if differ:
        raise SensituneError(f"{out_json}: made with other settings ({', '.join(differ)}); give the table's own "
                             "options, or another --out-dir")  # fmt: skip
    state["meta"] = meta
    if args.imbalance is not None:
        ds = json.loads((data_dir / "dataset.json").read_text())
        line_job = {"ok_index": ds["class_names"].index(line["ok_class"]), "select": args.select,
                    "max_escape_rate": args.max_escape_rate}  # fmt: skip
    else:
        line_job = {}
    work.mkdir(parents=True, exist_ok=True)
    kfold: dict[int | str, Path] = {}  # --kfold: fold -> data dir, filled before the k-fold runs
    if args.kfold and args.imbalance is not None:
        raise SensituneError("--kfold: not with --imbalance (its folds would need the proportional split)")
    ran_k = {r.get("k") for r in state.get("kfold", [])}
    if args.kfold and ran_k - {args.kfold}:
        raise SensituneError(f"--kfold {args.kfold}: {out_json} holds k-fold rows of K={sorted(ran_k)}; use that K")
    if args.kfold:
        state["meta"]["kfold"] = args.kfold
    base = {"model": name, "weights": weights, "img_size": img, "data_dir": str(data_dir), "epochs": args.epochs,
            "batch": args.batch, "device": args.device, "threads": args.threads, "workers": args.workers,
            "curves": args.curves, "augment": args.augment}  # fmt: skip

    def save() -> None:
        write_json(out_json, state)
        write_any_report(state, args.out_dir / f"compare_{slug}")

    def backbone_total() -> int:
        from spt_core.candidates import count_backbone_params
        from spt_core.model import create_model

        return count_backbone_params(create_model(name, 10, weights="none", img_size=img)[0])

    n_backbone = backbone_total()

    def job_log(name: str) -> Path:  # one stderr log per job: parallel jobs never interleave
        return work / "logs" / (re.sub(r"[^A-Za-z0-9._%-]+", "_", name) + ".log")

    def sens_path(seed: int) -> Path:
        return work / f"sensitivity_seed{seed}.safetensors"

    def ensure_sensitivity(seed: int) -> None:
        path = sens_path(seed)
        if not path.is_file():
            row = run_job({**base, "kind": "sensitivity", "seed": seed, "sens_path": str(path)}, args.in_process,
                          job_log(f"sensitivity_seed{seed}"))  # fmt: skip
            row = {"seed": seed, **row}  # failed passes too, so that a retry replaces them
            print(f"[{slug}] sensitivity seed {seed}: {row}", flush=True)
            state["sensitivity"] = [s for s in state["sensitivity"] if s.get("seed") != seed] + [row]
            save()

    lock = threading.Lock()  # --parallel: jobs run in subprocesses, their rows are added here one at a time

    def done(key: tuple) -> bool:  # a failed run is retried by the next invocation
        return any(key_of(r) == key and "error" not in r for r in state.get(ROWS[key[5] is not None], []))

    def run(method: str, seed: int, lr: float, budget: str, variant: str = "none", fold: int | str | None = None
            ) -> None:  # fmt: skip
        job = {**base, "kind": "train", "method": method, "seed": seed, "lr": lr, "budget_label": budget,
               "budget": parse_budget(budget, n_backbone), "variant": variant, **line_job}  # fmt: skip
        if fold is not None:  # --kfold: a fold (or the refit on train+val), curves recorded for the replay
            job.update({"data_dir": str(kfold[fold]), "curves": True})
        t0 = time.time()
        if method in SENSITIVITY_METHODS:
            job["sens_path"] = str(sens_path(seed))
        name = f"{method}_{variant}_seed{seed}_lr{lr:g}_{budget}" + ("" if fold is None else f"_fold{fold}")
        if method in SENSITIVITY_METHODS and not sens_path(seed).is_file():
            row = {"error": f"no sensitivity pass for seed {seed}: see {job_log(f'sensitivity_seed{seed}')}"}
        else:
            row = run_job(job, args.in_process, job_log(name))
        # where and when it ran: a resumed table can hold rows of several invocations (machines)
        row.update({"method": method, "seed": seed, "lr": lr, "budget": budget, "variant": variant,
                    "machine": state["meta"]["machine"],
                    "parallel": args.parallel, "started": round(t0, 1), "finished": round(time.time(), 1)})  # fmt: skip
        if fold is not None:
            row.update({"fold": fold, "k": args.kfold})
        with lock:
            print(f"[{slug}] {json.dumps(row)}", flush=True)
            rows = ROWS[fold is not None]
            state[rows] = [r for r in state.get(rows, []) if key_of(r) != key_of(row)] + [row]
            save()

    def run_all(keys: list[tuple]) -> None:
        """The (method, seed, lr, budget[, variant[, fold]]) runs not yet in the JSON, up to --parallel at a time."""
        keys = [(*k, "none", None) if len(k) == 4 else (*k, None)[:6] for k in keys]  # variant "none", fold None
        todo = [k for k in dict.fromkeys(keys) if not done(k)]
        for seed in sorted({k[1] for k in todo if k[0] in SENSITIVITY_METHODS}):
            ensure_sensitivity(seed)  # before the runs that read it, never two passes of one seed at once
        with ThreadPoolExecutor(max_workers=1 if args.in_process else args.parallel) as ex:
            list(ex.map(lambda k: run(*k), todo))

    if args.merge:
        state["meta"] = old_meta or state["meta"]  # the run's own command, machine and date stay
        other = json.loads(args.merge.read_text())
        for name, key in (("rows", key_of), ("kfold", key_of), ("sensitivity", lambda r: r.get("seed"))):
            state.setdefault(name, [])
            for r in other.get(name, []):  # a shard's row is added, and replaces a failed row of the same key
                mine = next((x for x in state[name] if key(x) == key(r)), None)
                if mine is None or ("error" in mine and "error" not in r):
                    state[name] = [x for x in state[name] if key(x) != key(r)] + [r]
        state["meta"]["command"] += f"  # + rows of {args.merge.name}: `{other['meta']['command']}`"
        save()
        return out_json
    if args.rerun_ties:
        if old_meta is None:
            raise SensituneError(f"--rerun-ties: no table at {out_json}; copy the table's JSON into --out-dir")
        state["meta"] = {**old_meta, "command": old_meta["command"] + f"  # + --rerun-ties: `{command}`"}
        tied = rows_tied_without_loss(state)
        retire(state, tied, "tied on validation in a budget-on-val choice, recorded no val_loss")
        print(f"[{slug}] re-running {len(tied)} tied rows without a validation loss", flush=True)
        run_all([key_of(r) for r in tied])
        for old in tied:  # same seed, code path and threads: the run should reproduce its validation accuracy
            new = next((r for r in state["rows"] if key_of(r) == key_of(old)), {})
            if new.get("val_acc") != old["val_acc"]:
                print(f"[{slug}] {key_of(old)}: val_acc {old['val_acc']} -> {new.get('val_acc')}", flush=True)
        left = rows_tied_without_loss(state)  # a changed val_acc can move an lr or make a new tie
        if left:
            print(f"[{slug}] {len(left)} tied rows still without a loss: run --rerun-ties again", flush=True)
        save()
        return out_json
    if args.rerun_stale:
        lrs = {m: chosen_lr(state["rows"], m, args.budget) for m in methods}
        stale = [
            r for r in state["rows"]
            if "error" not in r and r["budget"] == args.budget and r.get("train_overhead_mb") is not None
            and r.get("overhead_peak") != "vmhwm_reset_trim" and r["lr"] == lrs.get(r["method"])
        ]  # fmt: skip
        retire(state, stale, "memory baseline without heap trim")
        print(f"[{slug}] re-running {len(stale)} rows measured by an older harness", flush=True)
    grid = {m: _parse_lrs(args.lr_grid_full if m in FULL_LR_METHODS else args.lr_grid) for m in methods}
    if "linear" in grid and args.lr_grid_linear:  # a probe is cheap (no backward through the backbone)
        grid["linear"] = _parse_lrs(args.lr_grid_linear)
    if args.seed_start > 0:  # a shard for the later seeds, run beside the seed-0 process; merge with --merge
        run_all([(m, seed, grid[m][0], args.budget) for seed in range(args.seed_start, args.seeds) for m in methods])
        save()
        return out_json
    variants = args.variants.split(",") if args.imbalance is not None else ["none"]
    # seed 0 (or --grid-seeds): the lr grid, chosen on seed-0 val
    run_all([(m, seed, lr, args.budget, v) for seed in range(args.grid_seeds) for v in variants for m in methods
             for lr in grid[m]])  # fmt: skip

    def at_chosen_lr(seeds: range, budget: str) -> list[tuple]:
        lrs = {(m, v): chosen_lr(state["rows"], m, args.budget, v) for m in methods for v in variants}
        return [(m, seed, lrs[m, v], budget, v) for seed in seeds for v in variants for m in methods
                if lrs[m, v] is not None]  # fmt: skip

    run_all(at_chosen_lr(range(1, args.seeds), args.budget))
    if args.kfold:  # every fold and the refit, at every lr of the grid: selection.py replays the k-fold rule
        folds, refit = kfold_dirs(data_dir, args.kfold)
        kfold.update({**dict(enumerate(folds)), "refit": refit})
        run_all([(m, seed, lr, args.budget, "none", fold) for seed in range(args.kfold_seeds or args.grid_seeds)
                 for m in methods for lr in grid[m] for fold in [*range(args.kfold), "refit"]])  # fmt: skip
    curve_methods = [m for m in args.curve_methods.split(",") if m]
    for budget in [b for b in args.curve_budgets.split(",") if b]:
        run_all([k for k in at_chosen_lr(range(args.curve_seeds), budget) if k[0] in curve_methods])
    save()
    if args.mlflow:
        log_to_mlflow(out_json)
    return out_json


if __name__ == "__main__":
    try:
        main()
    except SensituneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
