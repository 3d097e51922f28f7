"""Tuners: put a plan into a model, list its trainable values, take it out again.

apply_plan(model, plan)   freeze everything, attach one tuner per target (built by its kind), unfreeze the head
tuned_modules(model)      {host module name: TunerSet}
tuner_state_dict(model)   the trained values (tuners + head), keyed by parameter name

Each kind lives in its own file with its config (its hyper-parameters) and registers itself in
`registry.TUNERS` (see registry.py); a new kind is that file plus its import line below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from ..candidates import head_parameter_names
from ..portable.errors import PlanError

# Registration order is the order plans and summaries list the kinds in: sparse, whole, lora, adapter.
# isort: off
from .sparse import SparseDelta, WholeDelta
from .lora import LoRAConfig, LoRADelta
from .adapter import Adapter, AdapterConfig

# isort: on
from .host import TunerSet, check_tuners_reached, detach_tuners, tuned_modules, tuner_set
from .registry import (
    TUNERS,
    NoConfig,
    TunerKind,
    check_tuner_config,
    kind_config,
    register_tuner,
    structured_choices,
    tuner_kind,
)

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = [
    "TUNERS",
    "Adapter",
    "AdapterConfig",
    "LoRAConfig",
    "LoRADelta",
    "NoConfig",
    "SparseDelta",
    "TunerKind",
    "TunerSet",
    "WholeDelta",
    "apply_plan",
    "check_tuner_config",
    "check_tuners_reached",
    "kind_config",
    "plan_is_mergeable",
    "register_tuner",
    "remove_tuners",
    "structured_choices",
    "trainable_count",
    "tuned_modules",
    "tuner_state_dict",
]


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Put `plan` into `model` in place and return it.

    Afterwards exactly the plan's values and the head have `requires_grad=True`; every other parameter is
    frozen (no `.grad`, no optimizer state). Base parameter names are unchanged.

    Args:
        model: the base model (no tuners yet).
        plan: the targets; each is built by its registered kind (`registry.TUNERS`) with that kind's config,
            read from the plan's hyper-parameters (`Plan.tuner_config`, e.g. LoRA's rank).

    Raises:
        PlanError: when the plan names a parameter the model lacks or with another shape, a kind that is not
            registered, lacks what a kind needs (indices, a hyper-parameter), or the model is tuned already.
    """
    if tuned_modules(model):
        raise PlanError("the model already has tuners; create a fresh model or merge() before applying a plan")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for t in plan.targets:  # validate everything before changing anything
        p = params.get(t.param)
        if p is None:
            raise PlanError(f"plan target {t.param!r} is not a parameter of {type(model).__name__}: wrong backbone?")
        if tuple(p.shape) != tuple(t.shape):
            raise PlanError(f"plan target {t.param!r} has shape {tuple(t.shape)}, model has {tuple(p.shape)}")
    configs = {k: kind_config(tuner_kind(k), plan.tuner_config) for k in dict.fromkeys(t.kind for t in plan.targets)}
    # Built in target order before the model changes: a builder's PlanError leaves the model untouched, and the
    # random initialisations (LoRA A, adapter down) draw from the global RNG in plan order.
    built = []
    for t in plan.targets:
        host, param = modules[t.param.rpartition(".")[0]], params[t.param]
        tuner = tuner_kind(t.kind).build(t, param, host, plan, config=configs[t.kind])
        built.append(tuner.to(param.device, param.dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    for t, tuner in zip(plan.targets, built):
        host_name, _, attr = t.param.rpartition(".")
        tuner_set(modules[host_name]).add(attr, tuner)
    head = set(head_parameter_names(model))
    for n, p in model.named_parameters():
        if n in head:
            p.requires_grad_(True)
    got = trainable_count(model)
    if got != plan.trainable:  # a structural invariant: every target's count formula matches its module
        raise AssertionError(f"tuners hold {got} values but the plan counts {plan.trainable}")
    return model


def plan_is_mergeable(plan: Plan) -> bool:
    """Whether `merge` can fold every target of `plan` into the weights (a plain model afterwards)."""
    return all(tuner_kind(t.kind).mergeable for t in plan.targets)


def trainable_count(model: nn.Module) -> int:
    """Trainable values in the tuners (the head excluded)."""
    return sum(p.numel() for t in tuned_modules(model).values() for p in t.parameters())


def tuner_state_dict(model: nn.Module) -> dict:
    """Every value that training changes: tuner parameters and the head, keyed by parameter name."""
    head = set(head_parameter_names(model))
    tuner_ids = {id(p) for t in tuned_modules(model).values() for p in t.parameters()}
    return {n: p.detach() for n, p in model.named_parameters() if n in head or id(p) in tuner_ids}


def remove_tuners(model: nn.Module) -> nn.Module:
    """Drop every tuner without merging: the model is the base model again (unmerge)."""
    for name in list(tuned_modules(model)):
        detach_tuners(model.get_submodule(name))
    return model
