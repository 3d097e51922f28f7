"""Tiny training set-ups for the spt_core.train tests (tests/test_train.py, tests/test_resume.py): random 32 px
tensors and test_efficientnet with a PEFT-like trainable split, so a fit takes seconds on a CPU."""

from __future__ import annotations

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

EFFNET_TRAINABLE = ("classifier.", "blocks.4.0.conv_pwl.", "blocks.4.0.bn3.")


def random_loaders(n_train: int = 32, n_eval: int = 16, *, batch: int = 8, seed: int = 0) -> dict[str, DataLoader]:
    """train / val / test loaders over random (3, 32, 32) images with 3 random labels; only train shuffles."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + 2 * n_eval
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)
    a, b = n_train, n_train + n_eval
    return {
        "train": DataLoader(TensorDataset(x[:a], y[:a]), batch_size=batch, shuffle=True),
        "val": DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=batch),
        "test": DataLoader(TensorDataset(x[b:], y[b:]), batch_size=batch),
    }


def tiny_effnet(**kw) -> nn.Module:
    """test_efficientnet (3 classes, seed 0) with only the head and the last block's projection trainable."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3, **kw)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(EFFNET_TRAINABLE))
    return model


def comparable(h: dict) -> dict:
    """History without wall-clock / process-dependent fields."""
    drop = {"train_seconds", "peak_memory_mb", "resumed_at_epoch"}
    out = {k: v for k, v in h.items() if k not in drop}
    out["epochs"] = [{k: v for k, v in e.items() if k != "seconds"} for e in h["epochs"]]
    return out
