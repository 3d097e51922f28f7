"""Smoke test of the method-comparison harness (benchmarks/compare.py): tiny model, tiny digits, 1 epoch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import compare  # noqa: E402
from benchmarks.methods import (  # noqa: E402
    count_trainable,
    lora_cost_per_rank,
    lora_target_modules,
    nearest_rank,
    setup_method,
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=10)


def test_harness_table_and_counts(tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = ["--backbone", "test-effnet", "--task", "digits", "--n-train", "40", "--n-val", "20", "--n-test", "20",
            "--epochs", "1", "--seeds", "2", "--methods", "bitfit,sparse-only", "--lr-grid", "1e-3,3e-3",
            "--budget", "1%", "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir", str(out),
            "--in-process"]  # fmt: skip
    path = compare.main(argv)
    state = json.loads(path.read_text())
    rows = state["rows"]
    # seed 0 tries both lrs, seed 1 only the chosen one: 2 methods x (2 + 1) rows, and 2 sensitivity passes
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
        [("bitfit", 0), ("bitfit", 0), ("bitfit", 1), ("sparse-only", 0), ("sparse-only", 0), ("sparse-only", 1)]
    )
    assert [s["seed"] for s in state["sensitivity"]] == [0, 1] and all(s["images"] == 40 for s in state["sensitivity"])
    for m in ("bitfit", "sparse-only"):
        seed1 = next(r for r in rows if r["method"] == m and r["seed"] == 1)
        assert seed1["lr"] == compare.chosen_lr(rows, m, "1%")
    model = _model()
    head = {n for n, _ in model.named_parameters() if n.startswith("classifier")}
    backbone = sum(p.numel() for n, p in model.named_parameters() if n not in head)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and n not in head)
    for r in rows:
        assert r["trainable_head"] == 10 * model.num_features + 10 and r["backbone_params"] == backbone
        assert 0 <= r["test_acc"] <= 1 and r["epochs"] == 1
        if r["method"] == "bitfit":
            assert r["trainable_backbone"] == biases
        else:  # the plan never exceeds the budget and is all sparse entries or whole vectors
            assert 0 < r["trainable_backbone"] <= r["budget_count"] == round(backbone / 100)
            assert r["details"]["by_kind"]["lora"] == r["details"]["by_kind"]["adapter"] == 0
            assert sum(r["details"]["by_kind"].values()) == r["trainable_backbone"]
    md = (out / "compare_test-effnet_digits.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:8] == ["method", "lr (grid: val %)", "trainable backbone", "%", "head", "val %", "test %", "seeds"]
    body = {ln.split("|")[1].strip(): ln for ln in table[1:] if ln.split("|")[1].strip() in ("bitfit", "sparse-only")}
    assert set(body) == {"bitfit", "sparse-only"}
    assert f"| {biases:,} |" in body["bitfit"] and all(
        len(ln.split("|")) == len(table[0].split("|")) for ln in body.values()
    )
    assert (
        md.startswith("# test_efficientnet")
        and "Command: `" in md
        and (out / "compare_test-effnet_digits.png").is_file()
    )
    # resume: a second invocation finds every row and runs nothing new
    assert len(json.loads(compare.main(argv).read_text())["rows"]) == len(rows)


@pytest.mark.parametrize("method", ["linear", "full", "peft-lora", "random-sparse"])
def test_method_counts(method: str) -> None:
    model = _model()
    n_head = sum(p.numel() for p in model.get_classifier().parameters())
    total = sum(p.numel() for p in model.parameters())
    budget = 5000
    if method == "peft-lora":
        per_rank = lora_cost_per_rank(model, lora_target_modules(model))
    model, info = setup_method(model, method, budget, seed=3)
    assert info.trainable_head == n_head and count_trainable(model) == (info.trainable_backbone, n_head)
    if method == "linear":
        assert info.trainable_backbone == 0
    elif method == "full":
        assert info.trainable_backbone == total - n_head
    elif method == "peft-lora":  # uniform rank on the 1x1 convs (SE excluded), nearest the budget
        rank = info.details["rank"]
        assert info.trainable_backbone == rank * per_rank
        assert abs(rank * per_rank - budget) <= min(abs(r * per_rank - budget) for r in range(1, 50))
        assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    else:
        assert 0 < info.trainable_backbone <= budget


def test_nearest_rank() -> None:
    assert nearest_rank(67420, 22784) == 3 and nearest_rank(100, 1000) == 1 and nearest_rank(1500, 1000) == 1
