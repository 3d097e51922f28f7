"""Which setting of the shipped recipe keeps `sensitune run` at its own linear probe? (benchmarks/README.md, "Recipe
study", declared before its first row.)

The product column (`benchmarks/product.py`) runs the package's defaults; on digits and MNIST the kept model is the
probe or level with it, while the harness's per-row sparse (2 %, 8 epochs, its lr chosen on validation, 64 px) is
4-7 points above. Each variant here changes keys from their defaults and nothing else. Round 1: one recipe key, or
all four together (the harness's recipe). Round 2 (declared after round 1's digits rows left every round-1 variant
at or below the shipped recipe there): one training key where the product differs from the harness, or all of them
with round 1's four (`harness-train`), which became the default. Round 3 (declared after the product columns under
the new defaults): each key the pick changed back at its old value, and all of them (`previous`), chosen on the line
tables (`LINE_CHOOSING`) and paired with today's column; round 4: the input side from the images (`model.input_size:
auto`), chosen on the demo line and demo set (`AUTO_CHOOSING`), which became the default. Each round pairs with the
column of its own defaults (`BASE_OF`). Everything else is the product column's run: the same forced keys
(`benchmarks.product.overrides`), seeds, threads and prepared split, with ``sensitune run --no-export`` (the
accuracy numbers are the exported model's; the cost compared is the stages that differ: sensitivity + probe +
training seconds).

The rule (declared in advance): a variant's score on a table is the mean over seeds of its kept model's validation
score (``val_score``, the product's own selection metric: the tuned model, or the probe the run exported instead)
minus the product column's on the same seed. It becomes the default when its worst score over the choosing tables
(`CHOOSING`) is above 0; of several, the best worst score, then the cheaper. The held-out tables (`HELD_OUT_TASKS`)
never choose: they report every variant's test difference, whichever way it goes.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
      .venv/bin/python -m benchmarks.recipe --task digits --seeds 3 --round 2
    .venv/bin/python -m benchmarks.recipe --report-only    # recipe.md from the rows in --out-dir
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks import compare, product
from benchmarks.heldout_tasks import HELD_OUT_TASKS
from benchmarks.product_report import gap_metric
from benchmarks.protocol import retire, script
from benchmarks.spread import signed
from spt_core.portable.errors import SensituneError
from spt_core.portable.io import atomic_path, write_json

CHOOSING = ("digits", "mnist", "fashion-mnist")  # rounds 1-2's choosing Lite0 tables with a product column
LINE_CHOOSING = ("demo-defects-imbalanced90", "fashion-mnist-imbalanced90", "demo-defects")  # round 3's: a line's
SINGLE: dict[str, dict[str, Any]] = {
    "budget-2%": {"plan.budget": "2%"},
    "epochs-8": {"train.epochs": 8},
    "lr-3e-3": {"train.lr": 0.003},
    "size-64": {"model.input_size": 64},
}
# Round 2 (declared 2026-12-07, after round 1's digits rows, before any row of its own): the product's training
# keys where they differ from the harness's (`benchmarks/jobs.py`: no augmentation, plain batches, a seeded random
# head, a 16 x 32 sensitivity pass), one at a time and all of them with round 1's four keys.
TRAINING: dict[str, dict[str, Any]] = {
    "augment-off": {"train.augment": False},
    "head-random": {"train.head_init": "random"},
    "balance-none": {"train.balance": "none"},
    "sens-512": {"sensitivity.batches": 16, "sensitivity.batch_size": 32},
}


def _union(*groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {k: v for group in groups for sets in group.values() for k, v in sets.items()}


# Round 3 (declared 2026-12-07, after the product columns under the new defaults, before any row of its own): the
# keys the round-2 pick changed, each back at its old value, and all of them (the old defaults, balance auto kept)
PREVIOUS = {"model.input_size": 128, "sensitivity.batches": 8, "sensitivity.batch_size": 16, "plan.budget": "1%",
            "train.epochs": 6, "train.lr": 0.001, "train.augment": True, "train.head_init": "probe"}  # fmt: skip
ROUNDS: dict[int, dict[str, dict[str, Any]]] = {
    1: {**SINGLE, "harness": _union(SINGLE)},
    2: {"harness-train": _union(SINGLE, TRAINING), **TRAINING},
    3: {"size-128": {"model.input_size": 128}, "augment-on": {"train.augment": True},
        "head-probe": {"train.head_init": "probe"}, "previous": PREVIOUS},
    4: {"size-auto": {"model.input_size": "auto"}},
    5: {"plain-batches": {"train.balance": "none"}, "side-64": {"model.input_size": 64}},
}
# Round 4 (declared 2026-12-07, after round 3's line rows, before any row of its own): the input side from the
# images (`spt_core.model.input_size_for`), chosen on the tables where it changes the run: the 96 px demo line and
# demo set (auto gives 96; on every other choosing table's 8-28 px images it gives 64, today's side: rows equal to
# the column's, not run). ELPV (300 px: 128) is the held-out table that reports it.
AUTO_CHOOSING = ("demo-defects-imbalanced90", "demo-defects")
# Round 5 (declared 2026-12-07, before any row of its own): the two defaults settled on tables that had seen them,
# `train.balance: auto` (the line tables, test included) and `model.input_size: auto` (the demo tables), each set
# back, on two lines of the held-out sets (`benchmarks.imbalance.LINES`): no choosing table, it reports only.
CHOOSING_OF = {1: CHOOSING, 2: CHOOSING, 3: LINE_CHOOSING, 4: AUTO_CHOOSING, 5: ()}
BEFORE, NOW = "the defaults before 2026-12-07", "the defaults of 2026-12-07"  # what each round's rows pair with
AUTO = "the defaults since round 4"
BASE_OF = {1: BEFORE, 2: BEFORE, 3: NOW, 4: NOW, 5: AUTO}
VARIANTS: dict[str, dict[str, Any]] = {v: sets for variants in ROUNDS.values() for v, sets in variants.items()}
ROUND_OF = {v: r for r, variants in ROUNDS.items() for v in variants}
COST = ("sensitivity_seconds", "probe_seconds", "train_seconds")  # the stages a recipe key changes
OUT = compare.RESULTS / "recipe"


def cost(row: dict) -> float:
    return sum(row.get(k) or 0.0 for k in COST)


def base_rows(table: dict, fp: str | None = None) -> dict[int, dict]:
    """seed -> the table's product-column row made under the defaults `fp` (today's when None): the column's own,
    or one it replaced when a default changed, so that a decided study still pairs with the column it ran beside
    once its pick is the default."""
    fp = fp or product.defaults_fingerprint()
    pool = [r for r in table.get("replaced", []) if r.get("method") == "product"] + table.get("product", [])
    return {r["seed"]: r for r in pool if r.get("defaults") == fp and "error" not in r  # the column's own last
            and not r.get("smoke") and not r.get("no_export")}  # fmt: skip


def variant_defaults(study: dict, variant: str) -> str | None:
    """The defaults' fingerprint a variant's rows were made under (a run retires that variant's rows of other
    defaults first, so there is one; each round's variants may have another); None when it has no rows."""
    fps = [r.get("defaults") for r in study["rows"] if r["variant"] == variant]
    return fps[-1] if fps else None


def measures_nothing(variant: str) -> bool:
    """The variant's keys, applied as ``--set`` would (`load_params`), leave today's defaults as they are: its rows
    would be the product column's own."""
    from pipelines.config import defaults, load_params

    return load_params(None, VARIANTS[variant]) == defaults()


def differences(study: dict, base: dict[int, dict], variant: str, test: str = "test_acc") -> dict[str, Any] | None:
    """A variant's paired differences to the product column (points; seeds both have), or None when none pairs;
    `test` is the table's test metric (`product_report.gap_metric`: balanced accuracy on a line table)."""
    rows = {r["seed"]: r for r in study["rows"] if r["variant"] == variant and "error" not in r}
    seeds = sorted(set(rows) & set(base))
    if not seeds:
        return None

    def mean(f) -> float:  # rounded: a level pair is 0, not float noise either side of it (the rule is "above 0")
        return round(sum(f(s) for s in seeds) / len(seeds), 9) + 0.0

    outcomes = [rows[s].get("outcome") for s in seeds]
    return {"seeds": seeds, "val": mean(lambda s: 100 * (rows[s]["val_score"] - base[s]["val_score"])),
            "test": mean(lambda s: 100 * (rows[s][test] - base[s][test])),
            "test_vs_probe": mean(lambda s: 100 * (rows[s][test] - rows[s][f"probe_{test}"])),
            "cost": mean(lambda s: cost(rows[s]) / max(cost(base[s]), 1e-9)),
            "outcomes": {o: outcomes.count(o) for o in dict.fromkeys(outcomes)}}  # fmt: skip


def pick(scored: dict[str, dict[str, dict | None]], seeds: int, variants: Iterable[str] = VARIANTS,
         choosing: tuple[str, ...] = CHOOSING) -> tuple[str | None, dict[str, float]]:  # fmt: skip
    """(the adopted one of `variants` or None, variant -> worst validation score over the `choosing` tables); a
    variant counts once every choosing table has all `seeds` of it paired."""
    worst: dict[str, float] = {}
    for v in variants:
        got = [scored.get(t, {}).get(v) for t in choosing]
        if all(d is not None and len(d["seeds"]) == seeds for d in got):
            worst[v] = min(d["val"] for d in got)  # type: ignore[index]
    if not worst:
        return None, {}

    def mean_cost(v: str) -> float:
        return sum(scored[t][v]["cost"] for t in choosing) / len(choosing)  # type: ignore[index]

    best = max(worst, key=lambda v: (worst[v], -mean_cost(v)))
    return (best if worst[best] > 0 else None), worst


def report(tables: dict[str, tuple[dict, dict]], seeds: int = 3) -> str:
    """recipe.md: per table and variant, the paired differences to the product column; the pick."""
    scored = {t: {v: differences(study, base_rows(table, variant_defaults(study, v)), v, gap_metric(table))
                  for v in VARIANTS} for t, (table, study) in tables.items()}  # fmt: skip
    lines = ["# The recipe study: which setting keeps `sensitune run` at its probe", "",
             "Generated by `python -m benchmarks.recipe` (module docstring: the protocol and the rule). Each variant "
             "minus the product column on the same seeds (points: kept model's val score, test accuracy; balanced "
             "accuracy on a line table), its own test gain over its probe, and its sensitivity + probe + training "
             "seconds over the column's.", "",
             "| table | role | round | variant | keys | seeds | outcomes | val diff | test diff | test - own probe "
             "| cost x |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for task, by_variant in scored.items():
        for v, d in by_variant.items():
            choosing, held_out = task in CHOOSING_OF[ROUND_OF[v]], tables[task][0]["meta"]["task"] in HELD_OUT_TASKS
            role = "choosing" if choosing else "held out" if held_out else "reports"  # per round: its own tables
            keys = ", ".join(f"{k}={val}" for k, val in VARIANTS[v].items())
            if d is None:
                lines.append(f"| {task} | {role} | {ROUND_OF[v]} | {v} | {keys} | 0 | - | - | - | - | - |")
                continue
            outs = ", ".join(f"{o} {n}" for o, n in d["outcomes"].items())
            lines.append(f"| {task} | {role} | {ROUND_OF[v]} | {v} | {keys} | {len(d['seeds'])} | {outs} | "
                         f"{signed(d['val'])} | {signed(d['test'])} | {signed(d['test_vs_probe'])} | "
                         f"{d['cost']:.2f} |")  # fmt: skip
    last = [r for r in ROUNDS if not any(r in _together(q) for q in ROUNDS if q > r)]  # of each pooled group
    for rounds in (_together(r) for r in last):
        base, choosing = BASE_OF[rounds[-1]], CHOOSING_OF[rounds[-1]]
        if not choosing:
            lines += ["", f"Round {rounds[-1]} (against {base}): held-out tables only; it reports, never chooses."]
            continue
        worst = pick(scored, seeds, [v for r in rounds for v in ROUNDS[r]], choosing)[1]
        lines += ["", f"Round{'s' * (len(rounds) > 1)} {', '.join(map(str, rounds))} (against {base}): worst "
                  "validation difference over "
                  f"the choosing tables ({', '.join(choosing)}): " + (", ".join(f"{v} {signed(w)}" for v, w in
                  worst.items()) or "not every choosing table has all its rows") + "."]  # fmt: skip
    lines += ["", _verdict(scored, seeds)]
    return "\n".join(lines) + "\n"


def _together(r: int) -> list[int]:
    """The rounds decided together with round `r`: it and the earlier ones against the same defaults on the same
    choosing tables (rounds 1-2; a round with choosing tables of its own is decided alone)."""
    return [rr for rr in ROUNDS if rr <= r and (BASE_OF[rr], CHOOSING_OF[rr]) == (BASE_OF[r], CHOOSING_OF[r])]


def _out(scored: dict[str, dict[str, dict | None]], seeds: int, v: str, choosing: tuple[str, ...]) -> bool:
    """A variant already at or below 0 on a choosing table with all its seeds: no further row can make it adopted."""
    return any((d := scored.get(t, {}).get(v)) is not None and len(d["seeds"]) == seeds and d["val"] <= 0
               for t in choosing)  # fmt: skip


def _verdict(scored: dict[str, dict[str, dict | None]], seeds: int) -> str:
    """The pick of each round, applied over the variants of the rounds so far (as declared); a round with a variant
    still missing rows on a choosing table is not decided, unless that variant is already out (`_out`)."""
    out = []
    for r in ROUNDS:
        if not CHOOSING_OF[r]:
            out.append(f"round {r}: none (no choosing table: it reports only)")
            continue
        upto = [v for rr in _together(r) for v in ROUNDS[rr]]
        adopted, worst = pick(scored, seeds, upto, CHOOSING_OF[r])
        early = [v for v in upto if v not in worst and _out(scored, seeds, v, CHOOSING_OF[r])]
        if missing := [v for v in upto if v not in worst and v not in early]:
            out.append(f"round {r}: not decided yet ({', '.join(missing)} lack rows on a choosing table)")
        else:
            out.append(f"round {r}: " + (f"{adopted}" if adopted else f"none (no variant is above {BASE_OF[r]} "
                                         "on every choosing table)") + (f"; decided before {', '.join(early)} had all "
                                         "their rows: each is at or below 0 on a complete choosing table" if early
                                         else ""))  # fmt: skip
    return "Adopted as the default: " + "; ".join(out) + "."


def load(out_dir: Path, backbone: str) -> dict[str, tuple[dict, dict]]:
    """task -> (the committed method table, its study rows) for every study JSON in `out_dir`."""
    out = {}
    for p in sorted(out_dir.glob(f"recipe_{backbone}_*.json")):
        study = json.loads(p.read_text())
        table = json.loads((compare.RESULTS / f"compare_{study['meta']['table']}.json").read_text())
        out[study["meta"]["table"].split("_", 1)[1]] = (table, study)  # the name after the backbone
    return out


def run_table(args: argparse.Namespace, variants: list[str]) -> Path:
    """The missing (variant, seed) rows of one table, each written as it ends (a stopped study resumes)."""
    slug = f"{args.backbone}_{args.task}"
    table, _ = product.load_table(compare.RESULTS, slug, smoke=False)
    if not base_rows(table):
        raise SensituneError(f"compare_{slug}.json has no product column under today's defaults: run "
                             f"`python -m benchmarks.product --backbone {args.backbone} --task {args.task}` first")
    meta, path = table["meta"], args.out_dir / f"recipe_{slug}.json"
    study = json.loads(path.read_text()) if path.is_file() else {"meta": {"table": slug}, "rows": []}
    cmd, was = "python -m benchmarks.recipe " + " ".join(args.argv), study["meta"].get("command")
    if cmd not in ([] if was is None else [c.strip("`") for c in was.split("  # + rows of ")]):
        study["meta"]["command"] = f"{was}  # + rows of `{cmd}`" if was else cmd  # each command, in order
    how = {"defaults": product.defaults_fingerprint(), "threads": args.threads or meta.get("threads", 1),
           "smoke": args.smoke}  # fmt: skip
    if same := [v for v in variants if measures_nothing(v)]:
        raise SensituneError(f"--variants: {', '.join(same)} equal today's defaults and would measure nothing")
    stale = [r for r in study["rows"] if r["variant"] in variants and any(r.get(k) != v for k, v in how.items())]
    if stale:  # rows of other variants stay: an earlier round's record, paired with the column of its own defaults
        retire(study, stale, f"re-run with {how}")
    data_dir = product.table_data(meta, args.work_dir)
    for v in variants:
        for seed in range(args.seeds):
            if any(r["variant"] == v and r["seed"] == seed and "error" not in r for r in study["rows"]):
                continue
            sets = product.overrides(meta, args.backbone, data_dir, seed) | VARIANTS[v]
            sets |= product.smoke_sets(meta) if args.smoke else {}
            print(f"[recipe {slug}] {v} seed {seed}", flush=True)
            ran = product.run_seed(args.work_dir / "projects" / slug / v / f"seed{seed}", sets, how["threads"], True)
            row = {"variant": v, "seed": seed, **how, "overrides": sets, **ran,
                   "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
            print(f"[recipe {slug}] {json.dumps(row)}", flush=True)
            study["rows"] = [r for r in study["rows"] if (r["variant"], r["seed"]) != (v, seed)] + [row]
            write_json(path, study)
    return path


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="lite0")
    ap.add_argument("--task", help="the table (its name after the backbone); omit with --report-only")
    ap.add_argument("--variants", help="comma-separated, of " + ", ".join(VARIANTS) + " (default: --round's)")
    ap.add_argument("--round", type=int, choices=sorted(ROUNDS), help="the variants of one round (default: all)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS (default: the table's --threads)")
    ap.add_argument("--work-dir", type=Path, default=Path("~/.cache/sensitune-recipe").expanduser())
    ap.add_argument("--out-dir", type=Path, default=OUT)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a check of the script: product.py's --smoke keys")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    chosen = args.variants or ",".join(ROUNDS[args.round] if args.round else VARIANTS)
    variants = [v for v in chosen.split(",") if v]
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SensituneError(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    if args.smoke and args.out_dir.resolve() == OUT.resolve():
        raise SensituneError("--smoke: give --out-dir /tmp/... (smoke rows are never committed)")
    if not args.report_only:
        if not args.task:
            raise SensituneError("--task: name the table to run (e.g. --task digits), or give --report-only")
        run_table(args, variants)
    out = args.out_dir / "recipe.md"
    with atomic_path(out) as tmp:
        Path(tmp).write_text(report(load(args.out_dir, args.backbone), args.seeds))
    return out


if __name__ == "__main__":
    script(main)
