"""The champion/challenger comparison from the logs: Wilson intervals, McNemar, latency quantiles, per camera.

The good class comes from the champion artifact's operating point (``ok_class``, declared once in params.yaml and
carried by every artifact manifest, read through `deploy.edge.artifact`); a rollout manifest may only restate it.
Without one, no defect metrics are reported (never a guessed "ok"). A defect counts as caught when the served
decision rejected it (the manifest's threshold on P(good)), or, for records without a decision, when the predicted
class is not the good class (`OperatingPoint.decision_of`); escape rate and overkill are `OperatingPoint.rates`.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections import Counter, OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np

from deploy.edge.artifact import Artifact, ArtifactError, read_manifest
from deploy.edge.rollout.logs import JsonlReader
from deploy.edge.rollout.manifest import CHALLENGER, CHAMPION, FEEDBACK_LOG, PRED_LOG, RolloutConfig, RolloutError
from spt_core.portable.metrics import Z95, wilson_interval
from spt_core.portable.operating_point import OperatingPoint, flat_rates

__all__ = ["Z95", "compare", "difference_interval", "mcnemar", "quantiles", "report_for", "resolve_operating_point",
           "restate", "wilson_interval"]  # fmt: skip


PAIR_WINDOW = 16_384  # frames waiting for their other arm's answer (`_Pairs`): 400 s of 4 cameras at 10 frames/s
EXACT_LATENCIES, LATENCY_BIN = 65_536, 1.01  # an arm's latencies kept exactly, then in bins 1 % wide


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float] | None:
    """Interval of p1 - p2 (95 % at the default `z`) for independent proportions k1/n1 and k2/n2 (two arms on
    different cameras).

    Newcombe's hybrid score interval (method 10 of Newcombe 1998, Stat Med 17:873), built from each arm's Wilson
    interval (l, u): [d - sqrt((p1 - l1)^2 + (u2 - p2)^2), d + sqrt((u1 - p1)^2 + (p2 - l2)^2)] with d = p1 - p2.
    Unlike the Wald interval it keeps its coverage near 0 and 1, where a line's accuracies live. None when an arm
    has no frames.
    """
    a, b = wilson_interval(k1, n1, z), wilson_interval(k2, n2, z)
    if a is None or b is None:
        return None
    p1, p2 = k1 / n1, k2 / n2
    d = p1 - p2
    return d - math.hypot(p1 - a[0], b[1] - p2), d + math.hypot(a[1] - p1, p2 - b[0])


def mcnemar(b: int, c: int) -> dict[str, Any]:
    """Paired test on discordant frames: b = only the champion right, c = only the challenger right.

    Exact two-sided binomial test (b ~ Bin(b + c, 1/2)) up to 1000 discordant pairs, chi-square with continuity
    correction above (the exact sum's big integers get slow, and the two agree there).
    """
    n = b + c
    if n == 0:
        return {"b": b, "c": c, "p_value": 1.0, "method": "exact"}
    if n <= 1000:
        tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
        return {"b": b, "c": c, "p_value": min(1.0, 2 * tail / 2**n), "method": "exact"}
    stat = (abs(b - c) - 1) ** 2 / n
    return {"b": b, "c": c, "statistic": stat, "p_value": math.erfc(math.sqrt(stat / 2)), "method": "chi2-cc"}


def quantiles(values: Collection[float]) -> dict[str, float | None]:
    """p50, p90 and p99 of latencies in ms (None each when there are none)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    q = np.percentile(np.fromiter(values, dtype=np.float64, count=len(values)), [50, 90, 99])
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2])}


def _key(record: dict[str, Any]) -> tuple[str, str]:
    return str(record.get("camera_id")), str(record.get("frame_id"))


def _defect_stats(labelled: list[tuple[dict[str, Any], str]], op: OperatingPoint) -> dict[str, Any]:
    """Defect recall, escape rate and overkill of the served decisions (`OperatingPoint.decision_of`); without a
    good class every rate is None and every count 0."""
    labels, decisions = [t for _, t in labelled], [op.decision_of(r) for r, _ in labelled]
    flat = flat_rates(op.rates(labels, decisions) if op.ok_class is not None else op.rates([], [], []))
    caught = flat["defects"] - flat["escaped"]  # a defect rejected by the threshold leaves the line
    recall = {"defect_recall": caught / flat["defects"] if flat["defects"] else None,
              "defect_recall_ci95": wilson_interval(caught, flat["defects"])}  # fmt: skip
    return {"defects": flat.pop("defects"), **recall, **flat}


