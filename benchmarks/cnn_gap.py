"""The CNN gap at a fixed budget: what else should a small budget include on a CNN? (benchmarks/README.md, "CNN gap
study", declared before its first row.)

Per table, one `benchmarks/compare.py` run of per-row sparse (the default plan) and its `GAP_METHODS` variants at
the table's main budget, each at the lr the table chose for per-row sparse on validation (`--lr-grid` of one
value: the base method's lr favours the base), 3 seeds, with the table's own protocol options (its recorded
command) and fresh sensitivity passes shared by every method of a seed (the stem variant: a pass that measured the
stem too). The base is re-run beside its variants, so each difference is paired: same passes, same lr, same box.

The rule (declared in advance): a variant's score on a table is its mean VALIDATION accuracy over the seeds minus
per-row sparse's. It becomes the default (params.yaml ``plan.whole`` / ``plan.row_k``) when its worst score over the
choosing tables (`CHOOSING`) is above 0; of several, the best worst score. The held-out tables (`HELD_OUT_TASKS`)
never choose: they report the test difference of the pick, and of every variant. A variant that cannot be
allocated at the budget (the depthwise kernels alone are 5.4 % of Lite0's backbone) is reported as not run.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
      .venv/bin/python -m benchmarks.cnn_gap --tasks mnist,fashion-mnist,animal-shapes,elpv --parallel 2
    .venv/bin/python -m benchmarks.cnn_gap --report-only    # cnn_gap.md from the tables in --out-dir
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from benchmarks import compare
from benchmarks.heldout_tasks import HELD_OUT_TASKS
from benchmarks.methods import GAP_METHODS
from benchmarks.protocol import script
from benchmarks.report import chosen_lr
from spt_core.portable.errors import SensituneError
from spt_core.portable.io import atomic_path

BASE = "per-row-sparse"
CHOOSING = ("mnist", "fashion-mnist")  # the choosing Lite0 tables furthest from a saturated validation split
OUT = compare.RESULTS / "cnn_gap"
# the table's protocol options carried over from its recorded command (the rest is this study's)
CARRY = ("backbone", "task", "n_train", "n_val", "n_test", "budget", "epochs", "batch", "img_size", "threads")


def study_argv(meta: dict, rows: list[dict], methods: list[str], out_dir: Path, work_dir: Path, parallel: int
               ) -> list[str]:  # fmt: skip
    """compare.py's options for the study on a table: its protocol, per-row sparse's chosen lr, 3 seeds."""
    from benchmarks.product import table_args

    args = table_args(meta)
    lr = chosen_lr(rows, BASE, meta["budget"])
    if lr is None:
        raise SensituneError(f"{meta['task']}: the table has no {BASE} rows to take the lr from")
    argv = [w for k in CARRY if getattr(args, k, None) is not None
            for w in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]  # fmt: skip
    return [*argv, "--methods", ",".join([BASE, *methods]), "--lr-grid", f"{lr:g}", "--seeds", "3",
            "--parallel", str(parallel), "--work-dir", str(work_dir), "--out-dir", str(out_dir)]  # fmt: skip


def scores(state: dict, split: str) -> dict[str, float]:
    """method -> mean accuracy % over its seeds on `split` at the main budget (methods with all 3 seeds)."""
    from benchmarks.report import summarize

    return {s["method"]: 100 * sum(r[f"{split}_acc"] for r in s["rows"]) / len(s["rows"])
            for s in summarize(state) if len(s["rows"]) == 3}  # fmt: skip


def pick(states: dict[str, dict]) -> tuple[str | None, dict[str, float]]:
    """(the variant the rule adopts or None, variant -> worst validation score over the choosing tables)."""
    chosen = [states[t] for t in CHOOSING if t in states and BASE in scores(states[t], "val")]  # base: 3 seeds
    if len(chosen) < len(CHOOSING):
        return None, {}
    worst = {}
    for v in GAP_METHODS:
        gaps = [(val := scores(s, "val")).get(v, float("nan")) - val[BASE] for s in chosen]
        if all(g == g for g in gaps):  # ran on every choosing table
            worst[v] = min(gaps)
    best = max(worst, key=lambda v: worst[v], default=None)
    return (best if best is not None and worst[best] > 0 else None), worst


def why_failed(row: dict) -> str:
    """A failed row's reason: its job log's last line (the exception) when the log is here, else its error."""
    log = Path(row["error"].rpartition("see ")[2])
    last = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
    return (last[0].rpartition("Error: ")[2] if last else row["error"]).replace("|", "/")[:120]


def report(states: dict[str, dict]) -> str:
    """cnn_gap.md: per table and variant, validation and test differences to the base; the pick."""
    adopted, worst = pick(states)
    lines = ["# The CNN gap at a fixed budget: per-row sparse and what else the budget might include", "",
             "Generated by `python -m benchmarks.cnn_gap` (module docstring: the protocol and the rule). Accuracy %, "
             "mean of 3 seeds; each variant minus per-row sparse, paired (same sensitivity passes, lr and box).", "",
             "| table | role | lr | per-row val | per-row test | variant | val diff | test diff |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for task, state in states.items():
        val, test = scores(state, "val"), scores(state, "test")
        if BASE not in val:
            continue
        role = "choosing" if task in CHOOSING else "held out" if task in HELD_OUT_TASKS else "other"
        lr = chosen_lr(state["rows"], BASE, state["meta"]["budget"])
        for v in GAP_METHODS:
            errors = [why_failed(r) for r in state["rows"] if r["method"] == v and "error" in r]
            cell = (f"{val[v] - val[BASE]:+.2f} | {test[v] - test[BASE]:+.2f}" if v in val else
                    f"not run: {errors[0]} | -" if errors else "- | -")  # fmt: skip
            lines.append(f"| {task} | {role} | {lr:g} | {val[BASE]:.2f} | {test[BASE]:.2f} | {v} | {cell} |")
    none = ("none (no variant is above per-row sparse on every choosing table)" if worst else
            "not decided yet (not every choosing table has all its rows)")  # fmt: skip
    lines += ["", "Worst validation difference over the choosing tables (" + ", ".join(CHOOSING) + "): " +
              (", ".join(f"{v} {w:+.2f}" for v, w in worst.items()) or "not all choosing tables ran") + ".",
              "", f"Adopted as the default: {adopted or none}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def load_states(out_dir: Path) -> dict[str, dict]:
    states = {}
    for p in sorted(out_dir.glob("compare_*.json")):
        state = json.loads(p.read_text())
        states[state["meta"]["task"]] = state
    return states


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join([*CHOOSING, *HELD_OUT_TASKS]), help="Lite0 tables, comma-separated")
    ap.add_argument("--backbone", default="lite0")
    ap.add_argument("--methods", default=",".join(GAP_METHODS), help="the variants to run beside per-row sparse")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--work-dir", type=Path, default=Path("~/.cache/sensitune-cnn-gap").expanduser())
    ap.add_argument("--out-dir", type=Path, default=OUT)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if bad := [m for m in methods if m not in GAP_METHODS]:
        raise SensituneError(f"--methods: unknown {bad}; choose from {', '.join(GAP_METHODS)}")
    if not args.report_only:
        for task in args.tasks.split(","):
            table = compare.RESULTS / f"compare_{args.backbone}_{task}.json"
            if not table.is_file():
                raise SensituneError(f"{table}: no such table; --tasks names committed Lite0 tables")
            state = json.loads(table.read_text())
            argv_ = study_argv(state["meta"], state["rows"], methods, args.out_dir, args.work_dir, args.parallel)
            print("compare.py " + shlex.join(argv_), flush=True)
            compare.main(argv_)
    out = args.out_dir / "cnn_gap.md"
    with atomic_path(out) as tmp:
        tmp.write_text(report(load_states(args.out_dir)))
    return out


if __name__ == "__main__":
    script(main)
