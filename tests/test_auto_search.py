"""The harness's "auto budget (halving)" row (benchmarks/search_job.py) and benchmarks/auto_search.py: the table
lines that set a search against one fixed-budget training, and (slow) a whole tiny run through compare.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import auto_search
from benchmarks.report import _search_lines, summarize


def _row(method: str, seed: int, wall: float, test: float, **extra) -> dict:
    return {"method": method, "seed": seed, "lr": 1e-3, "budget": "1%", "val_acc": 0.5, "val_loss": 1.0,
            "test_acc": test, "wall_s": wall, "trainable_backbone": 10, "trainable_head": 2, "trainable_pct": 1.0,
            "details": {}, "peak_memory_mb": 1.0, "s_per_train_epoch": 1.0, **extra}  # fmt: skip


def _table() -> dict:
    search = {"trainings": 1.9, "details": {"chosen_budget": "full", "chosen_lr": 3e-3}}
    rows = [_row("per-row-sparse", 0, 10.0, 0.7), _row("per-row-sparse", 1, 20.0, 0.6),
            _row("auto-halving", 1, 30.0, 0.8, **search), _row("auto-halving", 0, 50.0, 0.9, **search)]  # fmt: skip
    return {"meta": {"budget": "1%", "backbone": "tf_efficientnet_lite0", "task": "digits"}, "rows": rows}


def test_a_search_row_is_set_against_the_fixed_budget_training_of_its_own_seed():
    table = _table()
    by = {s["method"]: s for s in summarize(table)}
    assert by["auto-halving"]["test"] == pytest.approx(0.85)  # the search gets its own row in the main table
    lines = _search_lines(table, by)
    rows = [ln for ln in lines if ln.startswith("| auto budget (halving) |")]
    assert [r.split(" | ")[1] for r in rows] == ["0", "1"]  # seed order
    assert rows[0].endswith("| 1.90 | 50 | 5.00 |") and rows[1].endswith("| 1.90 | 30 | 1.50 |")  # 50/10, 30/20
    assert " full | 0.003 | 50.00 | 90.00 |" in rows[0]
    summary = auto_search.summary_rows(table)
    assert [(r["seed"], r["fixed_test"], r["fixed_wall_s"]) for r in summary] == [(0, 0.7, 10.0), (1, 0.6, 20.0)]
    # the table re-run at another train.lr: each search row pairs with the fixed training at its own lr
    search = {k: table["rows"][2][k] for k in ("trainings", "details")}
    table["rows"] += [_row("per-row-sparse", 0, 40.0, 0.75, lr=3e-3), _row("auto-halving", 0, 70.0, 0.8, lr=3e-3,
                                                                           **search)]  # fmt: skip
    summary = auto_search.summary_rows(table)
    assert [(r["train_lr"], r["seed"], r["fixed_test"]) for r in summary] == [(1e-3, 0, 0.7), (1e-3, 1, 0.6),
                                                                              (3e-3, 0, 0.75)]  # fmt: skip


def test_a_line_tables_search_row_pairs_with_the_fixed_row_of_its_variant_and_shows_balanced_accuracy(tmp_path):
    bal = {"details": {"chosen_budget": "2%", "chosen_lr": 1e-3}, "trainings": 1.9}
    rows = [_row("per-row-sparse", 0, 10.0, 0.9, variant="none", test_balanced_acc=0.5),
            _row("per-row-sparse", 0, 20.0, 0.8, variant="sampler", test_balanced_acc=0.7, val_acc=0.6,
                 val_balanced_acc=0.55),
            _row("auto-halving", 0, 40.0, 0.85, variant="sampler", test_balanced_acc=0.75, val_balanced_acc=0.45,
                 **bal)]  # fmt: skip
    meta = {"budget": "1%", "backbone": "tf_efficientnet_lite0", "task": "demo-defects", "imbalance": 0.9}
    (r,) = auto_search.summary_rows({"meta": meta, "rows": rows})
    assert r["table"] == "tf_efficientnet_lite0 demo-defects-imbalanced90"  # not the balanced demo set's name
    assert (r["fixed_test"], r["fixed_test_bal"], r["test_bal"], r["fixed_wall_s"]) == (0.8, 0.7, 0.75, 20.0)
    auto_search.write_summary([r], "cmd", tmp_path / "s.md")
    line = (tmp_path / "s.md").read_text().splitlines()[-1]
    # the trials were judged on validation balanced accuracy: 45 against the fixed row's 55, where accuracy reads 50-60
    assert line.endswith("| 50.00 | 60.00 | 85.00 | 80.00 | 45.00 | 55.00 | 75.00 | 70.00 | 1.90 | 40 | 2.00 |"), line


def test_auto_search_leaves_the_options_it_sets_to_itself():
    with pytest.raises(Exception, match="sets --task, --methods"):
        auto_search.main(["--tasks", "digits", "--", "--methods", "bitfit"])


@pytest.mark.slow  # a whole search of the product's 7 trials on tiny digits: `make slow` runs it
def test_a_tiny_auto_search_runs_the_products_trials_within_two_trainings(tmp_path: Path) -> None:
    out = auto_search.main(["--tasks", "digits", "--out-dir", str(tmp_path), "--", "--backbone", "test-effnet",
                            "--n-train", "40", "--n-val", "20", "--n-test", "20", "--epochs", "6", "--batch", "8",
                            "--seeds", "1", "--threads", "1", "--work-dir", str(tmp_path / "work"),
                            "--in-process"])  # fmt: skip
    table = json.loads((tmp_path / "compare_test-effnet_digits.json").read_text())
    row = next(r for r in table["rows"] if r["method"] == "auto-halving")
    search = row["search"]
    assert len(search["trials"]) == 7 and row["trainings"] == search["trainings"] <= 2.0  # ladder x lr_grid [1]
    assert search["total_steps"] == 6 * 5 and search["trial_steps"] <= 2 * 6 * 5
    # a 1-epoch warm-up (6 epochs): every trial judged at the first epoch's end, the best one trains on
    assert [(s["until_step"], s["trials"]) for s in search["stages"]] == [(5, 7), (30, 1)]
    chosen = next(t for t in search["trials"] if t["chosen"])
    assert (chosen["budget"], chosen["lr"]) == (row["details"]["chosen_budget"], row["details"]["chosen_lr"])
    assert chosen["stopped_at_step"] == 30 and round(20 * row["test_acc"], 6).is_integer()
    assert len(table["sensitivity"]) == 1  # every trial's plan from the seed's one pass
    assert f"| test_efficientnet digits | {row['lr']:.3g} | 0 |" in out.read_text()


def test_every_seed_runs_at_train_lr_so_a_rerun_after_train_lr_changed_measures_every_seed(monkeypatch, tmp_path):
    seen: list[list[str]] = []
    monkeypatch.setattr(auto_search.compare, "main", lambda argv: seen.append(argv) or tmp_path)
    auto_search.run_tables(["digits"], ["--backbone", "lite0", "--seeds", "3"], tmp_path)
    argv = seen[-1]
    assert argv[argv.index("--grid-seeds") + 1] == "3"  # not the default 1: seed 0's lr choice would pick for all
    auto_search.run_tables(["digits"], ["--seeds", "3", "--grid-seeds", "2"], tmp_path)
    assert seen[-1].count("--grid-seeds") == 1 and seen[-1][seen[-1].index("--grid-seeds") + 1] == "2"