class _Latencies:
    """An arm's latencies: exact up to `EXACT_LATENCIES` values, then counted in bins 1 % wide (quantiles within
    about 0.5 %), so memory stays bounded however long the arm serves."""

    def __init__(self) -> None:
        self.exact: array | None = array("d")
        self.bins: Counter[int] = Counter()
        self.n = 0

    def add(self, ms: float) -> None:
        self.n += 1
        if self.exact is not None:
            self.exact.append(ms)
            if len(self.exact) <= EXACT_LATENCIES:
                return
            values, self.exact = self.exact, None
            for v in values:
                self.bins[_bin(v)] += 1
            return
        self.bins[_bin(ms)] += 1

    def quantiles(self) -> dict[str, float | None]:
        if self.exact is not None:
            return quantiles(self.exact)
        order = sorted(self.bins)
        cum = list(accumulate(self.bins[b] for b in order))  # the first bin holding the q-th share of the values
        return {name: LATENCY_BIN ** order[bisect_left(cum, q * self.n)] for name, q in (("p50", 0.5), ("p90", 0.9),
                                                                                         ("p99", 0.99))}  # fmt: skip


def _bin(ms: float) -> int:
    return round(math.log(max(ms, 1e-3)) / math.log(LATENCY_BIN))


@dataclass
class _Arm:
    """One arm's running counts, folded over the log one record at a time: no record is kept, only each labelled
    answer's class and decision (an operator labels a sample) and the latencies (`_Latencies`, bounded)."""

    versions: set[str] = field(default_factory=set)
    requests: int = 0
    errors: int = 0
    served: int = 0
    latencies: _Latencies = field(default_factory=_Latencies)
    labelled: list[tuple[dict[str, Any], str]] = field(default_factory=list)

    def add(self, r: dict[str, Any], label: str | None) -> None:
        self.requests += 1
        self.versions.add(str(r.get("model_version")))
        if r.get("error"):
            self.errors += 1
            return
        self.served += bool(r.get("served", True))
        if "latency_ms" in r:
            self.latencies.add(float(r["latency_ms"]))
        if label is not None:  # what `OperatingPoint.decision_of` reads
            self.labelled.append(({"class": r.get("class"), "decision": r.get("decision")}, label))

    def stats(self, op: OperatingPoint) -> dict[str, Any]:
        pairs = [(r["class"], t) for r, t in self.labelled]
        correct = sum(p == t for p, t in pairs)
        per_class: dict[str, list[int]] = {}
        for p, t in pairs:
            per_class.setdefault(t, [0, 0])[0] += p == t
            per_class[t][1] += 1
        good = self.requests - self.errors
        return {
            "versions": sorted(self.versions),
            "requests": self.requests,
            "served": self.served,
            "shadow": good - self.served,
            "errors": self.errors,
            "error_rate": self.errors / self.requests if self.requests else None,
            "labelled": len(pairs),
            "correct": correct,
            "accuracy": correct / len(pairs) if pairs else None,
            "accuracy_ci95": wilson_interval(correct, len(pairs)),
            **_defect_stats(self.labelled, op),
            "recall_per_class": {k: v[0] / v[1] for k, v in sorted(per_class.items())},
            "latency_ms": self.latencies.quantiles(),
        }


@dataclass
class _Pairs:
    """Frames both arms answered (the champion's served answer, the challenger's shadow one), counted when the
    second answer comes. A frame waits for it among the last `PAIR_WINDOW` waiting frames (a shadow answer follows
    its frame within seconds; a canary's champion-only frames never complete), so memory stays bounded however long
    the log. Server-issued frame ids are unique on a box; a frame id seen again after its pair was counted (a
    replayed log) starts a new pair."""

    labels: dict[tuple[str, str], str]
    waiting: OrderedDict = field(default_factory=OrderedDict)
    frames: int = 0
    agree: int = 0
    labelled: int = 0
    only_champion: int = 0
    only_challenger: int = 0

    def add(self, key: tuple[str, str], role: str, cls: Any) -> None:
        answers = self.waiting.setdefault(key, {})
        answers[role] = cls  # a repeated answer before the other arm's: the last one counts
        if len(answers) == 2:
            self._count(key, self.waiting.pop(key))
        elif len(self.waiting) > PAIR_WINDOW:
            self.waiting.popitem(last=False)  # its other answer never came within the window

    def _count(self, key: tuple[str, str], v: dict[str, Any]) -> None:
        self.frames += 1
        self.agree += v[CHAMPION] == v[CHALLENGER]
        if key in self.labels:
            cp, ch = v[CHAMPION] == self.labels[key], v[CHALLENGER] == self.labels[key]
            self.labelled += 1
            self.only_champion += cp and not ch
            self.only_challenger += ch and not cp

    def result(self) -> dict[str, Any] | None:
        if not self.frames:
            return None
        out = {"frames": self.frames, "labelled": self.labelled, "agreement": self.agree / self.frames}
        return out | mcnemar(self.only_champion, self.only_challenger)


