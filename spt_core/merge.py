"""Fold every tuner into the backbone: the edge gets a plain timm model.

For each tuned parameter W ← W + Σ deltas (sparse, whole and LoRA deltas are all additive in weight space, so
merged outputs equal unmerged outputs up to float rounding). Adapters are nonlinear and cannot be folded: by
default `merge` refuses a plan with adapters, naming the fix; `keep_adapters=True` folds the rest and leaves the
adapters attached (the model then exports to ONNX/OpenVINO as is, but its state_dict has extra keys).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import PlanError
from .tuners import tuned_modules
from .tuners.host import detach_tuners


def merge(model: nn.Module, *, keep_adapters: bool = False) -> nn.Module:
    """Merge all weight deltas into `model` in place and remove the tuners; returns the same model object.

    Raises:
        PlanError: if the model has adapters and `keep_adapters` is False.
    """
    tuned = tuned_modules(model)
    n_adapters = sum(len(t.adapters) for t in tuned.values())
    if n_adapters and not keep_adapters:
        raise PlanError(
            f"the model has {n_adapters} adapters, which are nonlinear and cannot be folded into weights: "
            "plan with structured='lora' for a plain model, or merge(keep_adapters=True) to export with adapters"
        )
    for name, tuners in tuned.items():
        host = model.get_submodule(name)
        with torch.no_grad():
            for attr in tuners.deltas:
                host._parameters[attr].copy_(tuners.effective(host, attr))
        if tuners.adapters:
            tuners.deltas = nn.ModuleDict()  # folded; the adapters stay on the host
            continue
        detach_tuners(host)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
