"""sensitune <-> peft: a plan handed to peft as a SHiRA adapter, and any peft adapter merged into a plain timm model.

Out (`shira_plan`, `to_peft`). peft's SHiRA tuner trains, on each targeted ``nn.Linear``, the entries of a fixed
binary mask as a sparse delta:

    W' = W + scatter(mask, w)      w ∈ R^nnz, zero-initialised, scaling 1 while training

which is sensitune's sparse delta (`spt_core.tuners.sparse`) exactly. SHiRA's indices are ``torch.where(mask)``,
row-major, i.e. the plan's sorted flat indices: SHiRA's vector ``w`` and sensitune's ``values`` line up entry by
entry, and so does every per-entry optimizer state. SHiRA fixes one count, though: r·(in + out) entries on every
targeted Linear, one r for all of them. So only a plan of that shape maps one to one; `shira_plan` allocates one
from the sensitivity scores (every Linear weight candidate gets its r·(in + out) entries by the per-row rule of
`allocate`: each output row its top-k, k = ⌊r·(in + out) / out⌋, the rest to the best entries of rank k), and
`to_peft` refuses any plan part SHiRA cannot express, naming it: entries of vectors (norms, biases), conv kernels
or the patch embedding (SHiRA adapts nn.Linear only), whole/lora/adapter targets (other peft methods), and a Linear
target whose count is not r·(in + out). sensitune trains the head beside the plan; peft's ``modules_to_save`` does
the same, so the config names the head there.

Two alignments make peft's training equal sensitune's (tests/test_peft_bridge.py): the SHiRA vectors are 1-D and
sensitune's AdamW never decays 1-D tensors (`spt_core.train.loop.make_optimizer`), so give them weight_decay 0;
and hand ``get_peft_model`` the very model given to `to_peft` (the mask function finds each layer by identity).

In (`load_peft`, `merge_peft`). A peft adapter (a `PeftModel`, or a directory written by ``save_pretrained``; LoRA,
SHiRA or any method peft can merge) is folded by peft's own ``merge_and_unload`` into the plain timm model under it,
ready for `deploy.compile.export`. The record says where the weights came from (peft type, targets, the adapter's
digest). peft is imported only when one of these functions runs: importing it costs seconds.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .allocate import per_row_indices, plan_of
from .plan import Plan, Target
from .portable.errors import ModelError, PlanError
from .sensitivity import Sensitivity

if TYPE_CHECKING:
    from peft import PeftModel, ShiraConfig

MASK_TYPE = "sensitune"  # ShiraConfig.mask_type of an exported plan; peft reads the indices back from the adapter
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class PeftExport:
    """A plan as peft sees it: ``get_peft_model(model, export.config)`` trains exactly the plan's entries.

    Attributes:
        config: the SHiRA config (targets, r, ``modules_to_save`` = the head), ``config.mask_fn`` set.
        mask_fn: SHiRA's mask function: (base_layer, r) -> the plan's 0/1 mask of that layer.
        entries: trained entries per targeted module, e.g. ``{"blocks.0.attn.qkv": 1024}``.
        plan_hash: the plan's hash, to record beside the peft run.
    """

    config: ShiraConfig
    mask_fn: Callable[..., torch.Tensor]
    entries: dict[str, int]
    plan_hash: str

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": "SHIRA", "r": self.config.r, "mask_type": MASK_TYPE, "entries": self.entries,
                "modules_to_save": sorted(self.config.modules_to_save or []), "plan_hash": self.plan_hash}  # fmt: skip


def _shira_count(shape: tuple[int, ...], r: int) -> int:
    out_features, in_features = shape
    return r * (in_features + out_features)


def shira_plan(sensitivity: Sensitivity, r: int) -> Plan:
    """The plan SHiRA can express, from sensitivity: r·(in + out) entries of every Linear weight candidate.

    Within a matrix the entries follow `allocate`'s per-row rule (each output row its k most sensitive entries,
    one k, the rest to the best-scored entries of rank k); SHiRA's fixed count decides how many per matrix.

    Raises:
        PlanError: r < 1, no Linear candidate, or r so large that a matrix would be trained whole.
    """
    cands = [c for c in sensitivity.candidates.values() if c.kind == "linear"]
    if r < 1 or not cands:
        raise PlanError(f"shira_plan(r={r}) on {len(cands)} Linear candidates: need r >= 1 and a model with Linears")
    too_big = [c for c in cands if _shira_count(c.shape, r) >= c.numel]
    if too_big:
        c = too_big[0]
        raise PlanError(f"shira_plan(r={r}) gives {c.name} {_shira_count(c.shape, r):,} entries of its {c.numel:,}: "
                        "lower r")  # fmt: skip
    indices: dict[str, torch.Tensor] = {}
    for c in cands:
        indices.update(per_row_indices([c], sensitivity, _shira_count(c.shape, r)))
    targets = [Target(c.name, "sparse", len(indices[c.name]), c.kind, c.shape, c.block) for c in cands]
    count = sum(t.count for t in targets)
    meta = {"allocation": "shira", "shira_r": r, "candidates": len(cands), "candidate_values": sensitivity.total()}
    return plan_of(sensitivity, targets, indices, count, ("none", {}, 1.0, 1.0), meta)


def _unmappable(plan: Plan, modules: dict[str, nn.Module]) -> tuple[list[str], dict[str, int]]:
    """The plan's targets SHiRA cannot express (each with why), and the SHiRA r each Linear target implies."""
    problems, r_of = [], {}
    for t in plan.targets:
        host_name, _, attr = t.param.rpartition(".")
        host = modules.get(host_name)
        if host is None:
            problems.append(f"{t.param} (no such module in {type(modules['']).__name__}: another backbone's plan?)")
        elif t.kind != "sparse":
            problems.append(f"{t.param} ({t.kind}: not a SHiRA mask)")
        elif not isinstance(host, nn.Linear) or attr != "weight":
            what = "a bias" if attr == "bias" else "a vector" if len(t.shape) == 1 else type(host).__name__
            problems.append(f"{t.param} ({what}: SHiRA adapts nn.Linear weights only)")
        elif t.count % sum(t.shape) or t.rows is not None:
            problems.append(f"{t.param} ({t.count} entries, not r·(in + out) = r·{sum(t.shape)})")
        else:
            r_of[host_name] = t.count // sum(t.shape)
    if len(set(r_of.values())) > 1:
        problems.append(f"Linear targets with different r {sorted(set(r_of.values()))} (SHiRA has one r)")
    return problems, r_of


