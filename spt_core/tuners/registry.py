"""The tuner registry: every tuner kind, in one table, with what allocation, apply_plan and merge need to know.

A kind is one file that defines its module and ends with ``register_tuner(TunerKind(...))``; nothing else in
spt_core names it. What reads the table:

  - `spt_core.plan` — the kinds a target may have (`plan.KINDS`, a live view of the table);
  - `spt_core.allocate` — ``cost``: the kinds with a cost formula are the values of ``structured``
    (`structured_choices`), their formula prices a module on a matrix's rows;
  - `spt_core.tuners.apply_plan` — ``build``: the module for one target;
  - `spt_core.merge` — ``mergeable``: whether the kind folds into the weights (`plan_is_mergeable`).

A built module is either a weight-space delta — it has ``add_to(w) -> w'`` and is added to the target
parameter on the fly — or, without ``add_to``, a module applied to the host's output (``forward(y) -> y'``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from ..portable.errors import PlanError

if TYPE_CHECKING:
    from ..candidates import Candidate
    from ..plan import Plan, Target


@dataclass(frozen=True)
class TunerKind:
    """One kind of tuner.

    Attributes:
        name: the kind as plans write it (``Target.kind``).
        module: the nn.Module class that `build` returns; `merge` finds a tuner's kind by it.
        cost: ``cost(candidate, rows, rank)`` -> trainable values of this module on ``rows`` output rows of a
            matrix candidate; None for kinds that allocation places by entry count (sparse: nnz, whole: numel).
            A kind with a cost is a value of ``structured``.
        mergeable: whether merge can fold it into the weights (a weight-space delta is; a nonlinear module on
            the output is not).
        build: ``build(target, param, host, plan, **options)`` -> the module for one target, on the
            parameter's device and dtype. Raises PlanError when the plan lacks what the module needs.
    """

    name: str
    module: type[nn.Module]
    cost: Callable[[Candidate, int, int], int] | None
    mergeable: bool
    build: Callable[..., nn.Module]


TUNERS: dict[str, TunerKind] = {}  # in registration order: the order plans and summaries list the kinds in


def register_tuner(kind: TunerKind) -> TunerKind:
    """Add `kind` to `TUNERS`; returns it. A name can be registered once."""
    if kind.name in TUNERS:
        raise ValueError(f"tuner kind {kind.name!r} is already registered (by {TUNERS[kind.name].module.__name__})")
    if kind.name == "none":
        raise ValueError("'none' is reserved: structured='none' means sparse only")
    TUNERS[kind.name] = kind
    return kind


def tuner_kind(name: str) -> TunerKind:
    """The registered kind `name`; a PlanError naming the known kinds otherwise."""
    try:
        return TUNERS[name]
    except KeyError:
        raise PlanError(f"unknown tuner kind {name!r}; registered kinds: {', '.join(TUNERS)}") from None


def kind_of(module: nn.Module) -> TunerKind:
    """The registered kind whose module class `module` is."""
    for kind in TUNERS.values():
        if type(module) is kind.module:
            return kind
    raise PlanError(f"{type(module).__name__} is not the module of a registered tuner kind ({', '.join(TUNERS)})")


def structured_choices() -> tuple[str, ...]:
    """The values ``structured`` accepts: every kind with a cost formula, then "none" (sparse only)."""
    return (*(k.name for k in TUNERS.values() if k.cost is not None), "none")


def plan_is_mergeable(plan: Plan) -> bool:
    """Whether `merge` can fold every target of `plan` into the weights (a plain model afterwards)."""
    return all(tuner_kind(t.kind).mergeable for t in plan.targets)


def build_tuner(target: Target, param: nn.Parameter, host: nn.Module, plan: Plan, **options: Any) -> nn.Module:
    """The module of `target`'s kind, built by its registration, on the parameter's device and dtype."""
    return tuner_kind(target.kind).build(target, param, host, plan, **options).to(param.device, param.dtype)
