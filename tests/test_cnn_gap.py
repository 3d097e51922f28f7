"""The CNN gap study: its variants in the harness (the groups trained whole, the stem's own pass) and its rule (a
variant is adopted on its worst validation difference over the choosing tables only)."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch

from benchmarks import cnn_gap, compare


def _state(task: str, val: dict[str, float], test: dict[str, float]) -> dict:
    """A table whose methods score `val` / `test` (%) on each of 3 seeds at one lr."""
    rows = [{"method": m, "seed": seed, "lr": 1e-3, "budget": "2%", "val_acc": val[m] / 100, "test_acc": test[m] / 100,
             "trainable_backbone": 1, "trainable_head": 1, "trainable_pct": 1.0, "details": {}, "peak_memory_mb": 1.0,
             "s_per_train_epoch": 1.0, "wall_s": 1.0} for m in val for seed in range(3)]  # fmt: skip
    return {"meta": {"task": task, "budget": "2%"}, "rows": rows}


def test_the_pick_is_the_best_worst_validation_difference_on_the_choosing_tables():
    base = {"per-row-sparse": 90.0}
    # norm: +1.0 and -0.2 (the best mean, but worse on one table); share: +0.1 and +0.3 (above the base on both)
    mnist = _state(
        "mnist",
        base | {"per-row-norm": 91.0, "per-row-share": 90.1},
        base | {"per-row-norm": 80.0, "per-row-share": 80.0},
    )
    fashion = _state("fashion-mnist", base | {"per-row-norm": 89.8, "per-row-share": 90.3},
                     base | {"per-row-norm": 80.0, "per-row-share": 80.0})  # fmt: skip
    # a held-out table where norm leads by 5 on validation: it never chooses
    elpv = _state(
        "elpv",
        base | {"per-row-norm": 95.0, "per-row-share": 85.0},
        base | {"per-row-norm": 95.0, "per-row-share": 85.0},
    )
    states = {"mnist": mnist, "fashion-mnist": fashion, "elpv": elpv}
    adopted, worst = cnn_gap.pick(states)
    assert (
        adopted == "per-row-share"
        and round(worst["per-row-norm"], 6) == -0.2
        and round(worst["per-row-share"], 6) == 0.1
    )
    md = cnn_gap.report(states)
    assert "| elpv | held out | 0.001 | 90.00 | 90.00 | per-row-norm | +5.00 | +5.00 |" in md
    assert "Adopted as the default: per-row-share." in md

    below = _state(
        "fashion-mnist",
        base | {"per-row-norm": 89.8, "per-row-share": 90.0},
        base | {"per-row-norm": 1.0, "per-row-share": 1.0},
    )
    assert cnn_gap.pick({"mnist": mnist, "fashion-mnist": below})[0] is None  # a tie with the base is not a win
    assert cnn_gap.pick({"mnist": mnist, "elpv": elpv}) == (None, {})  # a choosing table missing: nothing adopted
    unfinished = {**fashion, "rows": [r for r in fashion["rows"] if r["method"] != "per-row-sparse" or r["seed"] < 2]}
    assert cnn_gap.pick({"mnist": mnist, "fashion-mnist": unfinished}) == (None, {})  # its base on 2 seeds so far


def test_gap_methods_train_their_groups_whole_and_the_stem_has_its_own_pass(tmp_path: Path) -> None:
    """The CNN gap study's variants: per-row sparse plus the stem / the norm layers whole, from the budget."""
    argv = ["--backbone", "test-effnet", "--task", "digits", "--n-train", "40", "--n-val", "20", "--n-test", "20",
            "--epochs", "1", "--seeds", "1", "--methods", "per-row-stem,per-row-norm,per-row-share", "--lr-grid",
            "1e-3", "--budget", "20%", "--threads", "1", "--work-dir", str(tmp_path / "work"), "--out-dir",
            str(tmp_path / "results"), "--in-process"]  # fmt: skip
    state = json.loads(compare.main(argv).read_text())
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=10)
    stem = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("conv_stem", "bn1.")))
    norms = (torch.nn.BatchNorm2d,)
    norm = sum(p.numel() for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False))
    norm -= sum(p.numel() for n, p in model.named_parameters() if n.startswith("bn1."))  # the stem's: frozen
    rows = {r["method"]: r for r in state["rows"]}
    assert set(rows) == {"per-row-stem", "per-row-norm", "per-row-share"}
    assert not any("error" in r for r in rows.values())
    assert rows["per-row-stem"]["details"]["by_kind"]["whole"] == stem  # only the stem is whole
    assert rows["per-row-norm"]["details"]["by_kind"]["whole"] == norm
    assert rows["per-row-share"]["details"]["by_kind"]["whole"] == 0
    for r in rows.values():
        assert r["trainable_backbone"] == sum(r["details"]["by_kind"].values()) <= r["budget_count"]
    assert sorted((s["seed"], bool(s.get("include_stem"))) for s in state["sensitivity"]) == [(0, False), (0, True)]
    plans = {r["details"]["plan_hash"] for r in rows.values()}
    assert len(plans) == 3  # three rules, three plans
