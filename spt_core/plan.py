"""The plan: which values of the backbone are trained, as plain data (JSON + index tensors in safetensors).

A plan is a list of targets, each keyed by a base parameter name, of one registered tuner kind (`KINDS`):
  - "sparse":  single entries of a parameter (flat indices in `Plan.indices[param]`), trained as deltas;
  - "whole":   the whole parameter trained as a dense delta (vectors, grouped-conv kernels, tiny matrices);
  - "lora":    a rank-r LoRA delta on a matrix or on one row segment (q, k or v of a fused qkv);
  - "adapter": a bottleneck adapter on the output channels of a matrix (or of one segment);
  - any other kind registered in `spt_core.tuners.registry`.
`count` is the exact number of trainable values of a target; the head is outside the plan. The kinds'
hyper-parameters travel as one flat mapping (`Plan.tuner_config`, e.g. ``{"rank": 8}``), written at the top
level of plan.json; each kind reads its own fields from it (`spt_core.tuners.registry.kind_config`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .portable.errors import PlanError
from .portable.io import atomic_path, write_json
from .tuners.registry import TUNERS

KINDS = TUNERS.keys()  # a live view: the registered tuner kinds, in registration order
# plan.json's own top-level keys; every other top-level key is a tuner hyper-parameter (`Plan.tuner_config`)
PLAN_KEYS = ("format", "budget", "trainable", "structured", "alpha", "beta", "backbone_params", "by_kind",
             "block_names", "meta", "targets", "hash")  # fmt: skip


@dataclass(frozen=True)
class Target:
    """One tuner on one parameter (or on a row segment of it)."""

    param: str
    kind: str  # one of KINDS
    count: int  # trainable values this target adds
    ptype: str  # candidate kind: linear | conv | vector
    shape: tuple[int, ...]
    block: int
    rows: tuple[int, int] | None = None  # output-row segment for lora/adapter on fused projections

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"], d["rows"] = list(self.shape), list(self.rows) if self.rows else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Target:
        rows = tuple(d["rows"]) if d.get("rows") else None
        return cls(**{**d, "shape": tuple(d["shape"]), "rows": rows})


@dataclass
class Plan:
    """What to train. `indices[param]` holds sorted flat int64 indices for that param's sparse target."""

    targets: list[Target]
    indices: dict[str, torch.Tensor]
    budget: int  # requested trainable count (head excluded)
    structured: str  # one of spt_core.tuners.structured_choices(): a kind with a cost formula, or "none"
    tuner_config: dict[str, Any]  # the kinds' hyper-parameters, flat: {"rank": 8} (LoRA rank = adapter width)
    alpha: float
    beta: float
    backbone_params: int
    block_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = sorted(set(self.tuner_config) & set(PLAN_KEYS))
        if clash:  # the values sit beside plan.json's own keys: one of them would be overwritten
            raise PlanError(f"tuner hyper-parameter(s) {clash} clash with plan.json's keys: rename the config field")

    @property
    def trainable(self) -> int:
        """Exact number of trained backbone values (the head is not counted)."""
        return sum(t.count for t in self.targets)

    def by_kind(self) -> dict[str, dict[str, int]]:
        """{kind: {"targets": n, "params": count}} for every tuner kind."""
        out = {k: {"targets": 0, "params": 0} for k in KINDS}
        for t in self.targets:
            out[t.kind]["targets"] += 1
            out[t.kind]["params"] += t.count
        return out

    def by_block(self) -> dict[str, dict[str, int]]:
        """{block name: {kind: count}} — where the budget went."""
        out: dict[str, Counter] = {}
        for t in self.targets:
            name = self.block_names[t.block] if t.block < len(self.block_names) else str(t.block)
            out.setdefault(name, Counter())[t.kind] += t.count
        return {k: dict(v) for k, v in out.items()}

    def summary(self) -> str:
        """A short human-readable table of the plan."""
        pct = 100.0 * self.trainable / max(self.backbone_params, 1)
        tuner = "".join(f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}" for k, v in self.tuner_config.items())
        rule = f"structured={self.structured}{tuner} alpha={self.alpha:g} beta={self.beta:g}"
        if self.meta.get("allocation") == "per_row":
            each = "one share of its entries" if self.meta.get("row_k") == "share" else "its top-k entries"
            rule = f"allocation=per_row (every output row {each})"
        if self.meta.get("whole"):
            rule += f"; trained whole first: {', '.join(self.meta['whole'])} ({self.meta['whole_values']:,} values)"
        lines = [
            f"plan: {self.trainable:,} trainable backbone values ({pct:.3f}% of {self.backbone_params:,}); "
            f"requested {self.budget:,}; {rule}",
        ]
        for k, v in self.by_kind().items():
            lines.append(f"  {k:<8} {v['targets']:>5} targets {v['params']:>12,} values")
        if self.meta.get("ladder"):
            rungs = ", ".join(f"{r['budget']} ({r['trainable']:,})" for r in self.meta["ladder"])
            lines.append(f"budget: auto; `sensitune train` trains each rung and keeps the best on validation: {rungs}")
        return "\n".join(lines)

    # --- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "sensitune-plan/1",
            "budget": self.budget,
            "trainable": self.trainable,
            "structured": self.structured,
            **self.tuner_config,
            "alpha": self.alpha,
            "beta": self.beta,
            "backbone_params": self.backbone_params,
            "by_kind": self.by_kind(),
            "block_names": self.block_names,
            "meta": self.meta,
            "targets": [t.to_dict() for t in self.targets],
        }

    def hash(self) -> str:
        """sha256 of the targets and indices: equal plans have equal hashes."""
        h = hashlib.sha256(json.dumps([t.to_dict() for t in self.targets], sort_keys=True).encode())
        for name in sorted(self.indices):
            h.update(name.encode())
            h.update(self.indices[name].to(torch.int64).numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write `path` (JSON) and `path` with suffix .safetensors (indices)."""
        path = Path(path)
        with atomic_path(path.with_suffix(".safetensors")) as tmp:
            save_file({k: v.contiguous() for k, v in self.indices.items()}, str(tmp), metadata={"plan": self.hash()})
        write_json(path, {**self.to_dict(), "hash": self.hash()})

    @classmethod
    def from_dict(cls, d: dict[str, Any], indices: dict[str, torch.Tensor]) -> Plan:
        return cls(
            targets=[Target.from_dict(t) for t in d["targets"]],
            indices=indices,
            budget=d["budget"],
            structured=d["structured"],
            tuner_config={k: v for k, v in d.items() if k not in PLAN_KEYS},
            alpha=d["alpha"],
            beta=d["beta"],
            backbone_params=d["backbone_params"],
            block_names=d.get("block_names", []),
            meta=d.get("meta", {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        idx_path = path.with_suffix(".safetensors")
        for p in (path, idx_path):
            if not p.is_file():
                raise PlanError(f"{p}: plan file not found; run `sensitune plan` first")
        try:
            d = json.loads(path.read_text())
            indices = load_file(str(idx_path))
            plan = cls.from_dict(d, indices)
        except (json.JSONDecodeError, SafetensorError, KeyError, TypeError) as e:
            raise PlanError(f"{path}: not a valid sensitune plan ({type(e).__name__}: {e}); re-run plan") from e
        if d.get("hash") and d["hash"] != plan.hash():
            raise PlanError(f"{path}: plan hash mismatch with {idx_path.name}; the files are from different runs")
        return plan


_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmM%]?)\s*$")


def parse_budget(budget: int | float | str, backbone_params: int) -> int:
    """Budget as a count: 400000, "400k", "0.4M", or a share of the backbone: "0.5%".

    Raises:
        PlanError: on unparseable text, a budget of 0, or one larger than the backbone.
    """
    if isinstance(budget, bool) or (isinstance(budget, float) and not math.isfinite(budget)):
        raise PlanError(f"budget={budget!r}: give a count (400000, '0.4M') or a percentage ('0.5%')")
    if isinstance(budget, (int, float)):
        count = int(round(budget))
    else:
        m = _BUDGET.match(str(budget))
        if not m:
            raise PlanError(f"budget={budget!r}: give a count (400000, '400k', '0.4M') or a percentage ('0.5%')")
        value, unit = float(m.group(1)), m.group(2).lower()
        scale = {"": 1, "k": 1e3, "m": 1e6, "%": backbone_params / 100.0}[unit]
        count = int(round(value * scale))
    if count <= 0:
        raise PlanError(f"budget={budget!r} is {count} values: give a positive budget, e.g. '0.5%' or 400000")
    if count > backbone_params:
        raise PlanError(
            f"budget={budget!r} ({count:,}) exceeds the backbone's {backbone_params:,} parameters: "
            "use full fine-tuning or a smaller budget"
        )
    return count
