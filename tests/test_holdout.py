"""benchmarks/holdout.py: the default plan is picked on validation scores only, by the tables left out of the report."""

from __future__ import annotations

import pytest

from benchmarks import holdout
from benchmarks.summary import VARIANTS

BUDGET = "2%"


def _row(method: str, val: float, test: float, seed: int = 0) -> dict:
    return {"method": method, "budget": BUDGET, "lr": 1e-3, "seed": seed, "val_acc": val / 100,
            "test_acc": test / 100, "trainable_backbone": 1, "trainable_head": 1, "trainable_pct": 1.0,
            "details": {}, "peak_memory_mb": 1.0, "s_per_train_epoch": 1.0, "wall_s": 1.0}  # fmt: skip


def _table(task: str, val: dict[str, float], test: dict[str, float]) -> dict:
    """A table where every method ran two seeds with the given mean val/test % (seed 1 = seed 0 +- 1)."""
    rows = []
    for m in val:
        rows += [_row(m, val[m] - 1, test[m] - 1, 0), _row(m, val[m] + 1, test[m] + 1, 1)]
    return {"meta": {"backbone": "tf_efficientnet_lite0", "task": task, "budget": BUDGET}, "rows": rows}


def _gaps(val: dict[str, float], test: dict[str, float]) -> dict:
    """Scores as gaps to peft LoRA (at 90) and full (at 95) for the four variants."""
    names = dict(zip(VARIANTS, ("spt-lora", "spt-adapter", "sparse-only", "per-row-sparse"), strict=True))
    v = {"peft-lora": 90.0, "full": 95.0} | {names[k]: 90.0 + g for k, g in val.items()}
    t = {"peft-lora": 90.0, "full": 95.0} | {names[k]: 90.0 + g for k, g in test.items()}
    return {"val": v, "test": t}


A, B, C, D = VARIANTS  # spt-lora, spt-adapter, sparse-only, per-row-sparse


def test_the_pick_reads_validation_only_and_its_worst_case() -> None:
    """D has the best worst case on validation (C the best mean, and the best test everywhere): a rule on test, or on
    the mean, picks another variant."""
    t1 = _table("t1", **_gaps({A: -3, B: -3, C: +4, D: +1}, {A: 0, B: 0, C: +5, D: 0}))
    t2 = _table("t2", **_gaps({A: -3, B: -3, C: -1, D: +0.5}, {A: 0, B: 0, C: +5, D: -2}))
    chosen, summary = holdout.pick([t1, t2])
    assert chosen == D
    assert summary[D] == pytest.approx((0.5, 0.75)) and summary[C] == pytest.approx((-1.0, 1.5))


def test_a_left_out_table_never_takes_part_in_its_own_pick() -> None:
    """With t3 choosing, its validation sinks D and C wins; left out, t3 reports the pick of t1 and t2 (D), and its
    own test gaps for that pick."""
    t1 = _table("t1", **_gaps({A: -3, B: -3, C: 0, D: +1}, {A: 0, B: 0, C: 0, D: 0}))
    t2 = _table("t2", **_gaps({A: -3, B: -3, C: 0, D: +1}, {A: 0, B: 0, C: 0, D: 0}))
    t3 = _table("t3", **_gaps({A: -3, B: -3, C: 0, D: -2}, {A: 0, B: 0, C: 0, D: +3}))
    assert holdout.pick([t1, t2, t3])[0] == C
    out = {r["table"]: r for r in holdout.leave_one_out([t1, t2, t3])}
    assert out["Lite0 t3"]["pick"] == D and out["Lite0 t3"]["chosen_by"] == 2
    assert (out["Lite0 t3"]["test_vs_peft"], out["Lite0 t3"]["test_vs_full"]) == pytest.approx((3.0, -2.0))
    assert out["Lite0 t1"]["pick"] == C  # t2 and t3 choose for t1: C's worst 0 beats D's -2


def test_declared_held_out_tables_never_choose(monkeypatch: pytest.MonkeyPatch) -> None:
    t1 = _table("t1", **_gaps({A: -3, B: -3, C: 0, D: +1}, {A: 0, B: 0, C: 0, D: 0}))
    t2 = _table("t2", **_gaps({A: -3, B: -3, C: 0, D: +1}, {A: 0, B: 0, C: 0, D: 0}))
    new = _table("new", **_gaps({A: -3, B: -3, C: 0, D: -5}, {A: 0, B: 0, C: 0, D: +2}))
    assert holdout.pick(holdout.choosing([t1, t2, new]))[0] == C  # were it choosing, its validation would sink D
    monkeypatch.setattr(holdout, "HELD_OUT", ("new",))
    out = {r["table"]: r for r in holdout.leave_one_out([t1, t2, new])}
    assert out["Lite0 t1"]["pick"] == D and out["Lite0 t1"]["chosen_by"] == 1  # t2 alone: "new" never chooses
    assert out["Lite0 new"] == {"table": "Lite0 new", "role": "held out", "chosen_by": 2, "pick": D,
                                "test_vs_peft": pytest.approx(2.0), "test_vs_full": pytest.approx(-3.0)}  # fmt: skip
