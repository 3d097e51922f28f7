"""The operating point: the good class, the reject threshold on P(good), and the escape ceiling it was chosen for.

One frozen value owns the line's decision and everything derived from it. Training, `sensitune evaluate`, the
hand-over gate, the export manifest, the edge's answers, its rollout statistics and the operator pages ask it;
nobody re-types the rule:

    decide     a part is rejected when P(good) < threshold; P(good) == threshold passes
    rates      escape rate = defects passed / defects, overkill = good parts rejected / good parts (k/n + Wilson)
    choose     on validation: the lowest threshold whose escape rate meets ``max_escape_rate``, which is the one
               with the least overkill among those that meet it
    to_dict    the keys ``ok_class``, ``threshold``, ``max_escape_rate`` that metrics.json, the tuned and merged
               model info and every artifact manifest carry; ``from_dict`` reads them back from any of those, checked

Without a threshold the top class decides (ok when it is the good class); without a good class there is no
reject decision and no defect metric. Torch-free (numpy only): the edge box imports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from spt_core.portable.errors import SensituneError
from spt_core.portable.metrics import SELECT, balanced_accuracy, class_metrics, confusion_matrix, rate, softmax

ACCEPT, REJECT = "ok", "reject"  # the two decisions a line acts on
KEYS = ("ok_class", "threshold", "max_escape_rate")  # what `to_dict` writes and `from_dict` reads
# `choose` puts the threshold just above the highest P(good) it must reject; when that is exactly 1.0 (float64
# softmax saturates), the threshold is the next float above 1.0 and rejects every part.
_MAX_THRESHOLD = float(np.nextafter(1.0, 2.0))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _problem(ok_class: Any, threshold: Any, max_escape_rate: Any) -> str | None:
    """What is wrong with these values, in words with the fix; None when they make an operating point."""
    if ok_class is not None and (not isinstance(ok_class, str) or not ok_class):
        return f"ok_class={ok_class!r} is not a class name: write the good class's name, or null"
    if threshold is not None:
        if not _number(threshold) or not 0.0 <= threshold <= _MAX_THRESHOLD:
            return f"threshold={threshold!r} is not a number in [0, 1]: write the P(good) that a part needs to pass"
        if ok_class is None:
            return f"threshold={threshold!r} without an ok_class: declare the good class it applies to, or drop it"
    if max_escape_rate is not None and (not _number(max_escape_rate) or not 0.0 <= max_escape_rate <= 1.0):
        return f"max_escape_rate={max_escape_rate!r} is not a fraction in [0, 1]: write e.g. 0.005"
    return None


def _lowest_threshold(p_good: np.ndarray, is_defect: np.ndarray, max_escape_rate: float) -> float:
    """The lowest reject threshold on P(good) whose escape rate on these parts is at most ``max_escape_rate``.

    With D defects, at most a = floor(max_escape_rate * D) may pass: the threshold lies just above the (a+1)-th
    highest defect P(good) (midway to the next higher P(good) of any part, so it does not sit on a sample).
    Every lower threshold lets more defects through; every higher one rejects at least as many good parts.
    """
    d = np.sort(p_good[is_defect])[::-1]  # defect P(good), highest first
    allowed = math.floor(max_escape_rate * len(d) + 1e-9)
    if allowed >= len(d):
        return 0.0  # no defects, or a ceiling that allows all of them through: reject nothing
    edge = d[allowed]  # the highest P(good) that must be rejected
    above = p_good[p_good > edge]
    return float((edge + above.min()) / 2) if above.size else float(np.nextafter(edge, np.inf))


@dataclass(frozen=True)
class OperatingPoint:
    """The line's decision rule (see the module docstring); every field may be None.

    Attributes:
        ok_class: The good class; every other class is a defect. None: plain classification, no reject decision.
        threshold: Reject when P(ok_class) < threshold. None: the top class decides.
        max_escape_rate: The escape ceiling the threshold was chosen for on validation (a record; rules nothing).

    Raises:
        SensituneError: a value of the wrong type or range, or a threshold without a good class.
    """

    ok_class: str | None = None
    threshold: float | None = None
    max_escape_rate: float | None = None

    def __post_init__(self) -> None:
        if problem := _problem(self.ok_class, self.threshold, self.max_escape_rate):
            raise SensituneError(f"operating point: {problem}")
        for name in ("threshold", "max_escape_rate"):  # numpy scalars and ints read back as plain floats
            if (v := getattr(self, name)) is not None:
                object.__setattr__(self, name, float(v))

    # ---------------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """``{"ok_class", "threshold", "max_escape_rate"}``, None values included (export leaves those out)."""
        return {"ok_class": self.ok_class, "threshold": self.threshold, "max_escape_rate": self.max_escape_rate}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "operating point") -> OperatingPoint:
        """The operating point a manifest, metrics.json or a model's info carries among its other keys (absent: None).

        Raises:
            SensituneError: one line naming ``where``, the key and the fix.
        """
        if data is not None and not isinstance(data, Mapping):
            raise SensituneError(f"{where}: expected a mapping holding {', '.join(KEYS)}, got {type(data).__name__}")
        values = {k: (data or {}).get(k) for k in KEYS}
        if problem := _problem(*values.values()):
            raise SensituneError(f"{where}: {problem}")
        return cls(**values)

    # --------------------------------------------------------------------------------------------------- the rule
    def index(self, class_names: Sequence[str]) -> int:
        """The good class's position in ``class_names`` (the logit order)."""
        if self.ok_class is None:
            raise SensituneError("the operating point has no ok_class: declare the good class (data.ok_class)")
        try:
            return list(class_names).index(self.ok_class)
        except ValueError:
            raise SensituneError(
                f"ok_class={self.ok_class!r} is not one of the model's classes {list(class_names)}: fix ok_class"
            ) from None

    def p_good(self, scores: Any, class_names: Sequence[str], *, logits: bool = False) -> Any:
        """P(good) of (..., C) probabilities (or logits, with ``logits=True``), in float64: a float for one vector."""
        probs = softmax(scores) if logits else np.asarray(scores, np.float64)
        col = probs[..., self.index(class_names)]
        return float(col) if col.ndim == 0 else col

    def decide(self, p_good: Any) -> Any:
        """THE reject rule: ``"reject"`` when P(good) < threshold, else ``"ok"``; an array in gives an array out."""
        if self.threshold is None:
            raise SensituneError("the operating point has no threshold: choose one on validation (sensitune train)")
        out = np.where(np.asarray(p_good, np.float64) >= self.threshold, ACCEPT, REJECT)
        return str(out) if out.ndim == 0 else out

    def decisions(self, probs: Any, class_names: Sequence[str]) -> np.ndarray:
        """One decision per row of (N, C) probabilities: `decide` at the threshold; without one, ``ok`` when the top
        class is the good class; without a good class, the top class's name."""
        probs = np.asarray(probs, np.float64)
        top = probs.argmax(-1)
        if self.ok_class is None:
            return np.asarray(class_names)[top]
        if self.threshold is not None:
            return np.asarray(self.decide(self.p_good(probs, class_names)))
        return np.where(top == self.index(class_names), ACCEPT, REJECT)

    def answer(self, probs: Any, class_names: Sequence[str]) -> dict[str, Any]:
        """``p_good`` (None without a good class) and ``decision`` of one probability vector: what the edge serves."""
        row = np.asarray(probs, np.float64)[None]  # (1, C)
        p_good = None if self.ok_class is None else float(self.p_good(row, class_names)[0])
        return {"p_good": p_good, "decision": str(self.decisions(row, class_names)[0])}

    def decision_of(self, served: Mapping[str, Any]) -> str | None:
        """The decision of a served answer (a /predict body, a prediction-log record): its own ``ok``/``reject``,
        made at its artifact's threshold; an answer without one (an older record) by its class. None without a
        good class."""
        if self.ok_class is None:
            return None
        if served.get("decision") in (ACCEPT, REJECT):
            return served["decision"]
        return ACCEPT if served.get("class") == self.ok_class else REJECT

    # ----------------------------------------------------------------------------------------------- statistics
    def is_defect(self, labels: Any, class_names: Sequence[str] | None = None) -> np.ndarray:
        """True where the true class is not the good class. ``labels``: class names, or indices into ``class_names``."""
        labels = np.asarray(labels)
        if labels.size == 0:
            return np.zeros(labels.shape, bool)
        if labels.dtype.kind in "iu":
            if class_names is None:
                raise SensituneError("labels given as class indices need the class names to find the good class")
            return labels != self.index(class_names)
        if self.ok_class is None:
            raise SensituneError("the operating point has no ok_class: no escape rate or overkill without one")
        return labels != self.ok_class

    def rates(self, labels: Any, decisions: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Escape rate (defects passed / defects) and overkill (good parts rejected / good parts), each as
        `spt_core.portable.metrics.rate` (value, k, n, Wilson interval). ``labels`` as in `is_defect`."""
        is_defect = self.is_defect(labels, class_names)
        rejected = np.asarray(decisions) == REJECT
        if rejected.shape != is_defect.shape:
            raise SensituneError(f"{rejected.shape} decisions for {is_defect.shape} labels: pass one of each per part")
        return {
            "escape_rate": rate(int((~rejected & is_defect).sum()), int(is_defect.sum())),
            "overkill": rate(int((rejected & ~is_defect).sum()), int((~is_defect).sum())),
        }

    def metrics(self, labels: Any, probs: Any, class_names: Sequence[str]) -> dict[str, Any]:
        """`class_metrics` of the top class, and with a good class the escape rate and overkill of the top class's
        decision; with a threshold too, ``at_threshold``: the same at this operating point. ``labels``: indices."""
        labels, probs = np.asarray(labels), np.asarray(probs)
        out = class_metrics(confusion_matrix(labels, probs.argmax(1), len(class_names)), class_names)
        if self.ok_class is None:
            return out
        top_class = replace(self, threshold=None)
        out |= top_class.rates(labels, top_class.decisions(probs, class_names), class_names)
        if self.threshold is not None:
            decided = self.decide(self.p_good(probs, class_names))
            out["at_threshold"] = {"threshold": self.threshold, **self.rates(labels, decided, class_names)}
        return out

    @classmethod
    def choose(
        cls, labels: Any, probs: Any, class_names: Sequence[str], ok_class: str | None, max_escape_rate: float
    ) -> OperatingPoint:
        """The operating point chosen on validation (labels as in `is_defect`, (N, C) probabilities): the lowest
        threshold whose escape rate is at most ``max_escape_rate``. Without a good class: no threshold."""
        op = cls(ok_class, None, max_escape_rate)
        if ok_class is None:
            return op
        if op.max_escape_rate is None:
            raise SensituneError("choosing a threshold needs the escape ceiling: set evaluate.max_escape_rate")
        t = _lowest_threshold(op.p_good(probs, class_names), op.is_defect(labels, class_names), op.max_escape_rate)
        return replace(op, threshold=t)


def flat_rates(rates: Mapping[str, Any]) -> dict[str, Any]:
    """`OperatingPoint.rates` in the flat keys that reports carry (the rollout statistics, the hand-over gate):
    ``escaped`` of ``defects`` and ``overkilled`` of ``goods``, each rate with its ``*_ci95``."""
    esc, ov = rates["escape_rate"], rates["overkill"]
    return {"defects": esc["n"], "escaped": esc["k"], "escape_rate": esc["value"], "escape_rate_ci95": esc["ci95"],
            "goods": ov["n"], "overkilled": ov["k"], "overkill": ov["value"], "overkill_ci95": ov["ci95"]}  # fmt: skip


def selection_score(
    labels: np.ndarray, probs: np.ndarray, select: str, ok_index: int | None = None, max_escape_rate: float = 0.005
) -> float:
    """Higher is better: accuracy, balanced accuracy, minus the overkill at the operating point chosen on these
    parts (`OperatingPoint.choose`), or ("loss") minus the mean cross-entropy of the true class (unweighted, no
    label smoothing)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    if select == "accuracy":
        return float((probs.argmax(1) == labels).mean())
    if select == "balanced_accuracy":
        return balanced_accuracy(confusion_matrix(labels, probs.argmax(1), probs.shape[1]))
    if select == "overkill_at_escape":
        if ok_index is None:
            raise SensituneError("select=overkill_at_escape needs the good class (data.ok_class)")
        names = [str(i) for i in range(probs.shape[1])]  # the labels are indices; the rule needs only which is good
        op = OperatingPoint.choose(labels, probs, names, names[ok_index], max_escape_rate)
        ov = op.rates(labels, op.decide(op.p_good(probs, names)), names)["overkill"]["value"]
        return -(ov if ov is not None else 0.0)
    if select == "loss":
        return float(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    raise SensituneError(f"select={select!r}: use one of {', '.join(SELECT)}")
