"""The method against its baselines at equal budget: accuracy, memory and speed, one backbone x one task per run.

For a backbone, a task and a budget, runs every method of `benchmarks/methods.py` (linear probe, BitFit, full
fine-tuning, peft LoRA, random sparse, SPT-LoRA, SPT-Adapter, sparse-only) with the same data, epochs, schedule
(`spt_core.train.fit`, `TrainConfig.scaled`) and validation-only epoch selection; only the learning rate differs,
chosen per method from a small grid on validation accuracy with seed 0, then reused for the other seeds.
BatchNorm running statistics stay frozen for every method, full fine-tuning included.

With ``--imbalance 0.9`` the task becomes a line's data (`benchmarks/imbalance.py`: one good class at 90 %, few
defects, a proportional split) and every method runs in each ``--variants`` (class balancing, augmentation); rows
then add balanced accuracy and escape rate / overkill at the validation-chosen threshold.

Each (method, seed, lr) and each sensitivity pass runs in its own subprocess (`benchmarks/jobs.py`) so that its
peak memory (CPU: ru_maxrss; CUDA: max_memory_allocated) is its own. Rows are appended to the JSON as they finish
(`benchmarks/harness.py`); a re-run skips rows already there (resume), and refuses a table made with other settings
(`benchmarks/protocol.py`: input size, epochs, data, ...). The tables are written by `benchmarks/report.py`.
Writes benchmarks/results/compare_<backbone>_<task>.{json,md,png}.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
      .venv/bin/python benchmarks/compare.py --backbone lite0 --task digits --budget 2% --seeds 2 --epochs 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import Table, merge, rerun, retire_stale, run_protocol, run_shard
from benchmarks.methods import FULL_LR_METHODS, GAP_METHODS, METHODS
from benchmarks.protocol import (
    BACKBONES,
    MALLOC_ENV,
    SENS_BATCH_SIZE,
    SENS_BATCHES,
    cpu_info,
    protocol_differences,
    script,
)  # fmt: skip
from benchmarks.report import write_any_report
from benchmarks.search_job import SEARCH_METHODS
from benchmarks.task_data import task_source
from spt_core.portable.errors import SensituneError

RESULTS = Path(__file__).resolve().parent / "results"


def build_parser() -> argparse.ArgumentParser:
    """Every option of a table run."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="lite0", help=f"preset ({', '.join(BACKBONES)}) or a timm model name")
    ap.add_argument("--weights", help="override the preset's weights: embedded | hub | none | PATH")
    ap.add_argument("--img-size", type=int, help="override the preset's input size")
    ap.add_argument(
        "--task",
        default="digits",
        help="digits | fashion-mnist | mnist | lfw-faces | demo-defects | a VTAB-1k dir; held out (never choose a "
        "default, benchmarks/README.md): elpv | animal-shapes",
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
    ap.add_argument("--lr-auto", default="1e-3", help="lr of auto-halving (train.lr; it tries train.lr_grid x it)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the harness is the same)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (a GPU run: 2-4)")
    ap.add_argument(
        "--parallel", type=int, default=1, help="runs at a time (each its own process; shared CPU/GPU: times slow)"
    )
    ap.add_argument("--work-dir", type=Path, default=Path("~/.cache/sensitune-compare").expanduser())
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
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
    ap.add_argument(
        "--rerun-lossless",
        action="store_true",
        help="re-run every row the table's numbers rest on (each method's seed-0 grid, its chosen-lr rows, the "
        "budget-on-val candidates) that lacks val_loss, of every method alike, so every choice is the product's; "
        "with the table's own options; old rows kept under 'replaced'",
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
    return ap


def _check(args: argparse.Namespace) -> list[str]:
    """The options that need no data, checked first; returns the methods."""
    if args.kfold == 1 or args.kfold < 0:
        raise SensituneError(f"--kfold {args.kfold}: give 2 or more folds (0: no k-fold runs)")
    if args.parallel < 1:
        raise SensituneError(f"--parallel {args.parallel}: give 1 or more runs at a time")
    return [m for m in args.methods.split(",") if m]


def prepare_table_data(args: argparse.Namespace, task_slug: str) -> tuple[Path, dict[str, Any]]:
    """The table's prepared split (made once under --work-dir) and, with --imbalance, the line's settings."""
    from spt_core.api import prepare

    line: dict[str, Any] = {}
    if args.imbalance is not None:
        from benchmarks.imbalance import imbalanced_source

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
                n_train=args.n_train, n_val=args.n_val, n_test=args.n_test or None, seed=0, split=None,
                ok_class=None)  # fmt: skip
    return data_dir, line


def table_slug(args: argparse.Namespace) -> tuple[str, str]:
    """(<backbone>_<task>, <task>): the table's name; --imbalance and --augment make other tables."""
    if args.imbalance is not None:
        from benchmarks.imbalance import parse_variant

        for v in args.variants.split(","):
            parse_variant(v)
    task_slug = task_name(args.task, args.imbalance, args.augment)
    return f"{args.backbone.replace('/', '-')}_{task_slug}", task_slug


def task_name(task: str, imbalance: float | None, augment: bool) -> str:
    """A table's task as its file names it (`table_slug`, or a table's meta): a folder by its name, then
    -imbalanced<percent> (--imbalance) and -aug (--augment)."""
    name = Path(task).name if Path(task).is_dir() else task
    if imbalance is not None:
        name = f"{name}-imbalanced{round(100 * imbalance)}"
    return f"{name}-aug" if augment else name


def open_table(args: argparse.Namespace, methods: list[str], command: str) -> tuple[Table, dict | None]:
    """The table these options fill, its data prepared and its protocol checked against the JSON already there
    (and a --merge shard's); returns it with the meta the JSON had (None for a new table)."""
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SensituneError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    name, weights, img = BACKBONES.get(args.backbone, (args.backbone, "hub", None))
    weights, img = args.weights or weights, args.img_size or img
    known = (*METHODS, *SEARCH_METHODS, *GAP_METHODS)
    bad = [m for m in methods if m not in known]
    if bad:
        raise SensituneError(f"--methods: unknown {bad}; choose from {', '.join(known)}")
    slug, task_slug = table_slug(args)
    data_dir, line = prepare_table_data(args, task_slug)
    out_json = args.out_dir / f"compare_{slug}.json"
    state = json.loads(out_json.read_text()) if out_json.is_file() else {"rows": [], "sensitivity": []}
    old_meta = state.get("meta")
    meta = {
        "command": command, "machine": machine_label(args.device), "versions": _versions(),
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
    line_job = {}
    if args.imbalance is not None:
        ds = json.loads((data_dir / "dataset.json").read_text())
        line_job = {"ok_index": ds["class_names"].index(line["ok_class"]), "select": args.select,
                    "max_escape_rate": args.max_escape_rate}  # fmt: skip
    work = args.work_dir / slug
    work.mkdir(parents=True, exist_ok=True)
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
    table = Table(state, out_json, work, slug, base, line_job, _backbone_total(name, img), args.in_process,
                  args.parallel, args.kfold)  # fmt: skip
    return table, old_meta


def lr_grids(args: argparse.Namespace, methods: list[str]) -> dict[str, list[float]]:
    """Each method's lr grid: --lr-grid-full for full fine-tuning, --lr-grid-linear (if given) for the probe."""
    grid = {m: _parse_lrs(args.lr_grid_full if m in FULL_LR_METHODS else args.lr_grid) for m in methods}
    grid.update({m: _parse_lrs(args.lr_auto) for m in methods if m in SEARCH_METHODS})  # its own lr grid inside
    if "linear" in grid and args.lr_grid_linear:  # a probe is cheap (no backward through the backbone)
        grid["linear"] = _parse_lrs(args.lr_grid_linear)
    return grid


def main(argv: list[str] | None = None) -> Path:
    """Fill (or resume, merge, re-run) one table; returns its JSON path (--report-only: the given JSON)."""
    args = build_parser().parse_args(argv)
    methods = _check(args)
    if args.report_only:
        write_any_report(json.loads(args.report_only.read_text()), args.report_only.with_suffix(""))
        if args.mlflow:
            from benchmarks.tracking import log_table

            log_table(args.report_only)
        return args.report_only
    command = (
        " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
        + " python "
        + " ".join(["benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])])
    )
    table, old_meta = open_table(args, methods, command)
    if args.merge:
        merge(table, old_meta, args.merge)
        return table.out_json
    if args.rerun_ties or args.rerun_lossless:
        rerun(table, old_meta, command, "ties" if args.rerun_ties else "lossless")
        return table.out_json
    if args.rerun_stale:
        retire_stale(table, methods, args.budget)
    grid = lr_grids(args, methods)
    if args.seed_start > 0:  # a shard for the later seeds, run beside the seed-0 process; merge with --merge
        run_shard(table, methods, grid, args.budget, range(args.seed_start, args.seeds))
        return table.out_json
    run_protocol(table, args, methods, grid)
    if args.mlflow:
        from benchmarks.tracking import log_table

        log_table(table.out_json)
    return table.out_json


def _backbone_total(name: str, img: int | None) -> int:
    """The backbone's values, counted on a randomly initialised copy (a budget such as "2%" is a share of them)."""
    from spt_core.api import count_backbone_params, create_model

    return count_backbone_params(create_model(name, 10, weights="none", img_size=img)[0])


def _versions() -> dict:
    import peft
    import timm
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "peft": peft.__version__}  # fmt: skip


def machine_label(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (CUDA), {os.cpu_count()} CPU cores"
    return f"{cpu_info()[0]}, {os.cpu_count()} cores (shared with other jobs), CPU"


def _parse_lrs(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x]
    except ValueError as e:
        raise SensituneError(f"--lr grid {s!r}: give comma-separated floats, e.g. 1e-3,3e-3") from e


if __name__ == "__main__":
    script(main)
