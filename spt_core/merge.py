"""Fold every tuner into the backbone: the edge gets a plain timm model.

For each tuned parameter W ← W + Σ deltas of the mergeable kinds (sparse, whole and LoRA deltas are all
additive in weight space, so merged outputs equal unmerged outputs up to float rounding). Whether a kind folds
is its registration's ``mergeable`` (`spt_core.tuners.registry`). Adapters are nonlinear and cannot be folded:
by default `merge` refuses a model with a non-mergeable tuner, naming the fix; `keep_adapters=True` folds the
rest and leaves those attached (the model then exports to ONNX/OpenVINO as is, but its state_dict has extra keys).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn as nn

from .portable.errors import PlanError
from .tuners import tuned_modules
from .tuners.host import detach_tuners
from .tuners.registry import TUNERS, kind_of


def merge(model: nn.Module, *, keep_adapters: bool = False) -> nn.Module:
    """Merge all mergeable tuners into `model` in place and remove them; returns the same model object.

    Args:
        model: a model with tuners (`apply_plan`).
        keep_adapters: fold what can be folded and keep the non-mergeable tuners (adapters) attached.

    Raises:
        PlanError: if the model has non-mergeable tuners and `keep_adapters` is False.
    """
    tuned = tuned_modules(model)
    kinds = [kind_of(tuner) for t in tuned.values() for tuner in t.all_tuners()]
    kept = Counter(k.name for k in kinds if not k.mergeable)
    if kept and not keep_adapters:
        mergeable = [k.name for k in TUNERS.values() if k.cost is not None and k.mergeable]
        found = ", ".join(f"{n} {name}{'s' if n > 1 else ''}" for name, n in kept.items())
        raise PlanError(
            f"the model has {found}, which cannot be folded into weights: plan with structured="
            f"{' or '.join(repr(k) for k in mergeable)} for a plain model, or merge(keep_adapters=True) to "
            "export with them"
        )
    for name, tuners in tuned.items():
        host = model.get_submodule(name)
        with torch.no_grad():
            for attr in list(tuners.deltas):
                deltas = tuners.deltas[attr]
                w = host._parameters[attr].detach()
                with torch.autocast(w.device.type, enabled=False):  # as TunerSet.effective: in W's dtype
                    for delta in deltas:
                        if kind_of(delta).mergeable:
                            w = delta.add_to(w)
                host._parameters[attr].copy_(w)
                rest = [d for d in deltas if not kind_of(d).mergeable]
                if rest:
                    tuners.deltas[attr] = nn.ModuleList(rest)
                else:
                    del tuners.deltas[attr]
        if not tuners.adapters and not tuners.deltas:
            detach_tuners(host)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
