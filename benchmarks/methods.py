"""The methods compared by `benchmarks/compare.py`: each one decides which values of a timm model are trained.

    linear         head only (linear probe, trained with the same loop and schedule as the others)
    bitfit         every bias of the backbone (BatchNorm/LayerNorm/Linear/Conv biases) + head
    full           every parameter
    peft-lora      the `peft` library's LoRA, uniform on the usual targets (ViT: qkv/proj/fc1/fc2; CNN: pointwise
                   1x1 convs outside SE blocks and the stem), rank chosen so its count is nearest the budget
    random-sparse  random scores allocated with structured="none" (ablation: does sensitivity matter?)
    spt-lora       sensitune SPT plan, LoRA for matrices past the alpha rule (structured="lora")
    spt-adapter    the same with adapters (structured="adapter")
    sparse-only    the SPT ranking, every chosen matrix entry a sparse delta (structured="none")
    per-row-sparse the SPT scores, every output row its top-k entries (allocation="per_row", GPS's rule), all sparse
    auto-halving   opt-in: the product's plan.budget: auto with plan.search: halving, one row per search
                   (`benchmarks/search_job.py`)
    per-row-dw     opt-in, the CNN gap study (`GAP_METHODS`): per-row sparse with the depthwise kernels whole
    per-row-norm   ... with the normalization layers' affine weights and biases whole (plan.whole: [norm])
    per-row-stem   ... with the stem whole (its own sensitivity pass measures the stem: include_stem)
    per-row-share  ... every row one share of its entries instead of one count (plan.row_k: share)

Every method leaves the head trainable; backbone counts exclude the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from benchmarks.search_job import SEARCH_METHODS
from spt_core.api import SPT_RULE, Sensitivity, allocate, apply_plan
from spt_core.candidates import block_index, count_backbone_params, find_candidates, head_parameter_names
from spt_core.portable.errors import SensituneError

METHODS = ("linear", "bitfit", "full", "peft-lora", "random-sparse", "spt-lora", "spt-adapter", "sparse-only",
           "per-row-sparse")  # fmt: skip
# the per-row rule with what else a small budget might include on a CNN (`spt_core.allocate`'s whole / row_k)
GAP_METHODS = {"per-row-dw": {"whole": ("depthwise",)}, "per-row-norm": {"whole": ("norm",)},
               "per-row-stem": {"whole": ("stem",)}, "per-row-share": {"row_k": "share"}}  # fmt: skip
STEM_METHODS = ("per-row-stem",)  # read a sensitivity pass that measured the stem too
# need a measured Sensitivity (a search's trials all share the seed's one pass)
SENSITIVITY_METHODS = ("spt-lora", "spt-adapter", "sparse-only", "per-row-sparse", *SEARCH_METHODS, *GAP_METHODS)
PLAN_METHODS = {"random-sparse": "none", "spt-lora": "lora", "spt-adapter": "adapter", "sparse-only": "none",
                "per-row-sparse": "none", **dict.fromkeys(GAP_METHODS, "none")}  # fmt: skip
ALLOCATION = {"per-row-sparse": "per_row", **dict.fromkeys(GAP_METHODS, "per_row")}  # the others: the global top-k
FULL_LR_METHODS = ("full",)  # methods that take the full fine-tuning learning-rate grid
VIT_LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass
class MethodInfo:
    """What a method made trainable: exact counts, and method-specific details (rank, plan breakdown)."""

    method: str
    trainable_backbone: int
    trainable_head: int
    backbone_params: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_backbone / self.backbone_params


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(backbone, head) values with requires_grad; the head is `model.get_classifier()`."""
    head = set(head_parameter_names(model))
    backbone = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in head)
    return backbone, sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n in head)


def _freeze_all_but_head(model: nn.Module) -> set[str]:
    head = set(head_parameter_names(model))
    for n, p in model.named_parameters():
        p.requires_grad_(n in head)
    return head


def lora_target_modules(model: nn.Module) -> list[str]:
    """Full names of the modules peft LoRA wraps: ViT attention/MLP Linears, or a CNN's pointwise convs.

    Pointwise convs are 1x1, groups=1, outside squeeze-excitation blocks and outside the stem/head classifier.
    """
    head = set(head_parameter_names(model))
    linears = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in VIT_LORA_TARGETS and f"{n}.weight" not in head
    ]
    if linears:
        return linears
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and m.groups == 1
        and ".se." not in f".{n}."
        and f"{n}.weight" not in head
    ]