def compare(
    pred_log: Path,
    feedback_log: Path,
    *,
    champion_version: str | None = None,
    challenger_version: str | None = None,
    operating_point: OperatingPoint | None = None,
) -> dict[str, Any]:
    """Champion vs challenger from the prediction and feedback logs, overall and per camera.

    Only records of the given (role, version) count when versions are given, so that a promoted model's history
    as challenger does not leak into its record as champion. Feedback joins on (camera_id, frame_id) (last label wins).
    Without the operating point's good class the defect metrics (recall, escape rate, overkill) are None. The
    predictions log grows for as long as the box serves: it is folded in one pass (`_Arm`, `_Pairs`), never held;
    what stays is the labelled answers and, per arm, at most `EXACT_LATENCIES` latencies.

    Returns:
        {"versions", "ok_class", "overall": {role: stats}, "per_camera": {camera: {role: stats}},
        "paired": McNemar on frames both models answered (shadow mode) or None, "log": line counts}.
    """
    feedback = JsonlReader(Path(feedback_log))
    # Frame ids are server-issued (deploy.edge.frames) and joined together with the camera, so that a frame id two
    # cameras both used can never carry one label to the other camera's prediction.
    labels = {(str(r.get("camera_id")), str(r["frame_id"])): str(r["label"])
              for r in feedback if "frame_id" in r and "label" in r}  # fmt: skip
    wanted = {CHAMPION: champion_version, CHALLENGER: challenger_version}
    overall = {CHAMPION: _Arm(), CHALLENGER: _Arm()}
    per_camera: dict[str, dict[str, _Arm]] = {}
    pairs = _Pairs(labels)
    preds = JsonlReader(Path(pred_log))
    for r in preds:
        role = r.get("role")
        if role not in wanted or (wanted[role] is not None and str(r.get("model_version")) != wanted[role]):
            continue
        label = labels.get(_key(r)) if not r.get("error") else None
        overall[role].add(r, label)
        per_camera.setdefault(str(r.get("camera_id")), {CHAMPION: _Arm(), CHALLENGER: _Arm()})[role].add(r, label)
        # a pair is the champion's served answer and the challenger's shadow answer on the same frame: shadow mode
        paired_side = (role == CHAMPION and r.get("served", True)) or (role == CHALLENGER and r.get("shadow"))
        if paired_side and not r.get("error") and "frame_id" in r:
            pairs.add(_key(r), role, r.get("class"))
    op = operating_point or OperatingPoint()
    return {
        "versions": {CHAMPION: champion_version, CHALLENGER: challenger_version},
        "ok_class": op.ok_class,
        "overall": {role: arm.stats(op) for role, arm in overall.items()},
        "per_camera": {
            cam: {role: arm.stats(op) for role, arm in arms.items() if arm.requests}
            for cam, arms in sorted(per_camera.items())
        },
        "paired": pairs.result(),
        "log": {
            "predictions": preds.records,
            "feedback": feedback.records,
            "skipped_lines": preds.skipped + feedback.skipped,
        },  # fmt: skip
    }


def restate(declared: OperatingPoint, class_names: Sequence[str], ok_class: str | None, who: str) -> OperatingPoint:
    """An artifact's operating point with rollout.yaml's ``ok_class``, which may only restate the artifact's good
    class (it fills in where the manifest declares none).

    Raises:
        RolloutError: rollout.yaml names a class the artifact does not have, or another good class than its manifest.
    """
    if ok_class is None:
        return declared
    if class_names and ok_class not in class_names:
        raise RolloutError(f"ok_class={ok_class!r} is not a class of the {who} ({list(class_names)}); fix rollout.yaml")
    if declared.ok_class is not None and declared.ok_class != ok_class:
        raise RolloutError(
            f"ok_class={ok_class!r} in rollout.yaml but the {who}'s manifest declares {declared.ok_class!r}; "
            "drop ok_class from rollout.yaml (the artifact carries it)"
        )
    return replace(declared, ok_class=ok_class)


def resolve_operating_point(cfg: RolloutConfig, champion: Artifact | None = None) -> OperatingPoint:
    """The line's operating point: the champion artifact's (``champion`` when loaded, else its manifest read through
    `deploy.edge.artifact.read_manifest`), with rollout.yaml's ``ok_class`` restating it (`restate`).

    Raises:
        RolloutError: see `restate`.
    """
    if champion is not None:
        return restate(champion.operating_point, champion.class_names, cfg.ok_class, "champion")
    try:
        m = read_manifest(cfg.resolve(cfg.champion.path))
    except ArtifactError:  # an unreadable champion is reported by the service's loader; only its declaration counts
        return restate(OperatingPoint(), [], cfg.ok_class, "champion")
    return restate(OperatingPoint.from_dict(m), [str(c) for c in m["class_names"]], cfg.ok_class, "champion")


def report_for(cfg: RolloutConfig) -> dict[str, Any]:
    """`compare` over the manifest's logs for its current champion and challenger, at the champion's operating point."""
    return compare(
        cfg.logs / PRED_LOG,
        cfg.logs / FEEDBACK_LOG,
        champion_version=cfg.champion.version,
        challenger_version=cfg.challenger.version if cfg.challenger else None,
        operating_point=resolve_operating_point(cfg),
    )
