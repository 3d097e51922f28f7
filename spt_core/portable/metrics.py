"""Defect-first metrics: what a line judges a model by, from a confusion matrix or from P(good) at a threshold.

Torch-free (numpy only): training, evaluation, the benchmarks and the edge's rollout statistics share it.

Definitions (``ok`` = the declared good class, every other class is a defect):
    escape rate   defective parts passed as good / defective parts       (slip, miss; a line fixes a ceiling)
    overkill      good parts rejected / good parts                       (false reject; minimised under the ceiling)
    balanced accuracy   mean over classes of per-class recall            (plain accuracy hides escapes)
Counts are small on a line (a handful of defects per class), so every rate carries a 95 % Wilson interval.

The operating decision is a threshold on P(good): a part is *rejected* when P(good) < threshold. The threshold
is chosen on validation (`choose_threshold`) as the lowest one whose escape rate meets the ceiling, i.e. the one
with the lowest overkill among those that meet it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
SELECT = ("accuracy", "balanced_accuracy", "overkill_at_escape", "loss")  # what `train.select` may name


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for k successes in n trials (good near 0 and 1, unlike the normal interval)."""
    if n == 0:
        return None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def confusion_matrix(labels: Sequence[int] | np.ndarray, preds: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """(k, k) int64 counts, ``[true][pred]``."""
    y, p = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k)


def _rate(k: int, n: int) -> dict[str, Any]:
    return {"value": k / n if n else None, "k": int(k), "n": int(n), "ci95": wilson_interval(int(k), int(n))}


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes that have samples."""
    cm = np.asarray(cm)
    true_n = cm.sum(1)
    present = true_n > 0
    return float((cm.diagonal()[present] / true_n[present]).mean()) if present.any() else 0.0


def class_metrics(cm: np.ndarray, class_names: Sequence[str], ok_class: str | None = None) -> dict[str, Any]:
    """Per-class precision and recall (with Wilson intervals), balanced accuracy, and, with an ``ok_class``, the
    escape rate and overkill of the argmax decision (a defect predicted as any defect class is caught)."""
    cm = np.asarray(cm, np.int64)
    diag, true_n, pred_n = cm.diagonal(), cm.sum(1), cm.sum(0)
    out: dict[str, Any] = {
        "accuracy": float(diag.sum() / cm.sum()) if cm.sum() else None,
        "balanced_accuracy": balanced_accuracy(cm),
        "confusion": cm.tolist(),
        "class_names": list(class_names),
        "per_class": {
            name: {"recall": _rate(diag[i], true_n[i]), "precision": _rate(diag[i], pred_n[i])}
            for i, name in enumerate(class_names)
        },
    }
    if ok_class is not None:
        g = list(class_names).index(ok_class)
        defects = int(true_n.sum() - true_n[g])
        out["escape_rate"] = _rate(int(cm[:, g].sum() - cm[g, g]), defects)  # true defect, predicted ok
        out["overkill"] = _rate(int(true_n[g] - cm[g, g]), int(true_n[g]))  # true ok, predicted a defect
    return out


def rates_at(p_good: np.ndarray, is_defect: np.ndarray, threshold: float) -> dict[str, Any]:
    """Escape rate and overkill when parts with P(good) < threshold are rejected."""
    p_good, is_defect = np.asarray(p_good, np.float64), np.asarray(is_defect, bool)
    passed = p_good >= threshold
    return {
        "threshold": float(threshold),
        "escape_rate": _rate(int((passed & is_defect).sum()), int(is_defect.sum())),
        "overkill": _rate(int((~passed & ~is_defect).sum()), int((~is_defect).sum())),
    }


def choose_threshold(p_good: np.ndarray, is_defect: np.ndarray, max_escape_rate: float) -> float:
    """The lowest reject threshold on P(good) whose escape rate on these parts is at most ``max_escape_rate``.

    With D defects, at most a = floor(max_escape_rate * D) may pass: the threshold lies just above the (a+1)-th
    highest defect P(good) (midway to the next higher P(good) of any part, so it does not sit on a sample).
    Every lower threshold lets more defects through; every higher one rejects at least as many good parts.
    """
    p_good, is_defect = np.asarray(p_good, np.float64), np.asarray(is_defect, bool)
    d = np.sort(p_good[is_defect])[::-1]  # defect P(good), highest first
    allowed = math.floor(max_escape_rate * len(d) + 1e-9)
    if allowed >= len(d):
        return 0.0  # no defects, or a ceiling that allows all of them through: reject nothing
    edge = d[allowed]  # the highest P(good) that must be rejected
    above = p_good[p_good > edge]
    return float((edge + above.min()) / 2) if above.size else float(np.nextafter(edge, np.inf))


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


def selection_score(
    labels: np.ndarray, probs: np.ndarray, select: str, ok_index: int | None = None, max_escape_rate: float = 0.0
) -> float:
    """Higher is better: accuracy, balanced accuracy, minus the overkill at the validation-chosen threshold, or
    ("loss") minus the mean cross-entropy of the true class (unweighted, no label smoothing)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    if select == "accuracy":
        return float((probs.argmax(1) == labels).mean())
    if select == "balanced_accuracy":
        return balanced_accuracy(confusion_matrix(labels, probs.argmax(1), probs.shape[1]))
    if select == "overkill_at_escape":
        if ok_index is None:
            raise ValueError("select=overkill_at_escape needs the good class (data.ok_class)")
        is_defect = labels != ok_index
        t = choose_threshold(probs[:, ok_index], is_defect, max_escape_rate)
        ov = rates_at(probs[:, ok_index], is_defect, t)["overkill"]["value"]
        return -(ov if ov is not None else 0.0)
    if select == "loss":
        return float(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    raise ValueError(f"select={select!r}: use one of {', '.join(SELECT)}")


def decision_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    ok_class: str | None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """`class_metrics` of the argmax, plus the escape rate and overkill at ``threshold`` when there is a good class."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    out = class_metrics(confusion_matrix(labels, probs.argmax(1), len(class_names)), class_names, ok_class)
    if ok_class is not None and threshold is not None:
        g = list(class_names).index(ok_class)
        out["at_threshold"] = rates_at(probs[:, g], labels != g, threshold)
    return out
