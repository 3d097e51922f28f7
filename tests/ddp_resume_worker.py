"""A training run killed after an epoch and resumed, one process or one rank of a torchrun (tests/test_distributed.py).

    python -m torch.distributed.run --nproc-per-node 2 ... tests/ddp_resume_worker.py OUT   [KILL_AFTER_EPOCH=k]

`fit` on a tiny timm CNN (frozen BN statistics, no dropout) with a seeded shuffle and a global batch of 8; rank 0
dies like a SIGKILL right after epoch k's checkpoint (``os._exit``, no cleanup), and torchrun then stops the other
rank. Rank 0 leaves OUT/history.json and OUT/trained.pt (the trainable tensors) when it finishes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from spt_core.data.loaders import SeededSampler
from spt_core.distributed import close, init_from_env, world
from spt_core.train import TrainConfig, fit

TRAINABLE = ("classifier.", "blocks.4.0.conv_pwl.")


def run(out_dir: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(TRAINABLE))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 3, (48,), generator=g)
    loaders = {
        "train": DataLoader(TensorDataset(x[:32], y[:32]), batch_size=8, sampler=SeededSampler(32, seed=1)),
        "val": DataLoader(TensorDataset(x[32:40], y[32:40]), batch_size=8),
        "test": DataLoader(TensorDataset(x[40:], y[40:]), batch_size=8),
    }
    cfg = TrainConfig.scaled(3, warmup_epochs=1, lr=1e-2, progress=False, device="cpu", amp=False)
    kill_after = int(os.environ.get("KILL_AFTER_EPOCH", "0"))

    def on_epoch(rec: dict) -> None:  # rank 0 only, after the epoch's checkpoint is on disk
        if rec["epoch"] == kill_after:
            os._exit(1)

    hist = fit(model, loaders, cfg, out_dir, on_epoch=on_epoch)
    return hist, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    init_from_env("cpu")
    hist, trained = run(out)
    if world().main:
        (out / "history.json").write_text(json.dumps(hist.to_dict()))
        torch.save(trained, out / "trained.pt")
    close()
