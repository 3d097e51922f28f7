"""A fleet rollout plan: which boxes serve a challenger now (the waves), and where the plan stands.

The plan of challenger version V lives in the registry as one JSON document, the version tag
``sensitune.fleet.plan`` of V, so a box reads it in the very reply that names its challenger (`RestRegistry.alias`
returns the version's tags): following a plan costs a box no request. Only the fleet decider writes it
(`deploy.edge.fleet.decider`), after claiming the decision it writes.

    waves      e.g. box-7 -> 10 % -> 50 % -> all: each wave names boxes, cameras (pinned to the challenger on
               every box) and/or a share of the fleet's boxes; each adds to the ones before, and each has a floor
               of labelled challenger frames gathered in it and of hours spent in it before the next may start
    membership a box is in wave k when named in a wave up to k, or when `box_bucket` (a stable hash of its name,
               uniform in [0, 1)) is below one of their shares: the same boxes go first for every version, and a
               growing share only adds boxes
    revision   counts the decisions applied to the plan: 0 at start, +1 per advance, promotion or abort
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from deploy.edge.rollout.manifest import DecisionRule
from spt_core.portable.errors import SensituneError

PLAN_TAG = "sensitune.fleet.plan"  # version tag: the plan's state (written by the decider only)
POOLED_TAG = "sensitune.fleet.pooled"  # version tag: the latest pooled evidence (for `watch` and the box pages)
REPORT_TAG = "sensitune.fleet.report."  # + box name: registered-model tag, one box's counts
ACTIVE, PROMOTED, ABORTED = "active", "promoted", "aborted"
_SHARE = re.compile(r"(\d+(?:\.\d+)?)%")


class FleetError(SensituneError):
    """A fleet plan that cannot be read or started."""


def now_iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def epoch_of(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def box_bucket(box: str) -> float:
    """Uniform in [0, 1) and fixed for a box name: a wave of share s holds the boxes whose bucket is below s."""
    return int.from_bytes(hashlib.sha256(f"fleet\x00{box}".encode()).digest()[:8], "big") / 2.0**64


@dataclass(frozen=True)
class Wave:
    """One step of a plan: what it adds, and what must happen in it before the next starts."""

    boxes: tuple[str, ...] = ()
    cameras: tuple[str, ...] = ()  # camera ids pinned to the challenger on every box (a camera-only canary)
    share: float = 0.0  # the fleet's boxes whose `box_bucket` is below it (1.0: all)
    min_labelled: int = 0  # labelled challenger frames pooled during this wave
    min_hours: float = 0.0

    @classmethod
    def parse(cls, spec: str, min_labelled: int = 0, min_hours: float = 0.0) -> Wave:
        """``box-7,box-9``, ``cam:line3-cam2``, ``10%``, ``all`` or a comma list of them (``--wave`` of the CLI)."""
        boxes, cameras, share = [], [], 0.0
        for item in (x.strip() for x in spec.split(",") if x.strip()):
            if item == "all":
                share = 1.0
            elif m := _SHARE.fullmatch(item):
                share = max(share, float(m.group(1)) / 100)
            elif item.startswith("cam:") and item[4:]:
                cameras.append(item[4:])
            else:
                boxes.append(item)
        wave = cls(tuple(boxes), tuple(cameras), share, min_labelled, min_hours)
        if not (boxes or cameras or share) or not 0.0 <= share <= 1.0:
            raise FleetError(f"--wave {spec!r}: name boxes (box-7,box-9), cameras (cam:ID), a share (10%) or all")
        return wave

    def describe(self) -> str:
        parts = list(self.boxes) + [f"cam:{c}" for c in self.cameras]
        parts += ["all boxes" if self.share >= 1.0 else f"{self.share:.0%} of boxes"] if self.share else []
        return ", ".join(parts)


@dataclass(frozen=True)
class Plan:
    """A rollout plan of challenger `version` against `champion` (module docstring); frozen: a decision makes a new
    one (`advanced`, `finished`)."""

    id: str
    version: str
    champion: str
    waves: tuple[Wave, ...]
    rule: DecisionRule = field(default_factory=DecisionRule)
    max_escape_rate: float | None = None  # the ceiling; None: the operating point the boxes report
    started: str = ""
    revision: int = 0
    wave: int = 0
    wave_started: str = ""
    wave_base: int = 0  # pooled labelled challenger frames when the wave started
    status: str = ACTIVE
    last: dict[str, Any] = field(default_factory=dict)  # the last applied decision: action, reasons, by, at

    @property
    def active(self) -> bool:
        return self.status == ACTIVE

    @property
    def last_wave(self) -> bool:
        return self.wave == len(self.waves) - 1

    def membership(self, box: str) -> str | None:
        """``"box"`` when the box serves the challenger on its share of cameras in the current wave, ``"cameras"``
        when only the named cameras serve it, None when it serves the champion only (or the plan is over)."""
        if not self.active:
            return None
        current = self.waves[: self.wave + 1]
        if any(box in w.boxes or box_bucket(box) < w.share for w in current):
            return "box"
        return "cameras" if self.cameras() else None

    def cameras(self) -> tuple[str, ...]:
        """The cameras pinned to the challenger by the waves so far."""
        return tuple(dict.fromkeys(c for w in self.waves[: self.wave + 1] for c in w.cameras))

    def advanced(self, at: float, labelled: int, decision: dict[str, Any]) -> Plan:
        return replace(self, revision=self.revision + 1, wave=self.wave + 1, wave_started=now_iso(at),
                       wave_base=labelled, last=decision)  # fmt: skip

    def finished(self, status: str, decision: dict[str, Any]) -> Plan:
        return replace(self, revision=self.revision + 1, status=status, last=decision)

    def to_json(self) -> str:
        d = asdict(self)
        d["waves"] = [asdict(w) for w in self.waves]
        return json.dumps(d, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: Any, where: str = "fleet plan") -> Plan:
        """Parse and check a plan document; a `FleetError` in one line naming what is wrong."""
        try:
            d = json.loads(text)
            waves = tuple(Wave(**{**w, "boxes": tuple(w["boxes"]), "cameras": tuple(w["cameras"])}) for w in d["waves"])
            plan = cls(**{**d, "waves": waves, "rule": DecisionRule(**d["rule"])})
            bad = (not waves or not 0 <= plan.wave < len(waves) or plan.status not in (ACTIVE, PROMOTED, ABORTED)
                   or not isinstance(plan.revision, int) or not isinstance(plan.version, str))  # fmt: skip
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise FleetError(f"{where}: not a fleet plan ({type(e).__name__}: {e}); start it again") from None
        if bad:
            raise FleetError(f"{where}: wave {plan.wave} of {len(waves)}, status {plan.status!r}: not a fleet plan")
        return plan

    @classmethod
    def of(cls, mv: dict[str, Any] | None) -> Plan | None:
        """The plan a registry version carries (`RestRegistry.alias` / `model_version` reply), or None."""
        text = ((mv or {}).get("tags") or {}).get(PLAN_TAG)
        return None if text is None else cls.from_json(text, f"v{mv['version']} tag {PLAN_TAG}")

    def summary(self) -> dict[str, Any]:
        """What a box shows and keeps: the plan, its wave in words, where it stands."""
        w = self.waves[self.wave]
        return {"plan": self.id, "version": self.version, "champion": self.champion, "status": self.status,
                "revision": self.revision, "wave": f"{self.wave + 1} of {len(self.waves)}", "wave_is": w.describe(),
                "wave_started": self.wave_started, "last": self.last.get("action")}  # fmt: skip
