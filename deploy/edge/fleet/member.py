"""A box's side of a fleet rollout, called by `deploy.edge.sync.Sync` in each round.

    challenger   the registry's challenger, or None where this box serves the champion only: outside the plan's
                 current wave, the plan over, or the version rolled back on this box
    adjust       the manifest for a camera-only wave: the named cameras pinned to the challenger, share 0
    owns         whether a decision of this box on a version stays on the box (a fleet box, or a version under a
                 plan): a local emergency rollback, reported to the fleet, that moves no registry alias
    report       this box's counts for the plan (`deploy.edge.fleet.evidence.box_report`) as the registered-model
                 tag ``sensitune.fleet.report.<box>``, written only when they changed
    lapsed       a box that follows a plan's challenger and has not reached the registry for ``stale_after_s``
                 drops the challenger until it hears again: an abort it cannot hear never reaches its line

The member keeps what must outlive a restart in the sync's state (``state["fleet"]``, in sync_state.json).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from deploy.edge.box import BoxConfig
from deploy.edge.fleet.evidence import box_report
from deploy.edge.fleet.plan import POOLED_TAG, REPORT_TAG, FleetError, Plan
from deploy.edge.mlflow_rest import RestRegistry
from deploy.edge.rollout.manifest import CHALLENGER, RolloutConfig, load_config


def report_key(box: str) -> str:
    """The registered-model tag of a box's report (tag keys allow letters, digits, ``_ - . /`` and spaces)."""
    return REPORT_TAG + re.sub(r"[^\w.\-]", "_", box)


class FleetMember:
    """This box in the fleet (module docstring); `clock` is seconds since the epoch (a simulator passes its own)."""

    def __init__(self, box: BoxConfig, state: dict[str, Any], clock: Callable[[], float] = time.time) -> None:
        self.box, self.clock, self.state = box, clock, state
        self.fleet: dict[str, Any] = dict(state.get("fleet") or {})
        self.plan: Plan | None = None  # the active plan of this round's challenger
        self.membership: str | None = None

    def owns(self, reg: RestRegistry, version: str | None) -> bool:
        """True when this box's decision on `version` must stay local: a fleet box, or a version under a plan."""
        if self.box.fleet or self.plan is not None:
            return True
        try:
            return Plan.of(reg.model_version(str(version))) is not None if version else False
        except FleetError:
            return True  # a plan we cannot read is still a plan

    def note_local(self, record: dict[str, Any]) -> None:
        """Keep a local promote/rollback (a decisions.jsonl record) for the report; a rolled-back version is not
        served here again under the same plan."""
        version = (record.get("evidence") or {}).get("challenger_version")
        self.fleet.setdefault("local", {})[str(version)] = {
            "action": record.get("action"), "source": record.get("source"), "reasons": record.get("reasons"),
            "ts": record.get("ts"), "plan": None if self.plan is None else self.plan.id,
        }  # fmt: skip
        self._keep()

    def challenger(self, mv: dict[str, Any] | None) -> dict[str, Any] | None:
        """The challenger this box serves this round: `mv`, or None (module docstring). The registry answered."""
        self.plan, self.membership = None, None
        try:
            plan = Plan.of(mv)
            self.fleet.pop("error", None)
        except FleetError as e:
            self.fleet["error"], plan = str(e), None
        if plan is None:
            self.fleet.update(plan=None, following=None, pooled=None, member=None)
            self._keep()
            return None if self.box.fleet or self.fleet.get("error") else mv
        self.fleet.update(plan=plan.summary(), last_ok=self.clock())
        with_pooled = (mv.get("tags") or {}).get(POOLED_TAG)
        try:
            self.fleet["pooled"] = json.loads(with_pooled) if with_pooled else None
        except ValueError:
            self.fleet["pooled"] = None
        local = (self.fleet.get("local") or {}).get(plan.version) or {}
        rolled_back = local.get("action") == "rollback" and local.get("plan") in (plan.id, None)
        self.plan = plan if plan.active else None
        if self.plan is not None and not rolled_back:  # a local rollback holds for the rest of the plan
            self.membership = plan.membership(self.box.box)
        self.fleet["member"] = self.membership
        self.fleet["following"] = plan.version if self.membership else None
        self._keep()
        return mv if self.membership else None

    def adjust(self, cfg: RolloutConfig) -> RolloutConfig:
        """`cfg` with the fleet's camera pins: the wave's cameras pinned to the challenger (share 0) on a box that
        is in the wave by its cameras only; pins the fleet set before are removed otherwise."""
        ours = set(self.fleet.get("pins") or [])
        pinned = {k: v for k, v in cfg.pinned.items() if k not in ours}
        mine: dict[str, str] = {}
        if cfg.challenger is not None and self.membership == "cameras" and self.plan is not None:
            mine = {c: CHALLENGER for c in self.plan.cameras() if c not in pinned}
            cfg = replace(cfg, challenger_share=0.0)
        self.fleet["pins"] = sorted(mine)
        self._keep()
        return replace(cfg, pinned={**pinned, **mine})

    def lapsed(self) -> bool:
        """True when this box follows a plan's challenger and last reached the registry over ``stale_after_s`` ago."""
        last = self.fleet.get("last_ok")
        return bool(self.fleet.get("following")) and last is not None and self.clock() - last > self.box.stale_after_s

    def dropped(self) -> None:
        self.fleet["following"], self.membership = None, None
        self._keep()

    def _keep(self) -> None:
        """Into the sync's state (sync_state.json, /healthz) what is set; a box outside any fleet keeps nothing."""
        kept = {k: v for k, v in self.fleet.items() if v not in (None, [], {})}
        if kept:
            self.state["fleet"] = kept
        else:
            self.state.pop("fleet", None)

    def report(self, reg: RestRegistry, rollout: Path) -> bool:
        """Send this box's counts for the plan when they changed and the box served its challenger (or decided on
        it); True when sent. Counts from before a local rollback stay in."""
        if self.plan is None:
            return False
        local = (self.fleet.get("local") or {}).get(self.plan.version)
        rep = box_report(load_config(rollout), self.plan, self.box.box, local, self.clock())
        if rep["arms"][CHALLENGER]["requests"] == 0 and not local:
            return False
        digest = hashlib.sha256(json.dumps({k: v for k, v in rep.items() if k != "at"}, sort_keys=True,
                                           default=str).encode()).hexdigest()[:16]  # fmt: skip
        if digest == self.fleet.get("sent"):
            return False
        reg.set_model_tag(report_key(self.box.box), json.dumps(rep, default=str))
        self.fleet["sent"] = digest
        self._keep()
        return True
