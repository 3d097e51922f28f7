"""The README's comparison table, regenerated from the committed method tables (never typed by hand).

One row per `results/compare_<backbone>_<task>.json` (the balanced protocol; `--imbalance` tables have their own
section): mean test % over seeds at each method's validation-chosen lr (`benchmarks.report.summarize`), the
budget chosen on validation for per-row sparse (the product's default plan) and SPT-LoRA where the table has
their ladder (`benchmarks.report.budget_on_val` among the method's own budgets, never the full fine-tuning row; with
its own seed count when fewer seeds ran every rung), and the seed count. The best mean of a row is bold; "-" = not run.

    python benchmarks/summary.py            # prints the markdown table, then the SPT variants against the targets
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.heldout_tasks import HELD_OUT_TASKS
from benchmarks.methods import METHODS
from benchmarks.report import budget_on_val, summarize
from benchmarks.spread import mean

RESULTS = Path(__file__).resolve().parent / "results"

HEADERS = {"bitfit": "BitFit", "full": "full FT", "peft-lora": "peft LoRA", "random-sparse": "random sparse",
           "spt-lora": "SPT-LoRA", "spt-adapter": "SPT-Adapter", "per-row-sparse": "per-row sparse"}  # fmt: skip
COLUMNS = {m: HEADERS.get(m, m) for m in METHODS}  # method -> header, in the harness's order
AUTO = {"per-row-sparse": "per-row, budget on val", "spt-lora": "SPT-LoRA, budget on val"}  # method -> header
PRODUCT = "product"  # the product column: `sensitune run`'s defaults, never bold (its own recipe and lr, not the
# harness's equal-budget protocol)
DEFAULT = "per-row-sparse"  # the product's default plan (params.yaml: plan.allocation per_row, structured none)
NAMES = {"tf_efficientnet_lite0": "Lite0", "vit_small_patch14_dinov2": "ViT-S/14"}


def auto_cells(state: dict) -> dict[str, tuple[float, int] | None]:
    """method -> (mean test % of the budget chosen on validation, seeds), None where the table has no ladder."""
    out: dict[str, tuple[float, int] | None] = {}
    for m in AUTO:
        picks = budget_on_val(state, m, with_full=False)  # the method's own ladder (a full rung is another method)
        out[m] = (100 * sum(p["row"]["test_acc"] for p in picks) / len(picks), len(picks)) if picks else None
    return out


def product_cell(state: dict) -> tuple[float, int] | None:
    """(mean test % of the product column, its seeds): `sensitune run` with the shipped defaults at its own input
    size (`benchmarks/product.py`, the table's ``product`` rows); None where it has not run."""
    rows = [r for r in state.get("product", []) if "error" not in r and r.get("test_acc") is not None]
    return (100 * mean([r["test_acc"] for r in rows]), len(rows)) if rows else None


def table_row(state: dict) -> tuple[str, dict[str, float | None], str, dict[str, int]]:
    """(row label, {method, AUTO or PRODUCT key: mean test %}, seeds, {AUTO/PRODUCT key: its own seed count})."""
    meta = state["meta"]
    by = {s["method"]: s for s in summarize(state)}
    cells: dict[str, float | None] = {m: (100 * by[m]["test"] if m in by else None) for m in COLUMNS}
    autos = auto_cells(state) | {PRODUCT: product_cell(state)}
    cells |= {f"auto:{m}": (a[0] if a else None) for m, a in autos.items()}
    seeds = sorted({len(s["seeds"]) for s in by.values()})
    name = NAMES.get(meta["backbone"], meta["backbone"])
    label = f"{name} @{meta['img_size']}, {meta['task']} ({meta['budget'].replace('%', ' %')})"
    label += ", held out" * held_out(state)
    n = "-".join(str(n) for n in (seeds[0], seeds[-1])) if len(seeds) > 1 else str(seeds[0])
    return label, cells, n, {f"auto:{m}": a[1] for m, a in autos.items() if a}


def product_header(states: list[dict]) -> str:
    """The product column's header, with the input side its rows ran at (the package default when they ran)."""
    sizes = sorted({r["input_size"] for s in states for r in s.get("product", []) if r.get("input_size")})
    return "product defaults" + (f" ({' / '.join(map(str, sizes))} px)" if sizes else "")


def markdown(states: list[dict]) -> str:
    """The README's comparison: one row per table (`tables()`)."""
    keys = [*COLUMNS, *(f"auto:{m}" for m in AUTO), f"auto:{PRODUCT}"]
    head = [*COLUMNS.values(), *AUTO.values(), product_header(states)]
    lines = ["| backbone, task (budget) | " + " | ".join(head) + " | seeds |", "|---" * (len(head) + 2) + "|"]
    for state in states:
        label, cells, seeds, auto_seeds = table_row(state)
        ranked = {k: v for k, v in cells.items() if v is not None and k != f"auto:{PRODUCT}"}
        best = max(ranked.values(), default=None)
        shown = []
        for key in keys:
            v = cells[key]
            text = "-" if v is None else f"{v:.1f}"
            text = f"**{text}**" if key in ranked and round(v, 1) == round(best, 1) else text
            n = auto_seeds.get(key)
            shown.append(f"{text} ({n} seed{'s' * (n > 1)})" if n is not None and str(n) != seeds else text)
        lines.append(f"| {label} | " + " | ".join(shown) + f" | {seeds} |")
    return "\n".join(lines) + "\n"


VARIANTS = ("spt-lora", "spt-adapter", "sparse-only", "per-row-sparse")  # what `plan.structured`/allocation offer


def targets(states: list[dict]) -> str:
    """Each SPT variant against the issue's targets on every table that ran it: its gap to peft LoRA at equal count
    (target >= 0), to full fine-tuning (target >= -0.5 on the ViT tables), and, for a variant with a ladder, the
    budget chosen on validation against full fine-tuning (target >= -0.5 on the Lite0 tables); test points, worst
    case first. The default plan is marked."""
    rows: dict[str, list[tuple[float, float | None]]] = {v: [] for v in VARIANTS}
    chosen: dict[str, list[float]] = {v: [] for v in VARIANTS}
    n_tables = 0
    for state in states:
        by = {s["method"]: 100 * s["test"] for s in summarize(state)}
        if "peft-lora" not in by or "full" not in by:
            continue
        n_tables += 1
        vit = "vit" in state["meta"]["backbone"]
        for v in VARIANTS:
            if v in by:
                rows[v].append((by[v] - by["peft-lora"], by[v] - by["full"] if vit else None))
        if not vit:
            for m, a in auto_cells(state).items():
                if a is not None:
                    chosen[m].append(a[0] - by["full"])
    head = ("| variant | tables | vs peft LoRA: worst | mean | tables >= 0 | vs full FT on ViT: worst | tables >= -0.5 "
            "| budget on val vs full FT on Lite0: worst | tables >= -0.5 |")  # fmt: skip
    lines = [head, "|---" * 9 + "|"]
    for v, gaps in rows.items():
        if not gaps:
            continue
        lora = [g for g, _ in gaps]
        vit = [f for _, f in gaps if f is not None]
        name = COLUMNS[v] + (" (default)" if v == DEFAULT else "")
        lines.append(f"| {name} | {len(gaps)} of {n_tables} | {min(lora):+.1f} | {sum(lora) / len(lora):+.1f} | "
                     f"{sum(g >= 0 for g in lora)} | {_worst(vit)} | {_worst(chosen[v])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _worst(gaps: list[float], floor: float = -0.5) -> str:
    """ "worst | n of N" cells: the smallest gap and how many gaps reach the floor; "- | -" without any."""
    return f"{min(gaps):+.1f} | {sum(g >= floor for g in gaps)} of {len(gaps)}" if gaps else "- | -"


def held_out(state: dict) -> bool:
    """A table of a task declared held out (benchmarks/README.md, "Held-out protocol"): it reports, never chooses."""
    return state["meta"]["task"] in HELD_OUT_TASKS


def tables(results: Path = RESULTS) -> list[dict]:
    """The balanced-protocol tables (`results/compare_*.json`, each read once) with at least one finished method (a
    table still running may have none), Lite0 first. Tables in sub-folders (`gpu/`, `selection/`) are not in it."""
    paths = sorted((p for p in results.glob("compare_*.json") if "imbalanced" not in p.name),
                   key=lambda p: (not p.name.startswith("compare_lite0"), p.name))  # fmt: skip
    return [s for s in (json.loads(p.read_text()) for p in paths) if summarize(s)]


if __name__ == "__main__":
    found = tables()
    print(markdown(found))
    print("Targets on the held-out tables (the evidence):\n")
    print(targets([s for s in found if held_out(s)]))
    print("Targets on the choosing tables (their test numbers were seen while choosing):\n")
    print(targets([s for s in found if not held_out(s)]), end="")
