"""The fleet decider: one round pools the boxes' reports and advances, holds, promotes or aborts the plan.

    Decider(reg, "prefect:host-1").round()    one round (`pipelines.fleet`'s flow runs it on a schedule)
    start(reg, "4", waves, who=..., why=...)  a plan for v4: its tag written, then alias ``challenger`` -> v4
    Decider(reg, who).stop(who, why)          an operator's abort, decided like any other decision
    fleet_status(reg)                         the plan, the pooled numbers and each box's report

Exactly one decision per plan revision, however many deciders run. MLflow has no compare-and-set on tags: a tag
write is an upsert, and of two deciders that each write a decision and read it back, the first may read back its
own write before the second overwrites it, so both would act. What MLflow does hold atomically is a registered
model's name: its database keeps names unique, and a create of a taken name answers RESOURCE_ALREADY_EXISTS. So a
decision is a claim: registered model ``<model>.fleet-<plan id>.r<revision>``, created in one request with the
decision and the plan it leads to as its tags.

The guarantee: for each revision r of a plan at most one decision is ever recorded (the claim named r), and every
decider applies only recorded decisions, in revision order. Before judging, a decider walks the claims from the
revision it read (r, r+1, ... until one is missing) and applies each, so its own decision is made from the latest
recorded state and claims the next free revision, or loses (another decider claimed that revision first) and does
nothing. Applying is idempotent: the plan tag is written only over an older revision; the champion alias moves,
and the challenger alias is deleted, only while the challenger alias still names the plan's version. So a decision
applied twice (a winner that crashed after its claim, finished by the next round; two deciders walking one claim)
has the effect of one, and a decision that lost its claim has none.

What it does not guarantee: the plan tag is the boxes' view of the latest claim, and writing it is a read and then
a write. A decider that stalls between the two while another decider applies a newer decision can leave a view
one revision old, until the next round rewrites it: a box may then follow the previous wave for one sync interval.
Aborts and promotions are carried by the aliases too, which never go back. Claims are never deleted: they are
the plan's decision log (what, by whom, when, on what evidence), and a deleted name could be claimed again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from deploy.edge.fleet.evidence import ABORT, ADVANCE, HOLD, judge, pool, same, summary
from deploy.edge.fleet.plan import (
    ABORTED,
    ACTIVE,
    PLAN_TAG,
    POOLED_TAG,
    PROMOTED,
    REPORT_TAG,
    FleetError,
    Plan,
    Wave,
    now_iso,
)
from deploy.edge.mlflow_rest import NotFound, RestRegistry, audit
from deploy.edge.registry import CHALLENGER_ALIAS, CHAMPION_ALIAS
from deploy.edge.rollout.decision import PROMOTE, Decision
from deploy.edge.rollout.manifest import CHALLENGER, DecisionRule

DECISION_TAG = "sensitune.fleet.decision"  # a claim's tag: the decision, its evidence, who, when
_STATUS = {PROMOTE: PROMOTED, ABORT: ABORTED}


def claim_name(model_name: str, plan: Plan) -> str:
    """The registered model whose creation is the decision on `plan` at its revision."""
    return f"{model_name}.fleet-{plan.id}.r{plan.revision}"


class Decider:
    """Rounds of the fleet's decision on the plan of the registry's challenger (module docstring).

    Args:
        reg: The registry (the edge's REST client: a decider needs no mlflow package).
        who: This decider's name, recorded with each decision it claims (``prefect:<host>``, ``cli:<user>``).
        clock: Seconds since the epoch (a simulator passes its own clock).
    """

    def __init__(self, reg: RestRegistry, who: str, clock: Callable[[], float] = time.time) -> None:
        self.reg, self.who, self.clock = reg, who, clock

    def round(self) -> dict[str, Any]:
        """One round: walk the claims, pool, judge, publish the pooled numbers, claim and apply a non-hold decision."""
        at = self.clock()
        mv = self.reg.alias(CHALLENGER_ALIAS)
        plan = Plan.of(mv)
        if plan is None:
            return {"outcome": "no plan", "challenger": (mv or {}).get("version")}
        plan = self.latest(plan)
        if not plan.active:
            return {"outcome": plan.status, "plan": plan.summary()}
        champion = (self.reg.alias(CHAMPION_ALIAS) or {}).get("version")
        if champion != plan.champion:
            why = (f"the champion moved from v{plan.champion} to v{champion} during the rollout: the evidence is "
                   f"against v{plan.champion}; start the plan again")  # fmt: skip
            return self._claim(plan, Decision(ABORT, [why], {"champion_now": champion}), at)
        pooled = pool(plan, self.reports())
        decision = judge(plan, pooled, at)
        told = summary(pooled, decision, at)
        if not same(((mv or {}).get("tags") or {}).get(POOLED_TAG), told):
            self.reg.set_version_tag(plan.version, POOLED_TAG, json.dumps(told, default=str))
        if decision.action == HOLD:
            return {"outcome": HOLD, "reasons": decision.reasons, "plan": plan.summary()}
        return self._claim(plan, decision, at, labelled=pooled["overall"][CHALLENGER]["labelled"])

    def stop(self, who: str, why: str, tries: int = 5) -> dict[str, Any]:
        """An operator's abort of the current plan: claimed and applied like any decision (so it cannot also be
        promoted); when a decider claims the same revision first, tried again on the next."""
        for _ in range(tries):
            plan = Plan.of(self.reg.alias(CHALLENGER_ALIAS))
            if plan is None:
                raise FleetError("no fleet plan: the registry's challenger carries none (nothing to stop)")
            plan = self.latest(plan)
            if not plan.active:
                return {"outcome": plan.status, "plan": plan.summary()}
            out = self._claim(plan, Decision(ABORT, [f"stopped by {who}: {why}"], {}), self.clock(), by=who)
            if out["outcome"] == "applied":
                return out
        raise FleetError(f"stop: other deciders decided {tries} revisions first; run it again")

    def latest(self, plan: Plan) -> Plan:
        """`plan` with every decision claimed since it was written applied, in order (a decider that crashed or
        stalled after its claim leaves its decision to whoever comes next)."""
        walked = False
        while True:
            try:
                tags = self.reg.model_tags(claim_name(self.reg.model_name, plan))
            except NotFound:
                break
            plan, walked = Plan.from_json(tags.get(PLAN_TAG), f"claim {claim_name(self.reg.model_name, plan)}"), True
            self.apply(plan)
        if not walked and not plan.active:  # a crash between a finished plan's tag and its aliases
            self.apply(plan)
        return plan

    def reports(self) -> list[Any]:
        """Every box's latest report (registered-model tags ``sensitune.fleet.report.<box>``; unreadable: skipped)."""
        out = []
        for key, value in self.reg.model_tags().items():
            if key.startswith(REPORT_TAG):
                try:
                    out.append(json.loads(value))
                except (TypeError, ValueError):
                    continue
        return out

    def _claim(self, plan: Plan, decision: Decision, at: float, labelled: int = 0, by: str | None = None) -> dict:
        record = {"action": decision.action, "reasons": decision.reasons, "by": by or self.who, "at": now_iso(at),
                  "from_revision": plan.revision}  # fmt: skip
        if decision.action == ADVANCE:
            after = plan.advanced(at, labelled, record)
        else:
            after = plan.finished(_STATUS[decision.action], record)
        tags = {PLAN_TAG: after.to_json(), DECISION_TAG: json.dumps({**record, "evidence": decision.evidence},
                                                                    default=str)[:90_000]}  # fmt: skip
        text = f"fleet decision on v{plan.version} at revision {plan.revision}: {decision.action}"
        if not self.reg.create_model(claim_name(self.reg.model_name, plan), tags, text):
            return {"outcome": "lost", "action": decision.action, "revision": plan.revision}
        moves = self.apply(after)
        return {"outcome": "applied", "action": decision.action, "reasons": decision.reasons,
                "plan": after.summary(), "alias_moves": moves}  # fmt: skip

    def apply(self, after: Plan) -> list[dict[str, Any]]:
        """Carry out a recorded decision, idempotently (module docstring): the plan tag, then the aliases."""
        try:
            current = Plan.of(self.reg.model_version(after.version))
        except FleetError:
            current = None  # an unreadable view is replaced by the recorded one
        if current is None or current.id != after.id or current.revision < after.revision:
            self.reg.set_version_tag(after.version, PLAN_TAG, after.to_json())
        if after.status == ACTIVE or (self.reg.alias(CHALLENGER_ALIAS) or {}).get("version") != after.version:
            return []
        who, why, moves = f"fleet:{after.last.get('by')}", after.last, []
        if after.status == PROMOTED:
            before = (self.reg.alias(CHAMPION_ALIAS) or {}).get("version")
            if before != after.version:
                self.reg.set_alias(CHAMPION_ALIAS, after.version)
                moves.append(audit(self.reg, CHAMPION_ALIAS, before, after.version, who, why, None))
        self.reg.delete_alias(CHALLENGER_ALIAS)
        moves.append(audit(self.reg, CHALLENGER_ALIAS, after.version, None, who, why, None))
        return moves


