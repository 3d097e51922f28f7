"""The default plan chosen without its own test numbers: leave one table out, on validation scores only.

The protocol (benchmarks/README.md, "Held-out protocol", declared before the run): the candidates are the plans
`plan.structured` x `plan.allocation` offer (`benchmarks.summary.VARIANTS`); a variant's score on a table is its
mean VALIDATION accuracy over seeds minus peft LoRA's at the same trainable count (the table's main budget, each
method at its validation-chosen lr); the rule picks the variant with the best worst-case score over the choosing
tables, ties by the mean score, then by the order of `VARIANTS`. Only tables where every candidate ran choose (a
variant cannot win by having run on fewer tables).

- Leave one table out: for each table, the rule applied to the OTHER choosing tables picks a variant; that
  variant's TEST gap to peft LoRA and to full fine-tuning on the left-out table is the held-out result.
- Held-out tables (`HELD_OUT`, new tasks declared before any of their runs): never choose; they report the pick of
  all choosing tables.

    python -m benchmarks.holdout                   # prints the markdown (benchmarks/results/holdout.md)
    python -m benchmarks.holdout --out benchmarks/results/holdout.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.heldout_tasks import HELD_OUT_TASKS
from benchmarks.report import mean_accuracy as scores
from benchmarks.spread import signed
from benchmarks.summary import COLUMNS, DEFAULT, NAMES, VARIANTS, tables
from spt_core.portable.io import atomic_path

REFERENCE = "peft-lora"  # the equal-count comparator every variant is scored against
HELD_OUT: tuple[str, ...] = HELD_OUT_TASKS  # declared held out (benchmarks/README.md): they report, never choose


def label(state: dict) -> str:
    meta = state["meta"]
    return f"{NAMES.get(meta['backbone'], meta['backbone'])} {meta['task']}"


def choosing(states: list[dict]) -> list[dict]:
    """The tables that may choose: not held out, and every candidate and the reference ran."""
    need = {*VARIANTS, REFERENCE}
    return [s for s in states if s["meta"]["task"] not in HELD_OUT and need <= set(scores(s, "val"))]


def pick(states: list[dict]) -> tuple[str, dict[str, tuple[float, float]]]:
    """(the variant the rule picks, variant -> (worst, mean) validation gap to the reference) over `states`."""
    if not states:
        raise ValueError("no choosing table: every candidate and peft LoRA must have run on at least one")
    gaps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for state in states:
        val = scores(state, "val")
        for v in VARIANTS:
            gaps[v].append(val[v] - val[REFERENCE])
    summary = {v: (min(g), sum(g) / len(g)) for v, g in gaps.items()}
    best = max(VARIANTS, key=lambda v: (round(summary[v][0], 9), round(summary[v][1], 9), -VARIANTS.index(v)))
    return best, summary


def test_gaps(state: dict, variant: str) -> tuple[float | None, float | None]:
    """(test % of `variant` - peft LoRA's, - full fine-tuning's) on `state`; None where one did not run."""
    test = scores(state, "test")
    if variant not in test:
        return None, None
    gaps = (round(test[variant] - test[m], 9) if m in test else None for m in (REFERENCE, "full"))
    return tuple(gaps)  # type: ignore[return-value]


def leave_one_out(states: list[dict]) -> list[dict]:
    """Per choosing table: the pick of the others and its test gaps there; per other table (declared held out, or
    where not every candidate ran): the pick of all choosing tables."""
    pool = choosing(states)
    out = []
    for state in states:
        chooses = state in pool
        others = [s for s in pool if s is not state] if chooses else pool
        chosen, _ = pick(others)
        ref, full = test_gaps(state, chosen)
        held = "chooses" if chooses else "held out" if state["meta"]["task"] in HELD_OUT else "incomplete"
        out.append({"table": label(state), "role": held, "chosen_by": len(others), "pick": chosen,
                    "test_vs_peft": ref, "test_vs_full": full})  # fmt: skip
    return out


def markdown(states: list[dict]) -> str:
    pool = choosing(states)
    chosen, summary = pick(pool)
    lines = [
        "# The default plan, chosen on validation, reported on tables left out of the choice",
        "",
        "`python -m benchmarks.holdout --out benchmarks/results/holdout.md` (no training: it reads the committed "
        '`compare_*.json`; protocol: benchmarks/README.md, "Held-out protocol")',
        "",
        f"All {len(pool)} choosing tables ({', '.join(label(s) for s in pool)}): validation gap to peft LoRA at "
        "equal count, points:",
        "",
        "| variant | worst | mean |",
        "|---|---|---|",
    ]
    for v in VARIANTS:
        mark = " **(picked)**" if v == chosen else ""
        lines.append(f"| {COLUMNS[v]}{mark} | {summary[v][0]:+.2f} | {summary[v][1]:+.2f} |")
    lines += [
        "",
        "Leave one table out: the pick of the other tables, and its TEST gaps on the left-out one:",
        "",
        "| left out | chosen by | pick | test vs peft LoRA | test vs full FT |",
        "|---|---|---|---|---|",
    ]
    rows = leave_one_out(states)
    for r in rows:
        by = {
            "chooses": f"the other {r['chosen_by']}",
            "held out": f"all {r['chosen_by']} (declared held out)",
            "incomplete": f"all {r['chosen_by']} (not every candidate ran here)",
        }[r["role"]]
        lines.append(f"| {r['table']} | {by} | {COLUMNS[r['pick']]} | {signed(r['test_vs_peft'])} | "
                     f"{signed(r['test_vs_full'])} |")  # fmt: skip
    groups = {"chooses": "choosing tables, each left out of its own choice", "held out": "declared held-out tables",
              "incomplete": "tables where not every candidate ran"}  # fmt: skip
    for role, what in groups.items():
        lines += _summary_line([r for r in rows if r["role"] == role], what)
    return "\n".join(lines) + "\n"


def _summary_line(rows: list[dict], what: str) -> list[str]:
    """One sentence on a group of left-out rows: how often the pick is the default, its test gaps to peft LoRA."""
    if not rows:
        return []
    same = sum(r["pick"] == DEFAULT for r in rows)
    ref = [r["test_vs_peft"] for r in rows if r["test_vs_peft"] is not None]
    gaps = f">= 0 on {sum(g >= 0 for g in ref)} of {len(ref)}, worst {min(ref):+.2f}, mean {sum(ref) / len(ref):+.2f}"
    return ["", f"On the {len(rows)} {what}: the pick is the default ({COLUMNS[DEFAULT]}) on {same} of {len(rows)}; "
            f"its test gap to peft LoRA {gaps}."]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    args = ap.parse_args(argv)
    text = markdown(tables())
    if args.out is None:
        print(text, end="")
        return 0
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
