"""Defect-first metrics: what a line judges a model by, from a confusion matrix; and THE softmax.

Torch-free (numpy only): training, evaluation, the benchmarks and the edge's rollout statistics share it.

Definitions (``ok`` = the declared good class, every other class is a defect):
    escape rate   defective parts passed as good / defective parts       (slip, miss; a line fixes a ceiling)
    overkill      good parts rejected / good parts                       (false reject; minimised under the ceiling)
    balanced accuracy   mean over classes of per-class recall            (plain accuracy hides escapes)
Counts are small on a line (a handful of defects per class), so every rate carries a 95 % Wilson interval (`rate`).

Which parts are passed or rejected, and so the escape rate and overkill, belong to the operating point
(`spt_core.portable.operating_point`): its reject rule, its rates, and how its threshold is chosen on validation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
SELECT = ("accuracy", "balanced_accuracy", "overkill_at_escape", "loss")  # what `train.select` may name
BALANCE = ("none", "loss", "sampler", "both", "auto")  # what `train.balance` may name: class-weighted loss, the
# loaders' class-balanced sampler, both, or auto (`resolve_balance`)
IMBALANCED = 2.0  # auto: a split is imbalanced when its largest class has at least twice its smallest's images


def resolve_balance(balance: str, labels: Sequence[int]) -> str:
    """The balance a training split gets: ``auto`` is ``sampler`` when the largest class of `labels` has at least
    `IMBALANCED` times the images of the smallest (a line's good parts against its defects), else ``none`` (plain
    batches, the same as ``none`` bit for bit); every other value as given."""
    if balance != "auto":
        return balance
    counts = np.unique(np.asarray(list(labels), dtype=np.int64), return_counts=True)[1]
    return "sampler" if len(counts) and counts.max() >= IMBALANCED * counts.min() else "none"


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for k successes in n trials (good near 0 and 1, unlike the normal interval)."""
    if n == 0:
        return None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # exact ends at k = 0 and k = n: rounding leaves ~1e-17 there, enough for "0 escapes is worse than 0 escapes"
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def confusion_matrix(labels: Sequence[int] | np.ndarray, preds: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """(k, k) int64 counts, ``[true][pred]``."""
    y, p = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k)


def rate(k: int, n: int) -> dict[str, Any]:
    """k of n as ``{"value", "k", "n", "ci95"}``: the counts travel with the rate, so a reader can re-derive both."""
    return {"value": k / n if n else None, "k": int(k), "n": int(n), "ci95": wilson_interval(int(k), int(n))}


def softmax(logits: Any, axis: int = -1) -> np.ndarray:
    """Probabilities from logits, in float64 whatever the input (the edge, `predict` and the gate decide on the same
    numbers); the max is subtracted first, so large logits do not overflow."""
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes that have samples."""
    cm = np.asarray(cm)
    true_n = cm.sum(1)
    present = true_n > 0
    return float((cm.diagonal()[present] / true_n[present]).mean()) if present.any() else 0.0


def class_metrics(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, the confusion matrix and per-class precision and recall (with Wilson intervals)."""
    cm = np.asarray(cm, np.int64)
    diag, true_n, pred_n = cm.diagonal(), cm.sum(1), cm.sum(0)
    out: dict[str, Any] = {
        "accuracy": float(diag.sum() / cm.sum()) if cm.sum() else None,
        "balanced_accuracy": balanced_accuracy(cm),
        "confusion": cm.tolist(),
        "class_names": list(class_names),
        "per_class": {
            name: {"recall": rate(diag[i], true_n[i]), "precision": rate(diag[i], pred_n[i])}
            for i, name in enumerate(class_names)
        },
    }
    return out


SELECTION_RULE = "score>loss"  # names `selection_key`: a checkpoint's best epoch was chosen by this rule


def selection_key(score: float, loss: float | None) -> tuple[float, float]:
    """What epochs and ladder rungs are ranked by (higher is better): the validation score (``train.select``),
    then the lower validation loss. A small validation set ties often (40 images that all pass tie every epoch
    and rung), and the loss still tells the confident candidate from the lucky one
    (`benchmarks/results/compare_*_selection.md`, rule "acc>loss"). No loss (older records): the score alone."""
    return (score, -math.inf if loss is None else -loss)


def tied_at_best(items: Sequence[T], score: Callable[[T], float]) -> list[T]:
    """The items with the highest score, in their order."""
    best = max(score(i) for i in items)
    return [i for i in items if score(i) == best]


def best_by_selection(
    items: Sequence[T], score: Callable[[T], float], loss: Callable[[T], float | None], tiebreak: Callable[[T], Any]
) -> T:
    """The item `selection_key` ranks first, then the highest `tiebreak`, then the earliest. A loss breaks the score
    tie only when every item tied at the best score has one (records made before losses were kept: the score and
    `tiebreak` alone, as they were chosen)."""
    top = tied_at_best(items, score)
    losses = all(loss(i) is not None for i in top)
    return max(top, key=lambda i: (selection_key(score(i), loss(i) if losses else None), tiebreak(i)))
