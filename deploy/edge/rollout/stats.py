"""The champion/challenger comparison from the logs: Wilson intervals, McNemar, latency quantiles, per camera.

The good class comes from the champion artifact's operating point (``ok_class``, declared once in params.yaml and
carried by every artifact manifest, read through `deploy.edge.artifact`); a rollout manifest may only restate it.
Without one, no defect metrics are reported (never a guessed "ok"). A defect counts as caught when the served
decision rejected it (the manifest's threshold on P(good)), or, for records without a decision, when the predicted
class is not the good class (`OperatingPoint.decision_of`); escape rate and overkill are `OperatingPoint.rates`.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from deploy.edge.artifact import Artifact, ArtifactError, read_manifest
from deploy.edge.rollout.fold import LogFold, mcnemar
from deploy.edge.rollout.latency import quantiles
from deploy.edge.rollout.manifest import CHALLENGER, CHAMPION, FEEDBACK_LOG, PRED_LOG, RolloutConfig, RolloutError
from spt_core.portable.metrics import Z95, wilson_interval
from spt_core.portable.operating_point import OperatingPoint

__all__ = ["Z95", "compare", "difference_interval", "mcnemar", "quantiles", "report_for", "resolve_operating_point",
           "restate", "wilson_interval"]  # fmt: skip


FOLDS_KEPT = 2  # (logs, versions) whose folds are kept between calls: a box's rollout and its fleet plan


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


def compare(
    pred_log: Path,
    feedback_log: Path,
    *,
    champion_version: str | None = None,
    challenger_version: str | None = None,
    operating_point: OperatingPoint | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Champion vs challenger from the prediction and feedback logs, overall and per camera.

    Only records of the given (role, version) count when versions are given, so that a promoted model's history
    as challenger does not leak into its record as champion. Feedback joins on (camera_id, frame_id) (last label wins).
    Without the operating point's good class the defect metrics (recall, escape rate, overkill) are None. The logs
    are folded one record at a time (`deploy.edge.rollout.fold`), never held. With `keep` the fold is kept for the
    next call on the same logs and versions, which then reads only the lines appended since (the same report).

    Returns:
        {"versions", "ok_class", "overall": {role: stats}, "per_camera": {camera: {role: stats}},
        "paired": McNemar on frames both models answered (shadow mode) or None, "log": line counts}.
    """
    versions = {CHAMPION: champion_version, CHALLENGER: challenger_version}
    fold = _kept_fold(pred_log, feedback_log, versions) if keep else LogFold(pred_log, feedback_log, versions,
                                                                              whole_lines=False, window=0)  # fmt: skip
    return fold.report(operating_point or OperatingPoint())


_FOLDS: OrderedDict[tuple, LogFold] = OrderedDict()
_FOLDS_LOCK = threading.Lock()


def _kept_fold(pred_log: Path, feedback_log: Path, versions: dict[str, str | None]) -> LogFold:
    """The kept fold of these logs and versions, brought up to date (read from the first line the first time). The
    cache lock is held only to find it: a long read blocks no other logs' reports."""
    key = (str(Path(pred_log).resolve()), str(Path(feedback_log).resolve()), *versions.items())
    with _FOLDS_LOCK:
        fold = _FOLDS.pop(key, None) or LogFold(pred_log, feedback_log, versions, read=False)
        _FOLDS[key] = fold
        while len(_FOLDS) > FOLDS_KEPT:
            _FOLDS.popitem(last=False)
    return fold.update()


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
        keep=True,
    )
