"""The champion/challenger comparison from the logs: Wilson intervals, McNemar, latency quantiles, per camera."""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from deploy.rollout.logs import read_jsonl
from deploy.rollout.manifest import CHALLENGER, CHAMPION, FEEDBACK_LOG, PRED_LOG, RolloutConfig

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for k successes in n trials (good near 0 and 1, unlike the normal interval)."""
    if n == 0:
        return None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


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


def _arm_stats(recs: list[dict[str, Any]], labels: dict[tuple[str, str], str], ok_class: str) -> dict[str, Any]:
    good = [r for r in recs if not r.get("error")]
    pairs = [(r.get("class"), labels[_key(r)]) for r in good if _key(r) in labels]
    correct = sum(p == t for p, t in pairs)
    defects = [(p, t) for p, t in pairs if t != ok_class]
    caught = sum(p != ok_class for p, _ in defects)  # a defect flagged as any defect class gets the part off the line
    per_class: dict[str, list[int]] = {}
    for p, t in pairs:
        per_class.setdefault(t, [0, 0])[0] += p == t
        per_class[t][1] += 1
    errors = len(recs) - len(good)
    return {
        "versions": sorted({str(r.get("model_version")) for r in recs}),
        "requests": len(recs),
        "served": sum(bool(r.get("served", True)) for r in good),
        "shadow": sum(not r.get("served", True) for r in good),
        "errors": errors,
        "error_rate": errors / len(recs) if recs else None,
        "labelled": len(pairs),
        "correct": correct,
        "accuracy": correct / len(pairs) if pairs else None,
        "accuracy_ci95": wilson_interval(correct, len(pairs)),
        "defects": len(defects),
        "defect_recall": caught / len(defects) if defects else None,
        "defect_recall_ci95": wilson_interval(caught, len(defects)),
        "recall_per_class": {k: v[0] / v[1] for k, v in sorted(per_class.items())},
        "latency_ms": quantiles([r["latency_ms"] for r in good if "latency_ms" in r]),
    }


def compare(
    pred_log: Path,
    feedback_log: Path,
    *,
    champion_version: str | None = None,
    challenger_version: str | None = None,
    ok_class: str = "ok",
) -> dict[str, Any]:
    """Champion vs challenger from the prediction and feedback logs, overall and per camera.

    Only records of the given (role, version) count when versions are given, so that a promoted model's history
    as challenger does not leak into its record as champion. Feedback joins on (camera_id, frame_id) (last label wins).

    Returns:
        {"versions", "ok_class", "overall": {role: stats}, "per_camera": {camera: {role: stats}},
        "paired": McNemar on frames both models answered (shadow mode) or None, "log": line counts}.
    """
    preds, skipped_p = read_jsonl(Path(pred_log))
    feedback, skipped_f = read_jsonl(Path(feedback_log))
    # Frame ids are server-issued (deploy.frames) and joined together with the camera, so that a frame id two
    # cameras both used can never carry one label to the other camera's prediction.
    labels = {
        (str(r.get("camera_id")), str(r["frame_id"])): str(r["label"])
        for r in feedback
        if "frame_id" in r and "label" in r
    }
    wanted = {CHAMPION: champion_version, CHALLENGER: challenger_version}
    overall: dict[str, list[dict[str, Any]]] = {CHAMPION: [], CHALLENGER: []}
    per_camera: dict[str, dict[str, list[dict[str, Any]]]] = {}
    by_frame: dict[tuple[str, str], dict[str, str]] = {}
    for r in preds:
        role = r.get("role")
        if role not in wanted or (wanted[role] is not None and str(r.get("model_version")) != wanted[role]):
            continue
        overall[role].append(r)
        per_camera.setdefault(str(r.get("camera_id")), {CHAMPION: [], CHALLENGER: []})[role].append(r)
        # a pair is the champion's served answer and the challenger's shadow answer on the same frame: shadow mode
        paired_side = (role == CHAMPION and r.get("served", True)) or (role == CHALLENGER and r.get("shadow"))
        if paired_side and not r.get("error") and "frame_id" in r:
            by_frame.setdefault(_key(r), {})[role] = r.get("class")
    both = {f: v for f, v in by_frame.items() if len(v) == 2}
    paired = None
    if both:
        lab = [(v[CHAMPION] == labels[f], v[CHALLENGER] == labels[f]) for f, v in both.items() if f in labels]
        only_champion = sum(cp and not ch for cp, ch in lab)
        only_challenger = sum(ch and not cp for cp, ch in lab)
        agree = sum(v[CHAMPION] == v[CHALLENGER] for v in both.values())
        paired = {"frames": len(both), "labelled": len(lab), "agreement": agree / len(both)}
        paired |= mcnemar(only_champion, only_challenger)
    return {
        "versions": {CHAMPION: champion_version, CHALLENGER: challenger_version},
        "ok_class": ok_class,
        "overall": {role: _arm_stats(recs, labels, ok_class) for role, recs in overall.items()},
        "per_camera": {
            cam: {role: _arm_stats(recs, labels, ok_class) for role, recs in arms.items() if recs}
            for cam, arms in sorted(per_camera.items())
        },
        "paired": paired,
        "log": {"predictions": len(preds), "feedback": len(feedback), "skipped_lines": skipped_p + skipped_f},
    }


def report_for(cfg: RolloutConfig) -> dict[str, Any]:
    """`compare` over the manifest's logs for its current champion and challenger."""
    return compare(
        cfg.logs / PRED_LOG,
        cfg.logs / FEEDBACK_LOG,
        champion_version=cfg.champion.version,
        challenger_version=cfg.challenger.version if cfg.challenger else None,
        ok_class=cfg.ok_class,
    )
