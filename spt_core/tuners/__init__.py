"""Tuners: put a plan into a model, list its trainable values, take it out again.

apply_plan(model, plan)   freeze everything, attach deltas/adapters, unfreeze the head
tuned_modules(model)      {host module name: TunerSet}
tuner_state_dict(model)   the trained values (tuners + head), keyed by parameter name
"""

from __future__ import annotations

import torch.nn as nn

from ..candidates import head_parameter_names
from ..errors import PlanError
from ..plan import Plan
from .adapter import Adapter
from .host import TunerSet, check_tuners_reached, detach_tuners, tuner_set
from .lora import LoRADelta
from .sparse import SparseDelta, WholeDelta

__all__ = [
    "Adapter",
    "LoRADelta",
    "SparseDelta",
    "TunerSet",
    "WholeDelta",
    "apply_plan",
    "check_tuners_reached",
    "remove_tuners",
    "trainable_count",
    "tuned_modules",
    "tuner_state_dict",
]


def _channel_dim(host: nn.Module) -> int:
    return 1 if isinstance(host, nn.modules.conv._ConvNd) else -1


def apply_plan(model: nn.Module, plan: Plan, *, lora_scale: float = 1.0) -> nn.Module:
    """Put `plan` into `model` in place and return it.

    Afterwards exactly the plan's values and the head have `requires_grad=True`; every other parameter is
    frozen (no `.grad`, no optimizer state). Base parameter names are unchanged.

    Raises:
        PlanError: when the plan names a parameter the model lacks or with another shape, or the model is tuned.
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
        if t.kind == "sparse" and t.param not in plan.indices:
            raise PlanError(f"plan has no indices for sparse target {t.param!r}; the plan files are incomplete")
    for p in model.parameters():
        p.requires_grad_(False)
    for t in plan.targets:
        host_name, _, attr = t.param.rpartition(".")
        host = modules[host_name]
        tuners = tuner_set(host)
        p = params[t.param]
        if t.kind == "adapter":
            channels = p.shape[0]
            adapter = Adapter(channels, plan.rank, t.rows, _channel_dim(host))
            tuners.adapters.append(adapter.to(p.device, p.dtype))
            continue
        if t.kind == "sparse":
            delta = SparseDelta(p.shape, plan.indices[t.param])
        elif t.kind == "whole":
            delta = WholeDelta(p.shape)
        elif t.kind == "lora":
            delta = LoRADelta(p.shape, plan.rank, t.rows, scale=lora_scale)
        else:
            raise PlanError(f"plan target {t.param!r} has unknown kind {t.kind!r}")
        if attr not in tuners.deltas:
            tuners.deltas[attr] = nn.ModuleList()
        tuners.deltas[attr].append(delta.to(p.device, p.dtype))
    head = set(head_parameter_names(model))
    for n, p in model.named_parameters():
        if n in head:
            p.requires_grad_(True)
    got = trainable_count(model)
    if got != plan.trainable:  # a structural invariant: every target's count formula matches its module
        raise AssertionError(f"tuners hold {got} values but the plan counts {plan.trainable}")
    return model


def tuned_modules(model: nn.Module) -> dict[str, TunerSet]:
    """Host modules that carry tuners, by module name."""
    return {n: m.spt for n, m in model.named_modules() if isinstance(getattr(m, "spt", None), TunerSet)}


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
