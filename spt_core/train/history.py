"""What a training run measured: one `EpochRecord` per epoch and the run's `History` (metrics.json's numbers,
also the resumable part of a checkpoint)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EpochRecord:
    """One epoch: lr of its last step, mean train loss, validation accuracy/loss/score, wall seconds (incl. val)."""

    epoch: int  # 1-based
    lr: float
    train_loss: float
    val_acc: float
    val_loss: float
    seconds: float
    val_score: float | None = None  # cfg.select's value on validation (None in pre-select checkpoints)


@dataclass
class History:
    """What a run measured; ``to_dict()`` is metrics.json. ``test_*`` are for ``best_epoch``'s weights only."""

    epochs: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; 0 before the first epoch
    best_val_acc: float = -1.0  # validation accuracy of best_epoch
    best_val_score: float = -math.inf  # cfg.select's value of best_epoch
    best_val_loss: float = math.inf  # validation loss of best_epoch (breaks ties of best_val_score)
    select: str = "accuracy"
    test_acc: float | None = None
    test_loss: float | None = None
    test_metrics: dict[str, Any] | None = None  # full evaluate() output (confusion, per-class recall)
    train_seconds: float = 0.0  # sum over epochs, across resumptions
    peak_memory_mb: float = 0.0
    peak_memory_kind: str = ""  # "cuda_max_allocated" or "cpu_max_rss_process" (whole process, not just fit)
    trainable_params: int = 0
    device: str = ""
    resumed_at_epoch: int = 0  # epochs already done when this process resumed (0: fresh run)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> History:
        d = dict(d)
        d["epochs"] = [EpochRecord(**e) for e in d.get("epochs", [])]
        return cls(**d)
