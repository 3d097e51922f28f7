"""The CNN gap study's rule: a variant is adopted on its worst validation difference over the choosing tables only."""

from __future__ import annotations

from benchmarks import cnn_gap


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
