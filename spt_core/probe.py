"""A linear probe on cached features: the head-only baseline, and the head fitted before measuring sensitivity.

The frozen backbone is run ONCE per split (timm's `forward_features` + `forward_head(pre_logits=True)`, so
whatever sits between the pooled features and the classifier — norms, pooling — is part of the features), then
`model.get_classifier()` is trained on the cached (N, D) features with AdamW and a cosine schedule; the epoch
is selected on validation accuracy. Mathematically the same as training the head inside the model with the
backbone frozen and BatchNorm statistics fixed, at the cost of a single forward pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .plan import Plan
from .portable.errors import SensituneError
from .portable.operating_point import selection_score


@dataclass
class ProbeResult:
    best_epoch: int
    val_acc: float
    test_acc: float | None
    seconds: float
    select: str = "accuracy"
    val_score: float | None = None  # `select`'s value on validation (the yardstick of the below-probe warning)
    test_balanced_acc: float | None = None

    def to_dict(self) -> dict:
        return {
            "probe_best_epoch": self.best_epoch,
            "probe_val_acc": self.val_acc,
            "probe_test_acc": self.test_acc,
            "probe_seconds": round(self.seconds, 2),
            "probe_select": self.select,
            "probe_val_score": self.val_score,
            "probe_test_balanced_acc": self.test_balanced_acc,
        }


@torch.inference_mode()
def extract_features(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features (N, D) and labels (N,) of every batch in `loader`, model in eval mode."""
    was = model.training
    model.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            x, y = batch[0].to(device), batch[1]
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was)
    return torch.cat(feats), torch.cat(labels)


def _accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


def _score(
    head: nn.Module, x: torch.Tensor, y: torch.Tensor, select: str, ok_index: int | None, ceiling: float
) -> float:
    with torch.no_grad():
        return selection_score(y.numpy(), head(x).softmax(1).numpy(), select, ok_index, ceiling)


def fit_probe(
    model: nn.Module,
    loaders: Mapping[str, Iterable],
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    select: str,
    ok_index: int | None = None,
    max_escape_rate: float = 0.005,
) -> ProbeResult:
    """Fit `model.get_classifier()` in place on cached features; returns validation/test accuracy.

    Args:
        model: a timm model; only its classifier changes.
        loaders: "train", "val" and optionally "test" loaders of (images, labels).
        epochs, lr, weight_decay, batch_size, seed: the probe's recipe (AdamW, cosine decay).
        device: where the backbone extracts features (default: where the model is); the probe trains on CPU.
        select, ok_index, max_escape_rate: the validation metric that picks the epoch (`train.select`). `select`
            is required: the pipeline's baseline picks by ``train.select``, the sensitivity head by accuracy.
    """
    if epochs < 1 or batch_size < 1:
        raise SensituneError(f"probe epochs={epochs}, batch_size={batch_size}: both must be >= 1")
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise SensituneError(
            f"linear probe needs a Linear classifier, {type(model).__name__} has {type(head).__name__}"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    t0 = time.perf_counter()
    feats = {k: extract_features(model, v, device) for k, v in loaders.items() if v is not None}
    xtr, ytr = feats["train"]
    xva, yva = feats["val"]
    probe = nn.Linear(head.in_features, head.out_features)
    probe.load_state_dict({k: v.detach().cpu().float() for k, v in head.state_dict().items()})
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(xtr) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    best = (-math.inf, 0, {k: v.clone() for k, v in probe.state_dict().items()})
    for epoch in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(probe(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        score = _score(probe, xva, yva, select, ok_index, max_escape_rate)
        if score > best[0]:  # first best epoch wins ties
            best = (score, epoch, {k: v.clone() for k, v in probe.state_dict().items()})
    probe.load_state_dict(best[2])
    test_acc = _accuracy(probe, *feats["test"]) if "test" in feats else None
    test_bal = _score(probe, *feats["test"], "balanced_accuracy", None, 0.0) if "test" in feats else None
    with torch.no_grad():
        for k, v in probe.state_dict().items():
            getattr(head, k).copy_(v.to(getattr(head, k)))
    return ProbeResult(best_epoch=best[1] + 1, val_acc=_accuracy(probe, xva, yva), test_acc=test_acc,
                       seconds=time.perf_counter() - t0, select=select, val_score=best[0],
                       test_balanced_acc=test_bal)  # fmt: skip


def head_only(plan: Plan) -> Plan:
    """The linear probe's plan: `plan`'s model and tuner settings with no backbone value to train (no targets).

    Saved with the probe's head (`save_tuned`) it is a tuned-weights directory like any other, so merge (folding no
    tuner is the identity), export and publish carry the probe unchanged: the pretrained backbone + the probe's head.
    A budget ladder's record (``meta["ladder"]``) stays with the plan that was trained, not with the probe.
    """
    meta = {k: v for k, v in plan.meta.items() if k != "ladder"}
    return replace(plan, targets=[], indices={}, budget=0, meta={**meta, "head_only": True})
