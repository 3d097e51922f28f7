"""Model selection in the comparison harness on known values: each rule (`benchmarks/selection.py`) replayed on
hand-made per-epoch curves, and k-fold cross-validation (folds from `task_data.kfold_dirs`, the replay on their mean).
The harness end to end: tests/test_compare.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.task_data import kfold_dirs
from spt_core.portable.errors import SensituneError


def _curve_row(method: str, seed: int, lr: float, vals, losses, tests, **extra) -> dict:
    """A harness row with per-epoch curves (`compare.py --curves`), as `benchmarks/selection.py` reads them."""
    curve = [{"epoch": i + 1, "val_acc": v, "val_loss": lo, "test_acc": t}
             for i, (v, lo, t) in enumerate(zip(vals, losses, tests))]  # fmt: skip
    return {"method": method, "seed": seed, "lr": lr, "budget": "2%", "curve": curve, **extra}


def test_selection_replay_rules_on_known_curves() -> None:
    """benchmarks/selection.py on hand-made curves where every rule picks a different (epoch, lr)."""
    from benchmarks.selection import replay

    def run(seed, lr, vals, losses, tests):
        return _curve_row("spt-lora", seed, lr, vals, losses, tests)

    rows = [
        # seed 0: lr 1e-3 peaks at epoch 1 on val acc (0.9) but its loss is lowest at epoch 3
        run(0, 1e-3, [0.9, 0.5, 0.8], [0.5, 0.6, 0.4], [0.70, 0.60, 0.80]),
        run(0, 3e-3, [0.85, 0.85, 0.85], [0.45, 0.45, 0.45], [0.90, 0.90, 0.90]),
        # seed 1: 3e-3 is better on val; pooled over seeds 3e-3 wins on acc (0.85 + 0.7 > 0.9 + 0.6)
        run(1, 1e-3, [0.6, 0.6, 0.6], [0.9, 0.9, 0.9], [0.50, 0.50, 0.50]),
        run(1, 3e-3, [0.7, 0.6, 0.6], [0.3, 0.3, 0.2], [0.95, 0.96, 0.97]),
    ]
    assert replay(rows, "spt-lora", "acc", "seed0") == {0: 0.70, 1: 0.50}
    assert replay(rows, "spt-lora", "acc", "per-seed") == {0: 0.70, 1: 0.95}
    assert replay(rows, "spt-lora", "acc", "pooled") == {0: 0.90, 1: 0.95}
    # smoothed: 1e-3 seed 0 -> means (0.7, 0.733, 0.65), 3e-3 -> 0.85 everywhere: 3e-3 epoch 1
    assert replay(rows, "spt-lora", "smooth", "seed0") == {0: 0.90, 1: 0.95}
    # loss: seed 0's 1e-3 reaches 0.4 (< 0.45) at epoch 3 -> lr 1e-3; seed 1 at 1e-3 reads epoch 1 (all 0.9)
    assert replay(rows, "spt-lora", "loss", "seed0") == {0: 0.80, 1: 0.50}
    assert replay(rows, "spt-lora", "loss", "per-seed") == {0: 0.80, 1: 0.97}


def test_acc_then_loss_breaks_accuracy_ties_by_loss_for_epochs_and_lrs() -> None:
    """Saturated validation accuracy: "acc" takes the first epoch and the smaller lr, "acc>loss" the lower loss."""
    from benchmarks.selection import replay

    def run(seed, lr, vals, losses, tests):
        return _curve_row("full", seed, lr, vals, losses, tests)

    rows = [
        run(0, 1e-4, [1.0, 0.9, 1.0], [0.30, 0.40, 0.20], [0.80, 0.85, 0.90]),  # acc ties at epochs 1 and 3
        run(0, 3e-4, [1.0, 1.0, 1.0], [0.25, 0.10, 0.15], [0.95, 0.99, 0.97]),  # the lowest loss of all: epoch 2
        run(1, 1e-4, [0.8, 0.8, 0.8], [0.50, 0.40, 0.45], [0.70, 0.75, 0.72]),
        run(1, 3e-4, [0.9, 0.7, 0.7], [0.60, 0.05, 0.05], [0.60, 0.90, 0.90]),  # best acc, not best loss
    ]
    assert replay(rows, "full", "acc", "seed0") == {0: 0.80, 1: 0.70}  # 1e-4 (tie -> smaller), epoch 1
    assert replay(rows, "full", "acc>loss", "seed0") == {0: 0.99, 1: 0.60}  # 3e-4 (0.10 < 0.20), epoch 2
    assert replay(rows, "full", "acc>loss", "per-seed") == {0: 0.99, 1: 0.60}  # seed 1: accuracy still rules
    assert replay(rows, "full", "acc", "per-seed") == {0: 0.80, 1: 0.60}
    # pooled: acc sums 1.8 (1e-4) vs 1.9 (3e-4) -> 3e-4 for both; seed 1 at 3e-4 reads epoch 1
    assert replay(rows, "full", "acc>loss", "pooled") == {0: 0.99, 1: 0.60}
    assert replay(rows, "full", "loss", "seed0") == {0: 0.99, 1: 0.90}


def test_kfold_replay_picks_lr_and_epoch_on_the_mean_of_the_folds() -> None:
    """Fold 0 alone would pick lr 1e-3 epoch 1; the mean over both folds picks 3e-3 epoch 2, read on the refit."""
    from benchmarks.selection import kfold

    def run(lr, fold, vals, losses, tests=(0.0, 0.0, 0.0), seed=0):
        return _curve_row("spt-lora", seed, lr, vals, losses, tests, fold=fold)

    rows = [
        run(1e-3, 0, [0.9, 0.5, 0.5], [0.5, 0.6, 0.7]),  # means: (0.70, 0.55, 0.50)
        run(1e-3, 1, [0.5, 0.6, 0.5], [0.9, 0.3, 0.9]),  # loss means: (0.70, 0.45, 0.80)
        run(3e-3, 0, [0.8, 0.8, 0.6], [0.6, 0.6, 0.6]),  # means: (0.70, 0.75, 0.65)
        run(3e-3, 1, [0.6, 0.7, 0.7], [0.5, 0.5, 0.2]),  # loss means: (0.55, 0.55, 0.40)
        run(1e-3, "refit", [0, 0, 0], [0, 0, 0], (0.61, 0.62, 0.63)),
        run(3e-3, "refit", [0, 0, 0], [0, 0, 0], (0.71, 0.72, 0.73)),
        run(3e-3, 0, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], seed=1),  # seed 1 lacks folds: left out
    ]
    assert kfold(rows, "spt-lora", "acc") == {0: 0.72}
    assert kfold(rows, "spt-lora", "loss") == {0: 0.73}


def test_kfold_splits_are_stratified_disjoint_and_the_refit_has_every_labelled_image(tmp_path: Path) -> None:
    """Two classes whose files share names (a folder source): each class is dealt on its own, folds differ by <= 1."""
    from collections import Counter

    from PIL import Image

    from spt_core.data import prepare
    from spt_core.data.loaders import scan_split

    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for split, n in (("train", 11), ("val", 4), ("test", 3)):
        for c in ("a", "b"):
            (src / split / c).mkdir(parents=True)
            for j in range(n):  # the same file names in both classes
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(src / split / c / f"{j}.png")
    data = tmp_path / "data"
    prepare(str(src), data, n_train=None, n_val=None, n_test=None, seed=0, split=None, ok_class=None)
    folds, refit = kfold_dirs(data, 4)
    names = ["a", "b"]

    def ids(d, split):  # the source image each prepared file came from: its pixels
        return Counter((y, Image.open(p).tobytes()) for p, y in scan_split(d / split, names))

    labelled = ids(data, "train") + ids(data, "val")
    vals = [ids(f, "val") for f in folds]
    assert sum(vals, Counter()) == labelled  # every labelled image validates exactly once
    for f, v in zip(folds, vals):
        assert ids(f, "train") + v == labelled and ids(f, "test") == ids(data, "test")
        assert sorted(Counter(y for y, _ in v.elements()).values()) in ([3, 4], [4, 4], [4, 3])  # 15 a class / 4
    assert sorted(sum(vals[i].values()) for i in range(4)) == [7, 7, 8, 8]  # 30 images: the spares spread out
    assert ids(refit, "train") == labelled and ids(refit, "test") == ids(data, "test")
    assert kfold_dirs(data, 4) == (folds, refit)  # made once
    info = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**info, "data_hash": "another"}))
    with pytest.raises(SensituneError, match="delete"):
        kfold_dirs(data, 4)
