"""The tuner registry: every tuner kind, in one table, with what allocation, apply_plan and merge need to know.

A kind is one file that defines its module and its config (a frozen dataclass of the kind's own
hyper-parameters) and ends with ``register_tuner(TunerKind(...))``; its import in `spt_core/tuners/__init__.py`
is the only other line that names it. What reads the table:

  - `spt_core.plan` — the kinds a target may have (`plan.KINDS`, a live view of the table);
  - `spt_core.allocate` — ``cost``: the kinds with a cost formula are the values of ``structured``
    (`structured_choices`), their formula prices a module on a matrix's rows;
  - `spt_core.tuners.apply_plan` — ``build``: the module for one target;
  - `spt_core.merge` — ``mergeable``: whether the kind folds into the weights (`plan_is_mergeable`).

Hyper-parameters: a plan carries one flat mapping of values (`Plan.tuner_config`, written at the top level of
plan.json, e.g. ``"rank": 8``), and each kind reads the fields of its own ``config`` from it (`kind_config`).
A field name means one thing for every kind that declares it: ``rank`` is LoRA's rank and the adapter's width.

A built module is either a weight-space delta — it has ``add_to(w) -> w'`` and is added to the target
parameter on the fly — or, without ``add_to``, a module applied to the host's output (``forward(y) -> y'``).
This module names no Plan and no Target: the plan imports it to list the kinds, so it must not import the plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from ..portable.errors import PlanError

if TYPE_CHECKING:
    from ..candidates import Candidate


@dataclass(frozen=True)
class NoConfig:
    """The config of a kind without hyper-parameters (sparse, whole)."""


@dataclass(frozen=True)
class TunerKind:
    """One kind of tuner.

    Attributes:
        name: the kind as plans write it (``Target.kind``).
        module: the nn.Module class that `build` returns; `merge` finds a tuner's kind by it.
        cost: ``cost(candidate, rows, config)`` -> trainable values of this module on ``rows`` output rows of a
            matrix candidate, with ``config`` this kind's config; None for kinds that allocation places by entry
            count (sparse: nnz, whole: numel). A kind with a cost is a value of ``structured``.
        mergeable: whether merge can fold it into the weights (a weight-space delta is; a nonlinear module on
            the output is not).
        build: ``build(target, param, host, plan, *, config, **options)`` -> the module for one target (its
            device and dtype are set by `apply_plan`). Raises PlanError when the plan lacks what the module needs.
        config: a frozen dataclass of the kind's hyper-parameters (its fields, their defaults and checks);
            `NoConfig` for a kind without any.
    """

    name: str
    module: type[nn.Module]
    cost: Callable[[Candidate, int, Any], int] | None
    mergeable: bool
    build: Callable[..., nn.Module]
    config: type = NoConfig


TUNERS: dict[str, TunerKind] = {}  # in registration order: the order plans and summaries list the kinds in


def register_tuner(kind: TunerKind) -> TunerKind:
    """Add `kind` to `TUNERS`; returns it. A name can be registered once."""
    if kind.name in TUNERS:
        raise ValueError(f"tuner kind {kind.name!r} is already registered (by {TUNERS[kind.name].module.__name__})")
    if kind.name == "none":
        raise ValueError("'none' is reserved: structured='none' means sparse only")
    if not (isinstance(kind.config, type) and dataclasses.is_dataclass(kind.config)):
        raise ValueError(f"tuner kind {kind.name!r}: config must be a dataclass class (NoConfig for none)")
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


def tuner_fields() -> dict[str, list[str]]:
    """{hyper-parameter name: the registered kinds whose config declares it}."""
    out: dict[str, list[str]] = {}
    for kind in TUNERS.values():
        for f in dataclasses.fields(kind.config):
            out.setdefault(f.name, []).append(kind.name)
    return out


def check_tuner_config(values: Mapping[str, Any]) -> None:
    """Refuse a hyper-parameter that no registered kind declares (a typo would otherwise be ignored).

    Raises:
        PlanError: naming the unknown names and every name the registered kinds take.
    """
    known = tuner_fields()
    unknown = sorted(set(values) - set(known))
    if unknown:
        takes = "; ".join(f"{name} ({', '.join(kinds)})" for name, kinds in known.items())
        raise PlanError(f"unknown tuner hyper-parameter(s) {', '.join(unknown)}: the registered kinds take {takes}")


def kind_config(kind: TunerKind, values: Mapping[str, Any]) -> Any:
    """`kind`'s config from a plan's flat hyper-parameter values: its own fields; other kinds' are ignored.

    Raises:
        PlanError: a field without a default is missing from `values` (the config itself checks the values).
    """
    own = dataclasses.fields(kind.config)
    required = [f.name for f in own if dataclasses.MISSING is f.default and dataclasses.MISSING is f.default_factory]
    missing = [name for name in required if name not in values]
    if missing:
        raise PlanError(
            f"tuner kind {kind.name!r} needs {', '.join(missing)}, which the plan lacks: "
            f"pass allocate(..., {missing[0]}=...) and re-run plan"
        )
    return kind.config(**{f.name: values[f.name] for f in own if f.name in values})