def lora_cost_per_rank(model: nn.Module, targets: list[str]) -> int:
    """Trainable values of rank-1 LoRA on `targets`: Σ (fan_in + fan_out) (A: r×in, B: out×r for 1x1 convs)."""
    mods = dict(model.named_modules())
    total = 0
    for t in targets:
        m = mods[t]
        if isinstance(m, nn.Linear):
            total += m.in_features + m.out_features
        else:
            total += m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels
    return total


def nearest_rank(budget: int, per_rank: int) -> int:
    """The rank whose LoRA count r·per_rank is nearest `budget` (ties: the smaller rank), at least 1."""
    lo = max(1, budget // per_rank)
    return min((lo, lo + 1), key=lambda r: (abs(r * per_rank - budget), r))


def random_sensitivity(model: nn.Module, seed: int) -> Sensitivity:
    """Uniform random scores for every candidate (seeded): the 'random sparse entries' ablation."""
    cands = find_candidates(model)
    g = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(c.shape, generator=g) for n, c in cands.items()}
    meta = {"backbone_params": count_backbone_params(model), "block_names": block_index(model)[1]}
    return Sensitivity(scores=scores, candidates=cands, meta=meta)


def setup_method(
    model: nn.Module,
    method: str,
    budget: int,
    *,
    sensitivity: Sensitivity | None = None,
    seed: int = 0,
    rank: int = 8,
) -> tuple[nn.Module, MethodInfo]:
    """Make exactly `method`'s values trainable in `model` (in place; peft wraps modules in place too).

    Args:
        model: a timm model with its (random) head.
        method: one of `METHODS`.
        budget: trainable backbone values for the budgeted methods (peft-lora, random-sparse, spt-*, sparse-only).
        sensitivity: the measured scores, required by `SENSITIVITY_METHODS`.
        seed: seeds the random scores of random-sparse.
        rank: LoRA rank / adapter width of the SPT plans.

    Returns:
        The model to train and its `MethodInfo` (exact counts).
    """
    backbone_total = count_backbone_params(model)
    details: dict[str, Any] = {}
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "linear":
        _freeze_all_but_head(model)
    elif method == "bitfit":
        head = _freeze_all_but_head(model)
        for n, p in model.named_parameters():
            if n.endswith(".bias") and n not in head:
                p.requires_grad_(True)
    elif method == "peft-lora":
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora_target_modules(model)
        if not targets:
            raise SensituneError(f"peft-lora: {type(model).__name__} has no qkv/proj/fc1/fc2 Linear or 1x1 conv")
        per_rank = lora_cost_per_rank(model, targets)
        r = nearest_rank(budget, per_rank)
        # lora_alpha = r: scale 1, as SPT's LoRA (no alpha/r scaling); dropout 0 like every other method here
        cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets, bias="none")
        model = inject_adapter_in_model(cfg, model)
        head = _freeze_all_but_head(model)
        for n, p in model.named_parameters():
            if "lora_" in n and n not in head:
                p.requires_grad_(True)
        details = {"rank": r, "targets": len(targets), "per_rank": per_rank}
    elif method in PLAN_METHODS:
        if method == "random-sparse":
            sens = random_sensitivity(model, seed)
        elif sensitivity is None:
            raise SensituneError(f"method {method!r} needs a measured sensitivity; run the sensitivity job first")
        else:
            sens = sensitivity
        plan = allocate(sens, budget, **{**SPT_RULE, "structured": PLAN_METHODS[method], "rank": rank,
                                         "allocation": ALLOCATION.get(method, "global"),
                                         **GAP_METHODS.get(method, {})})  # fmt: skip
        apply_plan(model, plan)
        details = {"by_kind": {k: v["params"] for k, v in plan.by_kind().items()}, "plan_hash": plan.hash()}
    else:
        raise SensituneError(f"unknown method {method!r}: use one of {', '.join((*METHODS, *GAP_METHODS))}")
    bb, hd = count_trainable(model)
    return model, MethodInfo(method, bb, hd, backbone_total, details)
