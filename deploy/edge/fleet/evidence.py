"""The fleet's evidence: each box's counts for a plan, pooled over the boxes, judged by the box's own rule.

A box counts its own logs exactly as its rollout page does (`deploy.edge.rollout.stats.compare` at the line's
`OperatingPoint`, for the plan's champion and challenger versions) and reports the counts, not rates, so that the
fleet can add them: labelled frames, correct, defects and escapes, good parts and overkill, requests and inference
errors, and the p50 latency of each arm. `pool` sums the boxes that served the challenger (both arms from the same
boxes, over the same time) into a report of `compare`'s shape, and `judge` applies the promotion rule the box uses
(`deploy.edge.rollout.decision`, not a copy of it) plus the plan's waves:

    abort    in any wave, at once: the pooled escape rate's 95 % Wilson interval lies above the ceiling (the
             operating point's ``max_escape_rate`` unless the plan sets one), or `worse_beyond_doubt` (error rate
             over its limit; the 99.9 % interval of the escape rate difference above 0, or of the accuracy gain
             below ``min_gain``); in the last wave, once its floors are met, also when `decide` rolls back (its
             escape rule, gain below ``min_gain``, latency)
    hold     the wave's floors are not met (labelled challenger frames gathered in this wave, hours in it), or, in
             the last wave, `decide` waits for frames
    advance  floors met and nothing alarming: the next wave starts
    promote  the last wave's floors met and `decide` promotes

Why `decide` waits for the last wave: an early wave's sample cannot see a 1-pt difference (at 200 frames per arm
the difference's standard deviation is ~2 pt), so its "gain < min_gain", and its escape rule (the challenger's
interval against the champion's point estimate), stop good versions by chance, look after look. Until the last
wave's floors are met only what is beyond doubt stops a plan (Haybittle-Peto: 99.9 % at every earlier look); that
floor is sized for the difference that matters, and there `decide` on the pooled evidence promotes or rolls back.

Pooled p50 latency is the frame-weighted mean of the boxes' p50s; both arms come from the same boxes, so their
ratio is the fleet's latency change (boxes differ in speed; a per-box ratio would need per-box pairing).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from deploy.edge.fleet.plan import Plan, epoch_of, now_iso
from deploy.edge.rollout.decision import PROMOTE, ROLLBACK, Decision, decide, worse_beyond_doubt
from deploy.edge.rollout.manifest import CHALLENGER, CHAMPION, FEEDBACK_LOG, PRED_LOG, RolloutConfig
from deploy.edge.rollout.stats import compare, difference_interval, resolve_operating_point, wilson_interval
from spt_core.portable.metrics import rate
from spt_core.portable.operating_point import flat_rates

ADVANCE, HOLD, ABORT = "advance", "hold", "abort"  # with PROMOTE: what a fleet decision does
COUNTS = ("requests", "errors", "labelled", "correct", "defects", "escaped", "goods", "overkilled")
ROLES = (CHAMPION, CHALLENGER)


def box_report(cfg: RolloutConfig, plan: Plan, box: str, local: dict[str, Any] | None, at: float) -> dict[str, Any]:
    """This box's counts for `plan` from its own logs (frames already served stay counted after a rollback)."""
    op = resolve_operating_point(cfg)
    rep = compare(cfg.logs / PRED_LOG, cfg.logs / FEEDBACK_LOG, champion_version=plan.champion,
                  challenger_version=plan.version, operating_point=op, keep=True)  # fmt: skip
    arms = {r: {**{k: int(rep["overall"][r][k]) for k in COUNTS}, "p50_ms": rep["overall"][r]["latency_ms"]["p50"]}
            for r in ROLES}  # fmt: skip
    return {"box": box, "plan": plan.id, "champion": plan.champion, "challenger": plan.version,
            "member": plan.membership(box), "arms": arms, "operating_point": op.to_dict(), "local": local,
            "at": now_iso(at)}  # fmt: skip


def _arm(counts: dict[str, int], p50: float | None) -> dict[str, Any]:
    """One pooled arm in `compare`'s keys, from summed counts (rates with their Wilson intervals)."""
    n, k = counts["labelled"], counts["correct"]
    flat = flat_rates({"escape_rate": rate(counts["escaped"], counts["defects"]),
                       "overkill": rate(counts["overkilled"], counts["goods"])})  # fmt: skip
    caught = counts["defects"] - counts["escaped"]
    return {**counts, **flat, "accuracy": k / n if n else None, "accuracy_ci95": wilson_interval(k, n),
            "defect_recall": caught / counts["defects"] if counts["defects"] else None,
            "error_rate": counts["errors"] / counts["requests"] if counts["requests"] else None,
            "latency_ms": {"p50": p50}}  # fmt: skip


def _valid(report: Any, plan: Plan) -> bool:
    try:
        return report["plan"] == plan.id and all(
            isinstance(report["arms"][r][k], int) and report["arms"][r][k] >= 0 for r in ROLES for k in COUNTS
        )
    except (KeyError, TypeError):
        return False