def start(reg: RestRegistry, version: str, waves: list[Wave], *, who: str, why: str,
          rule: DecisionRule | None = None, max_escape_rate: float | None = None,
          at: float | None = None) -> Plan:  # fmt: skip
    """Start the rollout of registered `version` by `waves`: its plan tag, then alias ``challenger`` -> it (audited).

    Raises:
        FleetError: no champion, `version` is the champion or not registered, or another plan is still active.
    """
    at = time.time() if at is None else at
    champion = (reg.alias(CHAMPION_ALIAS) or {}).get("version")
    if champion is None or champion == str(version):
        raise FleetError(f"v{version}: the champion is v{champion}; roll out a registered version that is not it")
    mv = reg.model_version(str(version))
    if mv is None:
        raise FleetError(f"v{version} is not a registered version of {reg.model_name}; publish it first")
    if not waves:
        raise FleetError("give the waves, e.g. --wave box-7 --wave 10% --wave 50% --wave all")
    current = reg.alias(CHALLENGER_ALIAS)
    for other in (current, mv):
        try:
            running = Plan.of(other)
        except FleetError:
            running = None  # an unreadable plan is replaced
        if running is not None and running.active:
            raise FleetError(f"v{running.version} is rolling out (plan {running.id}, wave {running.wave + 1}): "
                             "`sensitune fleet stop` it first")  # fmt: skip
    stamp = now_iso(at)
    started = {"action": "start", "by": who, "at": stamp, "reasons": [why]}
    unique = f"{stamp[:19].replace('-', '').replace(':', '')}-{uuid.uuid4().hex[:6]}"  # claims are named after it
    plan = Plan(id=f"v{version}-{unique}", version=str(version),
                champion=champion, waves=tuple(waves), rule=rule or DecisionRule(), max_escape_rate=max_escape_rate,
                started=stamp, wave_started=stamp, last=started)  # fmt: skip
    reg.set_version_tag(plan.version, PLAN_TAG, plan.to_json())
    before = (current or {}).get("version")
    if before != plan.version:
        reg.set_alias(CHALLENGER_ALIAS, plan.version)
        audit(reg, CHALLENGER_ALIAS, before, plan.version, who, {"fleet_plan": plan.id, "why": why}, None)
    return plan


def fleet_status(reg: RestRegistry, version: str | None = None) -> dict[str, Any]:
    """The plan of `version` (default: the challenger's), its pooled numbers and its boxes' reports."""
    mv = reg.model_version(str(version)) if version else reg.alias(CHALLENGER_ALIAS)
    plan = Plan.of(mv)
    if plan is None:
        which = f"v{version}" if version else "the registry's challenger"
        raise FleetError(f"{which} carries no fleet plan; give the version: sensitune fleet watch VERSION")
    pooled = json.loads(mv["tags"].get(POOLED_TAG) or "null")
    boxes = [r for r in Decider(reg, "watch").reports() if isinstance(r, dict) and r.get("plan") == plan.id]
    return {"plan": plan.summary() | {"last": plan.last, "waves": [w.describe() for w in plan.waves]},
            "pooled": pooled, "boxes": sorted(boxes, key=lambda r: str(r.get("box")))}  # fmt: skip
