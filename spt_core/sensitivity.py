"""Measure every candidate's task sensitivity: s = Σ over mini-batches of (∂ mean-CE / ∂w)².

`measure_task` is the whole measurement a run makes (head, then a fixed shuffle of the training set);
`measure_sensitivity` is the Σg² pass itself over any loader.

First-order Taylor: the loss drop when w alone takes a gradient step of size ε·g is ε·g², so s ∝ g² (SPT §3.1).
One forward + one backward per batch, no optimizer step. Squared gradients are folded into fp32 accumulators by
a post-accumulate-grad hook, so at most one parameter's `.grad` exists at a time beyond the accumulators.

``amp=True`` runs the forward under bf16 autocast on CUDA (activations saved for backward in bf16: less peak
memory); the weights, their gradients and the Σg² accumulators stay fp32. On CPU the pass is always fp32, so the
option changes nothing there (as ``train.amp``). Under torchrun each rank measures its share of the batches and
the sums are added over ranks (`spt_core.distributed`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from . import __version__
from .candidates import Candidate, block_index, count_backbone_params, find_candidates
from .data.loaders import BalancedSampler, SeededSampler
from .distributed import all_reduce_sum, broadcast_module, shard_batches, world
from .portable.errors import PlanError, SensituneError
from .portable.io import atomic_path
from .probe import fit_probe

HEADS = ("random", "probe")


@dataclass
class Sensitivity:
    """Per-candidate sensitivity scores (fp32, the parameter's shape) plus the candidates' metadata."""

    scores: dict[str, torch.Tensor]
    candidates: dict[str, Candidate]
    meta: dict[str, Any] = field(default_factory=dict)

    def total(self) -> int:
        return sum(c.numel for c in self.candidates.values())

    def save(self, path: str | Path) -> None:
        meta = {
            "candidates": json.dumps([c.to_dict() for c in self.candidates.values()]),
            "meta": json.dumps(self.meta),
        }
        tensors = {n: s.contiguous() for n, s in self.scores.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: sensitivity file not found; run `sensitune measure` first")
        try:
            scores = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                md = f.metadata() or {}
            cands = [Candidate.from_dict(d) for d in json.loads(md["candidates"])]
            meta = json.loads(md.get("meta", "{}"))
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
            raise PlanError(f"{path}: not a sensitune sensitivity file ({type(e).__name__}); re-run measure") from e
        candidates = {c.name: c for c in cands}
        if set(candidates) != set(scores):
            raise PlanError(f"{path}: scores and candidate list disagree; the file is damaged, re-run measure")
        check_scores_finite(scores, str(path))
        return cls(scores=scores, candidates=candidates, meta=meta)


def check_scores_finite(scores: dict[str, torch.Tensor], source: str) -> None:
    """Raise `PlanError` naming the first parameter whose score has a NaN or an infinity: allocate would rank it
    "most sensitive" and train it whole."""
    for name, s in scores.items():
        finite = torch.isfinite(s)
        if not bool(finite.all()):
            raise PlanError(
                f"{source}: sensitivity of {name!r} has {int((~finite).sum())} non-finite value(s) (NaN/inf); "
                "check the backbone weights file and the data, then re-run measure"
            )


def _loss(model: nn.Module, batch: Any, device: torch.device, amp_dtype: torch.dtype | None) -> torch.Tensor:
    x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x)  # (B, C)
    return F.cross_entropy(logits.float(), y)  # mean over the batch, as in SPT


def amp_dtype_for(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 when `amp` on a CUDA device that supports it; None (fp32) otherwise, the CPU included."""
    if amp and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def measure_sensitivity(
    model: nn.Module,
    loader: Iterable,
    batches: int,
    *,
    device: str | torch.device | None = None,
    train_mode: bool = True,
    freeze_bn_stats: bool = True,
    include_stem: bool = False,
    candidates: dict[str, Candidate] | None = None,
    amp: bool = False,
) -> Sensitivity:
    """Σ_b g_b² for every candidate over `batches` mini-batches of `loader` (yielding (images, labels)).

    The model is left exactly as it was: weights (no step is taken), BatchNorm running statistics (restored),
    `requires_grad` flags, existing `.grad` tensors and train/eval modes.

    Args:
        model: a timm model; its current head is used (random, as in SPT, or fitted by a linear probe first).
        loader: mini-batches of (images, labels); SPT uses 16 batches × 32 images in file order.
        batches: number of mini-batches (SPT: 16; the product: sensitivity.batches); fewer if the loader is shorter.
        device: where to compute (default: where the model is).
        train_mode: dropout/drop-path active, as SPT measures.
        freeze_bn_stats: keep BatchNorm in eval mode (running statistics), matching how sensitune trains.
        include_stem: measure the stem too (see `find_candidates`).
        candidates: precomputed candidates (default: `find_candidates(model)`).
        amp: bf16 autocast forward on CUDA (fp32 gradients and accumulators); no effect on CPU.
    """
    if batches < 1:
        raise PlanError(f"batches={batches}: measure at least one batch (SPT uses 16)")
    cands = candidates if candidates is not None else find_candidates(model, include_stem=include_stem)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp_dtype = amp_dtype_for(device, amp)
    params = dict(model.named_parameters())
    was_training = {m: m.training for m in model.modules()}
    requires = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    scores = {n: torch.zeros(c.shape, dtype=torch.float32, device=device) for n, c in cands.items()}
    handles = []

    def make_hook(name: str):
        def hook(p: torch.Tensor) -> None:
            scores[name].add_(p.grad.detach().float().square())
            p.grad = None  # free it now: only the fp32 accumulators stay alive

        return hook

    n_batches, n_images, t0 = 0, 0, time.perf_counter()
    try:
        for n, p in params.items():
            p.requires_grad_(n in cands)
            p.grad = None
        for n in cands:
            handles.append(params[n].register_post_accumulate_grad_hook(make_hook(n)))
        model.train(train_mode)
        if freeze_bn_stats:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        for batch in loader:
            if n_batches == batches:
                break
            _loss(model, batch, device, amp_dtype).backward()
            n_batches += 1
            n_images += len(batch[1])
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        for n, p in params.items():
            p.requires_grad_(requires[n])
            p.grad = grads[n]
        for m, t in was_training.items():
            m.training = t
    if n_batches == 0:
        raise PlanError("the sensitivity loader yielded no batch; check the training split is not empty")
    check_scores_finite(scores, "measure")
    meta = {
        "batches": n_batches,
        "images": n_images,
        "seconds": round(time.perf_counter() - t0, 3),
        "train_mode": train_mode,
        "freeze_bn_stats": freeze_bn_stats,
        "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else None,
        "backbone_params": count_backbone_params(model),
        "model_class": type(model).__name__,
        "block_names": block_index(model)[1],
        "sensitune_version": __version__,
    }
    return Sensitivity(scores={n: s.cpu() for n, s in scores.items()}, candidates=cands, meta=meta)


def measure_task(
    model: nn.Module,
    train_dataset: Dataset,
    loaders: Mapping[str, Iterable],
    *,
    head: str,
    probe_epochs: int,
    batches: int,
    batch_size: int,
    seed: int,
    device: str | torch.device,
    amp: bool = False,
    include_stem: bool = False,
) -> Sensitivity:
    """The sensitivity of `model` on a task: fit the head first (``head="probe"``), then measure Σg².

    A random head makes the gradients arbitrary (GPS's critique of SPT), so ``"probe"`` first fits
    `model.get_classifier()` in place by a linear probe on cached features; ``"random"`` keeps the head as is (SPT).
    Σg² is then measured on `batches` class-balanced batches of `train_dataset` (`BalancedSampler`: the classes take
    turns, so a good class at 90 % of a line's images does not dominate the gradients; on balanced data it is a
    seeded permutation); a dataset without ``.labels`` gets a seeded shuffle.

    Args:
        model: a timm model, already on `device`.
        train_dataset: the training images, (image, label) items.
        loaders: "train", "val" and optionally "test" loaders for the probe (unused for ``head="random"``).
        head: "probe" or "random".
        probe_epochs: epochs of the linear probe (its epoch picked on validation accuracy).
        batches, batch_size: how much of the shuffled training set the measurement sees (SPT: 16 x 32).
        seed: seed of the probe and of the shuffle.
        device: where to compute.
        amp: bf16 autocast forward on CUDA (see `measure_sensitivity`).
        include_stem: measure the stem too (`find_candidates`).

    Under torchrun, rank r measures batches r, r + N, ... of the same shuffle and the sums are added over ranks:
    the result equals one process over the same `batches` batches (up to fp32 summation order).

    Returns:
        The Sensitivity; ``meta["head"]`` records the head, and the probe's results (``probe_*``) when fitted.

    Raises:
        SensituneError: an unknown `head`.
    """
    if head not in HEADS:
        raise SensituneError(f"sensitivity head={head!r}: use 'random' (SPT) or 'probe'")
    probe = {}
    if head == "probe":
        probe = fit_probe(model, loaders, epochs=probe_epochs, seed=seed, device=device, select="accuracy").to_dict()
        broadcast_module(model.get_classifier())  # every rank measures rank 0's head
    labels = getattr(train_dataset, "labels", None)  # class-balanced batches (a good class at 90 % must not dominate)
    w = world()
    sampler = BalancedSampler(labels, seed) if labels is not None else SeededSampler(len(train_dataset), seed)
    if not w.active:
        loader = DataLoader(train_dataset, batch_size=batch_size, sampler=sampler)
        sens = measure_sensitivity(model, loader, batches=batches, device=device, amp=amp, include_stem=include_stem)
    else:
        mine = shard_batches(sampler, batch_size, w, limit=batches)
        if len(mine) == 0:
            raise PlanError(f"sensitivity.batches={batches} < {w.size} processes: measure at least one batch per rank")
        sens = measure_sensitivity(model, DataLoader(train_dataset, batch_sampler=mine), batches=len(mine),
                                   device=device, amp=amp, include_stem=include_stem)  # fmt: skip
        all_reduce_sum(list(sens.scores.values()))
        counts = torch.tensor([sens.meta["batches"], sens.meta["images"]], dtype=torch.int64)
        all_reduce_sum([counts])
        sens.meta.update({"batches": int(counts[0]), "images": int(counts[1]), "processes": w.size})
    sens.meta.update({"head": head, **probe})
    return sens
