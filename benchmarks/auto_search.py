"""Is the halving search worth making the default? Per table: the (budget, lr) it chooses on validation, its
validation and test accuracy, what it costs in trainings (the trials' optimizer steps over one training's) and its
wall time against one fixed-budget training.

Each table is a `benchmarks/compare.py` run of two methods at ``train.lr`` (params.yaml's): ``per-row-sparse`` at
the main budget (the product's fixed default, one training) and ``auto-halving`` (`benchmarks/search_job.py`: the
product's ``plan.ladder`` x ``train.lr_grid``, the full rung at each lr as the product trains it). The tables go to
``--out-dir`` (benchmarks/results/auto_search/fair/ by default, so the method tables are left as they are; round
1's schedule, which cut inside the warm-up, is in benchmarks/results/auto_search/); this script adds auto_search.md
beside them, one row per table and seed. Options other than its own go to compare.py:

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
      .venv/bin/python benchmarks/auto_search.py --tasks digits,fashion-mnist -- --backbone lite0 --epochs 8 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import compare
from benchmarks.protocol import script
from benchmarks.search_job import SEARCH_METHODS
from spt_core.portable.errors import SensituneError
from spt_core.portable.io import atomic_path

FIXED = "per-row-sparse"  # the product's default plan at a fixed budget (plan.allocation: per_row, sparse)


def run_tables(tasks: list[str], compare_argv: list[str], out_dir: Path) -> list[Path]:
    """One compare.py table per task (resumable: rows already there are kept), both methods at ``train.lr``."""
    from pipelines.config import defaults

    lr = f"{defaults()['train']['lr']:g}"
    methods = ",".join([FIXED, *SEARCH_METHODS])
    # every seed on the one-lr grid: otherwise seeds 1.. take the lr seed 0 chose among every lr in the table, an
    # earlier train.lr's rows included, and a re-run after train.lr changed would measure seed 0 alone
    seeds = compare.build_parser().parse_known_args(compare_argv)[0].seeds
    every = [] if any(a.startswith("--grid-seeds") for a in compare_argv) else ["--grid-seeds", str(seeds)]
    return [compare.main([*compare_argv, *every, "--task", task, "--methods", methods, "--lr-grid", lr, "--lr-auto",
                          lr, "--out-dir", str(out_dir)]) for task in tasks]  # fmt: skip


def summary_rows(table: dict) -> list[dict]:
    """Per search row of a table: its choice, accuracies and cost, and the fixed-budget row of its seed."""
    ok = [r for r in table["rows"] if "error" not in r]
    meta = table["meta"]
    budget, task = meta["budget"], compare.task_name(meta["task"], meta.get("imbalance"), meta.get("augment", False))
    # a line table's rows also differ by variant (--variants: class balancing, augmentation)
    fixed = {(r["seed"], r["lr"], r.get("variant")): r for r in ok if r["method"] == FIXED and r["budget"] == budget}
    out = []
    for r in sorted((r for r in ok if r["method"] in SEARCH_METHODS), key=lambda r: (r["lr"], r["seed"])):
        f = fixed.get((r["seed"], r["lr"], r.get("variant")))  # same seed, variant and train.lr (a re-run)
        out.append({"table": f"{Path(meta['backbone']).name} {task}", "seed": r["seed"], "train_lr": r["lr"],
                    "budget": r["details"]["chosen_budget"], "lr": r["details"]["chosen_lr"], "val": r["val_acc"],
                    "test": r["test_acc"], "trainings": r["trainings"], "wall_s": r["wall_s"],
                    "fixed_val": f and f["val_acc"], "fixed_test": f and f["test_acc"],
                    "fixed_wall_s": f and f["wall_s"],
                    # a line table (--imbalance) is read, its trials judged, by balanced accuracy: both rows carry it
                    "val_bal": r.get("val_balanced_acc"), "fixed_val_bal": f and f.get("val_balanced_acc"),
                    "test_bal": r.get("test_balanced_acc"), "fixed_test_bal": f and f.get("test_balanced_acc")})
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def write_summary(rows: list[dict], command: str, path: Path) -> None:
    """auto_search.md: one line per table and seed."""
    lines = [
        "# The halving search (`plan.search: halving`) against one fixed-budget training", "",
        f"Command: `{command}`", "",
        "Search: the product's `plan.ladder` x `train.lr_grid` at `train.lr`, successive halving on validation "
        "(`spt_core.search`: at most 2 trainings, no trial judged before its warm-up's end). "
        f"Fixed: `{FIXED}` at the table's main budget and `train.lr`, one training. Wall: each job's own seconds, "
        "same machine. Every table in this folder; each `compare_*.md` beside this file has the command that made "
        "it (the line above is the last run).", "",
        "| table | train.lr | seed | chosen budget | chosen lr | val % | fixed val % | test % | fixed test % | "
        "val bal. % | fixed val bal. % | test bal. % | fixed test bal. % | trainings | wall s | x fixed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        cells = " | ".join(_pct(r[k]) for k in ("val", "fixed_val", "test", "fixed_test", "val_bal", "fixed_val_bal",
                                                "test_bal", "fixed_test_bal"))  # fmt: skip
        ratio = f"{r['wall_s'] / r['fixed_wall_s']:.2f}" if r["fixed_wall_s"] else "-"
        lines.append(f"| {r['table']} | {r['train_lr']:.3g} | {r['seed']} | {r['budget']} | {r['lr']:.3g} | {cells} | "
                     f"{r['trainings']:.2f} | {r['wall_s']:.0f} | {ratio} |")  # fmt: skip
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> Path:
    """Run (or resume) every table, then write auto_search.md; returns its path."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="digits", help="comma-separated compare.py --task values, one table each")
    ap.add_argument("--out-dir", type=Path, default=compare.RESULTS / "auto_search" / "fair")
    args = ap.parse_args(own)
    if any(a in rest for a in ("--task", "--methods", "--lr-grid", "--lr-auto", "--out-dir")):
        raise SensituneError("auto_search.py sets --task, --methods, --lr-grid, --lr-auto and --out-dir itself: "
                             "give the tasks with --tasks and the directory before --")  # fmt: skip
    run_tables([t for t in args.tasks.split(",") if t], rest, args.out_dir)
    # every table in the folder, this run's and earlier ones' (tables that need other --n-test values run apart)
    rows = [r for p in sorted(args.out_dir.glob("compare_*.json")) for r in summary_rows(json.loads(p.read_text()))]
    out = args.out_dir / "auto_search.md"
    write_summary(rows, "python benchmarks/auto_search.py " + " ".join(argv), out)
    return out


if __name__ == "__main__":
    script(main)
