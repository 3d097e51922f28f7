"""benchmarks/report.py on a hand-made table whose every published number is known in advance."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import chosen_lr, summarize, summary_metrics, write_report  # noqa: E402


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