def to_peft(plan: Plan, model: nn.Module) -> PeftExport:
    """Export `plan` as a peft SHiRA config whose mask function returns the plan's entries of each Linear.

    Args:
        plan: a plan of SHiRA's shape (`shira_plan`): sparse entries of Linear weights, r·(in + out) each.
        model: the model peft will wrap; pass this object to ``get_peft_model``.

    Raises:
        PlanError: the plan has parts SHiRA cannot express (each named, the first three in the message).
    """
    from peft import ShiraConfig

    modules = dict(model.named_modules())
    problems, r_of = _unmappable(plan, modules)
    if problems or not r_of:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise PlanError(f"plan {plan.hash()} has {len(problems)} target(s) SHiRA cannot express: {shown or 'none'}; "
                        "build the plan with shira_plan(sensitivity, r) (docs/peft.md)")  # fmt: skip
    names = {id(modules[n]): n for n in r_of}
    masks = {f"{n}.weight": plan.indices[f"{n}.weight"] for n in r_of}

    def mask_fn(base_layer: nn.Module, r: int, **_: Any) -> torch.Tensor:
        name = names.get(id(base_layer))
        if name is None:
            raise PlanError(f"SHiRA mask asked for a {type(base_layer).__name__} outside plan {plan.hash()}: call "
                            "get_peft_model on the model given to to_peft, with the config it returned")  # fmt: skip
        w = base_layer.weight
        mask = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
        mask[masks[f"{name}.weight"].to(w.device)] = 1
        return mask.view(w.shape)

    head = _head_modules(model)
    with warnings.catch_warnings():  # peft warns that mask_type is unknown until mask_fn is set, just below
        warnings.simplefilter("ignore", UserWarning)
        config = ShiraConfig(r=next(iter(r_of.values())), mask_type=MASK_TYPE, target_modules=sorted(r_of),
                             modules_to_save=head)  # fmt: skip
    config.mask_fn = mask_fn
    return PeftExport(config, mask_fn, {n: r * sum(modules[n].weight.shape) for n, r in r_of.items()}, plan.hash())


def _head_modules(model: nn.Module) -> list[str]:
    """The module name(s) of timm's classifier (``get_classifier``), also when peft has wrapped it."""
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    return [n for n, m in model.named_modules() if m is head and n] if isinstance(head, nn.Module) else []


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_peft(model: nn.Module, adapter: str | Path) -> PeftModel:
    """The adapter directory `adapter` (``save_pretrained``'s) on `model`, for inference; one-line errors."""
    from peft import PeftModel

    path = Path(adapter)
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise ModelError(f"{path}: not a peft adapter directory (no {', '.join(missing)}); pass the folder that "
                         "peft's save_pretrained wrote")  # fmt: skip
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: the adapter does not fit {type(model).__name__} ({first}); build the base model "
                         "the adapter was trained on (model.name, model.weights, num_classes)") from e  # fmt: skip


def merge_peft(peft_model: PeftModel, *, adapter: str | Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Fold `peft_model`'s active adapter into its base with peft's ``merge_and_unload``: a plain timm model.

    The head must be trained by the adapter (``modules_to_save`` or a target), else the merged model would keep
    the base's untrained head.

    Args:
        peft_model: the peft model (trained here, or from `load_peft`).
        adapter: the directory it was loaded from, recorded with its files' digest.

    Returns:
        The merged model (eval mode, nothing trainable) and the record of where its weights came from:
        ``{"from": "peft", "peft_type", "target_modules", "modules_to_save", "adapter", "digest"}``.

    Raises:
        ModelError: the adapter leaves the head untrained.
    """
    from peft import get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    config = peft_model.peft_config[peft_model.active_adapter]
    base = peft_model.get_base_model()
    modules = dict(base.named_modules())  # a trained head is wrapped: a copy to save, or a tuner layer
    untrained = [h for h in _head_modules(base) if not isinstance(modules[h], (ModulesToSaveWrapper, BaseTunerLayer))]
    if untrained:
        raise ModelError(f"the peft adapter leaves the head {untrained} untrained (its base head would ship): "
                         f"train with modules_to_save={untrained}")  # fmt: skip
    if adapter is not None:  # the files' bytes; an in-memory model: its adapter tensors
        h = hashlib.sha256()
        for f in ADAPTER_FILES:
            h.update((Path(adapter) / f).read_bytes())
        digest = h.hexdigest()[:16]
    else:
        digest = _digest(get_peft_model_state_dict(peft_model))
    record = {
        "from": "peft",
        "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
        "target_modules": sorted(config.target_modules) if isinstance(config.target_modules, set)
        else config.target_modules,
        "modules_to_save": sorted(config.modules_to_save or []),
        "adapter": str(adapter) if adapter is not None else None,
        "digest": digest,
    }  # fmt: skip
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval(), record
