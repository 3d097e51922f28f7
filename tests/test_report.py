"""benchmarks/report.py on a hand-made table whose every published number is known in advance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.report import chosen_lr, summarize, summary_metrics, write_report


def _row(method: str, seed: int, lr: float, val: float, test: float, mem: float) -> dict:
    return {
        "method": method, "seed": seed, "lr": lr, "budget": "2%", "val_acc": val, "test_acc": test,
        "trainable_backbone": 1000, "trainable_head": 40, "trainable_pct": 2.0, "details": {},
        "train_overhead_mb": mem, "overhead_peak": "vmhwm_reset_trim", "peak_memory_mb": mem + 500,
        "s_per_train_epoch": 2.0, "wall_s": 30.0,
    }  # fmt: skip


ROWS = [
    # full: seed-0 validation prefers 1e-4 (0.90 > 0.80); the 3e-4 row has the better *test* accuracy, a trap
    _row("full", 0, 1e-4, 0.90, 0.967, 100.0),
    _row("full", 0, 3e-4, 0.80, 0.990, 100.0),
    _row("full", 1, 1e-4, 0.88, 0.966, 100.0),
    # peft LoRA: a validation tie at 1e-3 and 3e-3 -> the smaller lr, whatever order the rows ran in
    _row("peft-lora", 0, 3e-3, 0.85, 0.50, 80.0),
    _row("peft-lora", 0, 1e-3, 0.85, 0.94, 80.0),
    _row("peft-lora", 1, 1e-3, 0.84, 0.92, 80.0),
    # sparse-only: selected 1e-3; seed 1 failed and is left out
    _row("sparse-only", 0, 1e-3, 0.92, 0.9665, 60.0),
    _row("sparse-only", 1, 1e-3, 0.91, 0.9665, 60.0),
    {"method": "sparse-only", "seed": 2, "lr": 1e-3, "budget": "2%", "error": "exit 1"},
]
META = {
    "backbone": "lite0", "img_size": 64, "task": "demo", "budget": "2%", "command": "python benchmarks/compare.py",
    "machine": "test box", "threads": 1, "versions": {"torch": "x"}, "date": "today", "n_train": 800,
    "data_dir": "data", "epochs": 8, "batch": 32, "device": "cpu",
}  # fmt: skip


def test_learning_rate_is_chosen_on_seed_zero_validation_with_ties_to_the_smaller_lr():
    assert chosen_lr(ROWS, "full", "2%") == 1e-4
    assert chosen_lr(ROWS, "peft-lora", "2%") == 1e-3
    assert chosen_lr(list(reversed(ROWS)), "peft-lora", "2%") == 1e-3
    assert chosen_lr(ROWS, "spt-lora", "2%") is None


def test_means_at_the_chosen_lr_and_memory_ratios(tmp_path: Path):
    state = {"meta": META, "rows": ROWS}
    by = {s["method"]: s for s in summarize(state)}
    assert list(by) == ["full", "peft-lora", "sparse-only"]  # METHODS order
    assert by["full"]["test"] == pytest.approx(0.9665, abs=1e-12)  # seeds 0 and 1 at 1e-4, not the 3e-4 trap
    assert by["peft-lora"]["test"] == pytest.approx(0.93, abs=1e-12)
    assert by["sparse-only"]["seeds"] == [0, 1]
    metrics = summary_metrics(state)
    assert metrics["lr.full"] == 1e-4 and metrics["memory_mb.sparse-only"] == 60.0
    assert metrics["val_acc.full"] == pytest.approx(0.89)

    write_report(state, tmp_path / "t")
    table = {
        line.split(" | ")[0].lstrip("| "): [c.strip() for c in line.strip("|").split("|")]
        for line in (tmp_path / "t.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| method")
    }
    full, lora, sparse = table["full"], table["peft-lora"], table["sparse-only"]
    # columns: method, lr (grid), trainable, %, head, val %, test %, seeds, MB, x full, x peft-lora, ...
    assert full[6] == "96.65 ± 0.05" and sparse[6] == "96.65 ± 0.00"  # equal means print equal
    assert lora[6] == "93.00 ± 1.00" and lora[1].startswith("0.001 (0.001: 85.0, 0.003: 85.0)")
    assert (sparse[9], sparse[10]) == ("0.60", "0.75")  # 60/100 and 60/80
    assert (full[9], full[10]) == ("1.00", "1.25")
    assert "sparse-only seed 2 lr 0.001: exit 1" in (tmp_path / "t.md").read_text()


def test_budget_chosen_on_validation_per_seed(tmp_path: Path):
    """Seed 0: 2% and 8% tie on validation -> 2% (fewer values), though 8% tests better; seed 1: full wins;
    seed 2: 2%. A budget one seed lacks leaves the ladder; rows at the non-chosen lr are never rungs."""
    from benchmarks.report import budget_on_val

    def rung(budget: str, count: int, seed: int, val: float, test: float, lr: float = 1e-3) -> dict:
        return {**_row("spt-lora", seed, lr, val, test, 50.0), "budget": budget, "trainable_backbone": count}

    rows = [
        rung("2%", 2000, 0, 0.90, 0.91), rung("2%", 2000, 0, 0.95, 0.99, lr=3e-3),  # the seed-0 lr grid
        rung("0.5%", 500, 0, 0.80, 0.80), rung("8%", 8000, 0, 0.90, 0.97),
        _row("full", 0, 1e-4, 0.85, 0.95, 100.0),
        rung("2%", 2000, 1, 0.80, 0.81), rung("0.5%", 500, 1, 0.70, 0.70), rung("8%", 8000, 1, 0.82, 0.90),
        _row("full", 1, 1e-4, 0.86, 0.93, 100.0),
        rung("2%", 2000, 2, 0.99, 0.99), rung("0.5%", 500, 2, 0.70, 0.70), _row("full", 2, 1e-4, 0.5, 0.5, 100.0),
        rung("8%", 8000, 2, 0.60, 0.60),
    ]  # fmt: skip
    state = {"meta": META, "rows": rows}
    # the lr at the main budget is chosen on seed-0 validation: 3e-3 (0.95); its only rows are the 2% ones
    assert chosen_lr(rows, "spt-lora", "2%") == 3e-3
    assert budget_on_val(state, "spt-lora") == []  # 3e-3 has no other rung: no ladder to choose from
    rows[1]["val_acc"] = 0.89  # now 1e-3 is chosen
    picks = budget_on_val(state, "spt-lora")
    assert [(p["seed"], p["budget"]) for p in picks] == [(0, "2%"), (1, "full"), (2, "2%")]
    assert picks[0]["ladder"] == ["0.5%", "2%", "8%", "full"]
    assert [p["row"]["test_acc"] for p in picks] == [0.91, 0.93, 0.99]
    write_report(state, tmp_path / "t")
    md = (tmp_path / "t.md").read_text()
    # test (0.91 + 0.93 + 0.99) / 3 = 94.33 ± 4.00; full at 1e-4 = (0.95 + 0.93 + 0.5) / 3 = 0.7933 -> +15.00
    assert "| spt-lora + full | 0.5%, 2%, 8%, full | 2%, full, 2% | 94.33 ± 4.00 | 3 | +15.00 | - |" in md
    # the method's own number never picks the comparator's row: seed 1 takes its best budget, 8 % (0.82 on val)
    own = budget_on_val(state, "spt-lora", with_full=False)
    assert [(p["seed"], p["budget"]) for p in own] == [(0, "2%"), (1, "8%"), (2, "2%")]
    assert own[0]["ladder"] == ["0.5%", "2%", "8%"]
    # (0.91 + 0.90 + 0.99) / 3 = 93.33 ± 4.50; vs full 79.33: +14.00; listed before the ladders that end in full
    own_line = "| spt-lora | 0.5%, 2%, 8% | 2%, 8%, 2% | 93.33 ± 4.50 | 3 | +14.00 | - |"
    assert md.index(own_line) < md.index("| spt-lora + full |")
    # the product's ladder trains its full rung at the method's lr: full rows at 1e-3 replace the 1e-4 ones
    # (seed 0 at 1e-3: 0.84 < 0.85 at 1e-4, so full fine-tuning's own lr stays 1e-4)
    at_lr = [_row("full", s, 1e-3, v, t, 100.0) for s, v, t in ((0, 0.84, 0.97), (1, 0.90, 0.88), (2, 0.5, 0.5))]
    state["rows"] = rows + at_lr
    same = budget_on_val(state, "spt-lora", full_at_method_lr=True)
    assert [(p["seed"], p["budget"]) for p in same] == [(0, "2%"), (1, "full"), (2, "2%")]
    assert [p["row"]["test_acc"] for p in same] == [0.91, 0.88, 0.99]
    assert [p["budget"] for p in budget_on_val(state, "spt-lora")] == ["2%", "full", "2%"]  # full at its own lr
    write_report(state, tmp_path / "t")
    md = (tmp_path / "t.md").read_text()  # (0.91 + 0.88 + 0.99) / 3 = 92.67, full at 1e-4 79.33 -> +13.33
    assert "| spt-lora + full at lr 0.001 | 0.5%, 2%, 8%, full | 2%, full, 2% | 92.67 ± 5.50 | 3 | +13.33 | - |" in md
    state["rows"] = rows
    del rows[-1]  # seed 2 without its 8% row: 8% leaves every seed's ladder
    assert [p["ladder"] for p in budget_on_val(state, "spt-lora")] == [["0.5%", "2%", "full"]] * 3


def test_readme_table_row_from_a_table():
    """benchmarks/summary.py: the README row is the chosen-lr means (the 3e-4 trap excluded), best in bold."""

    from benchmarks.summary import markdown

    md = markdown([{"meta": META, "rows": ROWS}]).splitlines()
    assert md[0].startswith("| backbone, task (budget) | linear | BitFit | full FT | peft LoRA |")
    # full 96.65 and sparse-only 96.65 tie for best (both bold, the same rounding); peft LoRA (0.94 + 0.92) / 2
    assert md[2] == "| lite0 @64, demo (2 %) | - | - | **96.7** | 93.0 | - | - | - | **96.7** | - | - | - | - | 2 |"
    # the product column: the mean of its own seeds (one here, so it says so), never bold (another input size)
    product = [{"method": "product", "seed": 0, "test_acc": 0.99, "input_size": 64},
               {"method": "product", "seed": 1, "error": "x"}]  # fmt: skip
    head, _, row = markdown([{"meta": META, "rows": ROWS, "product": product}]).splitlines()
    assert row.endswith("| **96.7** | - | - | - | 99.0 (1 seed) | 2 |"), row
    assert head.endswith("| product defaults (64 px) | seeds |")  # the side its rows ran at, not a fixed one
    older = {"meta": META, "rows": ROWS, "product": [{**product[0], "input_size": 128}]}
    assert markdown([older, {"meta": META, "rows": ROWS, "product": product}]).splitlines()[0].endswith(
        "| product defaults (64 / 128 px) | seeds |")
    assert md[0].endswith("| product defaults | seeds |")  # no product row yet


def test_targets_table_gaps_on_known_tables():
    """Two tables: gaps to peft LoRA on both, to full FT on the ViT one only, and the default's budget chosen on
    validation against full FT on the Lite0 one only; worst, mean and counts."""

    from benchmarks.summary import markdown, targets

    def table(backbone, acc, extra=()):  # one seed-0 row per method at its only lr
        rows = [{**ROWS[0], "method": m, "lr": 1e-3, "seed": 0, "test_acc": a, "val_acc": 0.97 if m == "full" else 0.9}
                for m, a in acc.items()]  # fmt: skip
        return {"meta": {**META, "backbone": backbone}, "rows": [*rows, *extra]}

    def rung(budget, n, val, test):  # a per-row rung at the chosen lr; 8 % wins on val over 2 % (0.9)
        return {**ROWS[0], "method": "per-row-sparse", "lr": 1e-3, "seed": 0, "budget": budget,
                "trainable_backbone": n, "val_acc": val, "test_acc": test}  # fmt: skip

    # 0.5 %: the test-best trap, val-worst; full fine-tuning (val 0.97) wins on val but is not a rung of the method
    ladder = [rung("0.5%", 250, 0.85, 0.99), rung("8%", 4000, 0.95, 0.93)]
    states = [table("tf_efficientnet_lite0",
                   {"full": 0.95, "peft-lora": 0.90, "spt-lora": 0.92, "per-row-sparse": 0.91}, ladder),
              table("vit_small_patch14_dinov2",
                   {"full": 0.80, "peft-lora": 0.79, "spt-lora": 0.785, "sparse-only": 0.81})]  # fmt: skip
    lines = targets(states).splitlines()
    # SPT-LoRA: +2.0 and -0.5 vs peft (worst -0.5, mean +0.75, 1 table >= 0); vs full on ViT -1.5 (missed)
    assert lines[2] == "| SPT-LoRA | 2 of 2 | -0.5 | +0.8 | 1 | -1.5 | 0 of 1 | - | - |"
    assert lines[3] == "| sparse-only | 1 of 2 | +2.0 | +2.0 | 1 | +1.0 | 1 of 1 | - | - |"
    # per-row: +1.0 vs peft; its own best rung on val, 8 % (0.95; full's 0.97 is not its rung), tests 93.0, 2.0 below
    # full's 95.0
    assert lines[4] == "| per-row sparse (default) | 1 of 2 | +1.0 | +1.0 | 1 | - | - | -2.0 | 0 of 1 |"
    assert len(lines) == 5  # variants no table ran are left out
    row = markdown(states[:1]).splitlines()[2].split(" | ")
    assert row[-4:] == ["93.0", "-", "-", "1 |"]  # per-row's budget on val, SPT-LoRA's (no ladder), product, seeds


def test_the_readme_comparison_is_the_committed_tables():
    """README's and docs/comparison.md's tables are `benchmarks/summary.py`'s output on benchmarks/results, line for
    line (the README shows the method table; docs/comparison.md both it and the targets)."""
    from benchmarks.summary import held_out, markdown, tables, targets

    root = Path(__file__).resolve().parents[1]
    loaded = tables()

    def blocks(doc: str, header: str) -> list[str]:
        lines = (root / doc).read_text().splitlines()
        out = []
        for start in (i for i, ln in enumerate(lines) if ln.startswith(header)):
            end = next(i for i in range(start, len(lines) + 1) if i == len(lines) or not lines[i].startswith("|"))
            out.append("\n".join(lines[start:end]) + "\n")
        return out

    for doc in ("README.md", "docs/comparison.md"):
        assert blocks(doc, "| backbone, task (budget) | linear |")[:1] == [markdown(loaded)], f"{doc}: run summary.py"
    # the held-out tables' targets (the evidence), then the choosing tables' (seen while choosing)
    expected = [targets([s for s in loaded if held_out(s)]), targets([s for s in loaded if not held_out(s)])]
    assert blocks("docs/comparison.md", "| variant | tables | vs peft LoRA") == expected, "run summary.py"


def test_rows_with_a_validation_loss_break_ties_by_it_for_lrs_and_budgets():
    """The product's rule (`selection_key`): a tie on validation accuracy goes to the lower validation loss; a tie
    whose rows lack losses (made before rows recorded them) keeps accuracy alone, as it was chosen."""
    from benchmarks.report import budget_on_val, rows_tied_without_loss

    def with_loss(row: dict, loss: float) -> dict:
        return {**row, "val_loss": loss}

    tie = [with_loss(ROWS[3], 0.30), with_loss(ROWS[4], 0.40)]  # peft LoRA 3e-3 and 1e-3 tie at 0.85
    assert chosen_lr(tie, "peft-lora", "2%") == 3e-3  # the lower loss, not the smaller lr
    assert chosen_lr([tie[0], ROWS[4]], "peft-lora", "2%") == 1e-3  # one row without a loss: accuracy, smaller lr

    def rung(budget: str, count: int, val: float, loss: float, test: float) -> dict:
        return {**_row("spt-lora", 0, 1e-3, val, test, 50.0), "budget": budget, "trainable_backbone": count,
                "val_loss": loss}  # fmt: skip

    rows = [rung("2%", 2000, 0.90, 0.35, 0.91), rung("8%", 8000, 0.90, 0.25, 0.97), rung("0.5%", 500, 0.8, 0.2, 0.8),
            with_loss(_row("full", 0, 1e-4, 0.85, 0.95, 100.0), 0.1)]  # fmt: skip
    picks = budget_on_val({"meta": META, "rows": rows}, "spt-lora")
    assert [(p["budget"], p["row"]["test_acc"]) for p in picks] == [("8%", 0.97)]  # fewer values would take 2%
    assert rows_tied_without_loss({"meta": META, "rows": rows}) == []
    del rows[-1]["val_loss"]  # the full row (0.85, below the tie) without a loss: the tie still goes by loss
    assert [p["budget"] for p in budget_on_val({"meta": META, "rows": rows}, "spt-lora")] == ["8%"]
    assert rows_tied_without_loss({"meta": META, "rows": rows}) == []
    del rows[0]["val_loss"]  # a tied rung without one: the old rule (fewer values), and it is the row to re-run
    assert [p["budget"] for p in budget_on_val({"meta": META, "rows": rows}, "spt-lora")] == ["2%"]
    assert rows_tied_without_loss({"meta": META, "rows": rows}) == [rows[0]]
    rows[0]["val_loss"] = 0.35  # every rung has its loss again
    rows[-1]["val_acc"] = 0.95  # full at its own lr (1e-4) wins outright: no tie in that ladder
    at_lr = _row("full", 0, 1e-3, 0.90, 0.93, 100.0)  # the product's full rung (the method's lr) ties 2 % and 8 %
    assert rows_tied_without_loss({"meta": META, "rows": [*rows, at_lr]}) == [at_lr]


def test_every_committed_table_is_its_json_report(tmp_path: Path, monkeypatch):
    """Each benchmarks/results/compare_*.md is what its JSON writes now (`compare.py --report-only`): a table never
    shows a choice the current rules would not make (e.g. a tie-break changed after the table was written)."""
    import benchmarks.report
    from benchmarks.report import write_any_report

    monkeypatch.setattr(benchmarks.report, "_plot", lambda *a, **k: None)  # the .md only
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    jsons = sorted(results.rglob("compare_*.json"))  # with results/gpu/ and results/selection/
    assert len(jsons) >= 14
    stale = []
    for path in jsons:
        out = tmp_path / path.parent.name
        out.mkdir(exist_ok=True)
        write_any_report(json.loads(path.read_text()), out / path.stem)
        if (out / f"{path.stem}.md").read_text() != path.with_suffix(".md").read_text():
            stale.append(str(path.relative_to(results)))
    assert not stale, f"run `python benchmarks/compare.py --report-only` on {stale}"