def pool(plan: Plan, reports: Iterable[Any]) -> dict[str, Any]:
    """The boxes' reports on `plan` summed into one report of `compare`'s shape (+ ``boxes`` and ``ceiling``)."""
    mine = [r for r in reports if _valid(r, plan)]
    serving = [r for r in mine if r["arms"][CHALLENGER]["requests"] > 0]
    overall = {}
    for role in ROLES:
        sums = {k: sum(r["arms"][role][k] for r in serving) for k in COUNTS}
        arms = [r["arms"][role] for r in serving]
        timed = [(a.get("p50_ms"), a["requests"] - a["errors"]) for a in arms]
        timed = [(p, w) for p, w in timed if isinstance(p, (int, float)) and w > 0]
        p50 = sum(p * w for p, w in timed) / sum(w for _, w in timed) if timed else None
        overall[role] = _arm(sums, p50)
    ops = [r.get("operating_point") or {} for r in mine]
    ceilings = [o["max_escape_rate"] for o in ops if isinstance(o.get("max_escape_rate"), (int, float))]
    ceiling = plan.max_escape_rate if plan.max_escape_rate is not None else min(ceilings, default=None)
    ok = next((o.get("ok_class") for o in ops if o.get("ok_class")), None)
    local = {str(r.get("box")): r["local"] for r in mine if r.get("local")}
    return {"versions": {CHAMPION: plan.champion, CHALLENGER: plan.version}, "ok_class": ok, "overall": overall,
            "paired": None, "ceiling": ceiling,
            "boxes": {"reporting": len(mine), "serving": len(serving), "local": local}}  # fmt: skip


def judge(plan: Plan, pooled: dict[str, Any], at: float) -> Decision:
    """The fleet's decision on `plan` now (module docstring), with the evidence it rests on."""
    verdict = decide(pooled, plan.rule)
    cp, ch = pooled["overall"][CHAMPION], pooled["overall"][CHALLENGER]
    gain_ci = difference_interval(ch["correct"], ch["labelled"], cp["correct"], cp["labelled"])
    evidence = {**verdict.evidence, "wave": plan.wave, "revision": plan.revision, "boxes": pooled["boxes"],
                "ceiling": pooled["ceiling"], "rule_says": verdict.action, "accuracy_gain_ci95": gain_ci}  # fmt: skip
    ci, ceiling = ch["escape_rate_ci95"], pooled["ceiling"]
    if ceiling is not None and ci and ci[0] > ceiling:
        why = (f"pooled challenger escape rate {ch['escaped']}/{ch['defects']} (95% CI {ci[0]:.4f}-{ci[1]:.4f}) "
               f"is above the ceiling {ceiling} on {pooled['boxes']['serving']} box(es)")  # fmt: skip
        return Decision(ABORT, [why], evidence)
    if why := worse_beyond_doubt(pooled, plan.rule):
        return Decision(ABORT, [why], evidence)
    wave, k = plan.waves[plan.wave], plan.wave + 1
    gathered, hours = ch["labelled"] - plan.wave_base, (at - epoch_of(plan.wave_started)) / 3600
    short = []
    if gathered < wave.min_labelled:
        short.append(f"{gathered} labelled challenger frames in wave {k}; need {wave.min_labelled}")
    if hours < wave.min_hours:
        short.append(f"{hours:.2f} h in wave {k}; need {wave.min_hours}")
    if short:
        return Decision(HOLD, short, evidence)
    if not plan.last_wave:
        gain = "" if gain_ci is None else f"; accuracy gain 95% CI {gain_ci[0]:+.4f} to {gain_ci[1]:+.4f}"
        return Decision(ADVANCE, [f"wave {k} met its floors ({gathered} frames, {hours:.2f} h){gain}; the last wave "
                                  "decides on accuracy"], evidence)  # fmt: skip
    action = {PROMOTE: PROMOTE, ROLLBACK: ABORT}.get(verdict.action, HOLD)
    return Decision(action, verdict.reasons, evidence)


def summary(pooled: dict[str, Any], decision: Decision, at: float) -> dict[str, Any]:
    """The pooled numbers a person reads (`sensitune fleet watch`, the box's rollout page)."""
    keys = ("requests", "errors", "labelled", "accuracy", "escaped", "defects", "escape_rate", "escape_rate_ci95",
            "overkilled", "goods", "overkill")  # fmt: skip
    arms = {r: {k: pooled["overall"][r].get(k) for k in keys} | {"p50_ms": pooled["overall"][r]["latency_ms"]["p50"]}
            for r in ROLES}  # fmt: skip
    return {"arms": arms, "boxes": pooled["boxes"], "ceiling": pooled["ceiling"], "now": decision.action,
            "why": decision.reasons, "at": now_iso(at)}  # fmt: skip


def same(a: str | None, b: dict[str, Any]) -> bool:
    """Whether stored summary `a` (JSON) says what `b` says, its time aside (no write when nothing changed)."""
    try:
        stored = json.loads(a or "{}")
    except ValueError:
        return False
    stored.pop("at", None)
    return stored == {k: v for k, v in json.loads(json.dumps(b)).items() if k != "at"}
