"""The budget chosen on validation: one sensitivity pass, a ladder of nested plans, the best one on validation.

A ladder is a list of budgets, e.g. ``["0.25%", "0.5%", "1%", "2%", "4%", "8%", "full"]``. Every rung is
allocated from the same scores (so a larger budget keeps the smaller one's top entries), trained with the same
schedule and seed, and scored on the validation split only; `choose_rung` picks the best score, on a tie the
lower validation loss (the rule that picks epochs, `spt_core.portable.metrics.selection_key`), and then the smaller
budget
(fewer values to ship and to overfit). ``"full"`` is the limit: every candidate value trained as a
dense delta (`full_plan`): full fine-tuning of the backbone except the stem and the position/class tokens, which
every plan keeps frozen (`spt_core.candidates`), with weight decay towards the pretrained weights.
The product (`sensitune train` with ``plan.budget: auto``) and the benchmark harness use these functions, so the
published "budget chosen on validation" rows are what the product does. ``plan.search: halving`` chooses among
the same rungs, each at a few learning rates, by successive halving instead (`spt_core.search`: at most two
trainings' worth of steps instead of one training per rung).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .allocate import allocate, plan_of
from .plan import Plan, Target, parse_budget
from .portable.errors import PlanError
from .portable.metrics import best_by_selection
from .sensitivity import Sensitivity

FULL = "full"
AUTO = "auto"
LADDER, HALVING = "ladder", "halving"  # plan.search: train every rung, or successive halving (spt_core.search)
SEARCHES = (LADDER, HALVING)


@dataclass(frozen=True)
class Rung:
    """One trained rung of a ladder: its budget label, exact trainable count and validation result."""

    budget: str
    trainable: int
    val_score: float
    val_acc: float | None = None
    best_epoch: int | None = None
    plan_hash: str | None = None
    val_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def check_ladder(ladder: Sequence[str], backbone_params: int) -> list[str]:
    """The ladder as labels, smallest first; every entry a budget `parse_budget` reads, or "full".

    Raises:
        PlanError: an empty ladder, an unreadable or repeated budget, or one not in increasing order.
    """
    labels = [str(b).strip() for b in ladder]
    if not labels:
        raise PlanError("plan.ladder is empty: give budgets such as [0.5%, 2%, 8%, full]")
    counts = [backbone_params + 1 if b == FULL else parse_budget(b, backbone_params) for b in labels]
    if any(b >= a for a, b in zip(counts[1:], counts)) or labels.count(FULL) > 1:
        raise PlanError(f"plan.ladder {labels}: give distinct budgets in increasing order, 'full' last if at all")
    return labels


def full_plan(sensitivity: Sensitivity, *, rank: int, alpha: float, beta: float) -> Plan:
    """Every candidate trained whole, as dense deltas (mergeable): the backbone but its stem and tokens.

    rank, alpha and beta change no target here; the plan records them as `allocate`'s plans do (plan.* options)."""
    cands = list(sensitivity.candidates.values())
    total = sum(c.numel for c in cands)
    targets = [Target(c.name, "whole", c.numel, c.kind, c.shape, c.block) for c in cands]
    meta = {"full": True, "candidates": len(cands), "candidate_values": total, "saturated": True}
    return plan_of(sensitivity, targets, {}, total, ("none", {"rank": rank}, alpha, beta), meta)


def rung_plan(sensitivity: Sensitivity, budget: str, **allocate_kw: Any) -> Plan:
    """The plan of one rung: `full_plan` for "full", else `allocate` with the plan section's options."""
    if budget == FULL:
        return full_plan(sensitivity, **{k: v for k, v in allocate_kw.items() if k in ("rank", "alpha", "beta")})
    return allocate(sensitivity, budget, **allocate_kw)


def is_auto(budget: int | float | str) -> bool:
    """Whether `budget` asks for the ladder (``plan.budget: auto``) rather than one budget."""
    return str(budget).strip().lower() == AUTO


def plan_budget(
    sensitivity: Sensitivity,
    budget: int | float | str,
    ladder: Sequence[str],
    search: str = LADDER,
    **allocate_kw: Any,
) -> Plan:
    """The plan of `budget`: `allocate` for one budget, or for ``auto`` the smallest rung of `ladder`.

    An auto plan records its ladder (budget, hash and count of each rung, all allocated from the same scores), the
    options, and how the train stage chooses among the rungs (`search`: `LADDER`, one training each, or `HALVING`,
    `spt_core.search`), so that `ladder_plans` re-allocates exactly these rungs; `ladder` and `search` are read
    only then.
    """
    if not is_auto(budget):
        return allocate(sensitivity, budget, **allocate_kw)
    if search not in SEARCHES:
        raise PlanError(f"plan.search={search!r}: use {' | '.join(SEARCHES)}")
    labels = check_ladder(ladder, int(sensitivity.meta.get("backbone_params", 0)))
    rungs = [(b, rung_plan(sensitivity, b, **allocate_kw)) for b in labels]
    plan = rungs[0][1]
    record = [{"budget": b, "plan_hash": r.hash(), "trainable": r.trainable} for b, r in rungs]
    plan.meta.update({"ladder": record, "allocate": allocate_kw, "search": search})
    return plan


def search_of(plan: Plan) -> str:
    """How an auto plan's rungs are chosen (`plan_budget`'s `search`; plans made before it was recorded: ladder)."""
    return str(plan.meta.get("search", LADDER))


def is_ladder(plan: Plan) -> bool:
    """Whether `plan` is an auto plan: `plan_budget` recorded a ladder of rungs to train in it."""
    return bool(plan.meta.get("ladder"))


def ladder_plans(plan: Plan, sensitivity: Sensitivity) -> list[tuple[str, Plan]]:
    """The rungs an auto plan recorded, re-allocated from `sensitivity` and checked by hash; [] for one budget.

    Raises:
        PlanError: a rung's plan differs from the recorded one (the scores changed since the plan was made).
    """
    out = []
    for rung in plan.meta.get("ladder") or []:
        p = rung_plan(sensitivity, rung["budget"], **plan.meta["allocate"])
        if p.hash() != rung["plan_hash"]:
            raise PlanError(
                f"rung {rung['budget']} of the plan does not match the sensitivity scores it was allocated from "
                "(sensitivity.safetensors changed): re-run `sensitune plan`"
            )
        out.append((rung["budget"], p))
    return out


def choose_rung(rungs: Sequence[Rung]) -> Rung:
    """The rung `selection_key` ranks first (the best validation score, then the lower validation loss, as for
    epochs); remaining ties go to the fewer trainable values, then the earlier rung. Losses break the tie only
    when every rung tied at the best score has one (records made before losses were kept: scores and counts)."""
    if not rungs:
        raise PlanError("no trained rung to choose from")
    return best_by_selection(rungs, lambda r: r.val_score, lambda r: r.val_loss, lambda r: -r.trainable)
