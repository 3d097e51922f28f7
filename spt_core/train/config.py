"""TrainConfig: the training hyper-parameters as plain data, validated all at once.

Every field that params.yaml sets is required here: the application's config is the one place that gives them
values, so a library default can never silently disagree with it. ``TrainConfig.scaled`` builds the published
SPT VTAB-1k recipe (`SPT_RECIPE`) for a given number of epochs, for benchmarks and tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spt_core.portable.errors import SensituneError
from spt_core.portable.metrics import BALANCE, SELECT

# Config fields that may differ between a run and its resumption (they do not change the numbers).
RESUME_FREE = {"device", "progress", "log_every"}

# SPT reference recipe (VTAB-1k): AdamW lr 1e-3, weight decay 1e-4, 100 epochs with 10 linear warm-up epochs
# from 1e-6, cosine to 1e-5, batch 64, seed 0. A recipe to start from, not the application's defaults.
SPT_RECIPE: dict[str, Any] = {
    "epochs": 100,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "warmup_epochs": 10,
    "warmup_lr": 1e-6,
    "min_lr": 1e-5,
    "batch_size": 64,
    "label_smoothing": 0.0,
    "freeze_bn_stats": True,
    "amp": True,
    "device": "auto",
    "seed": 0,
    "grad_clip": None,
    "balance": "none",
    "select": "accuracy",
}


@dataclass(kw_only=True)
class TrainConfig:
    """Training hyper-parameters (plain data); keyword-only, and every field params.yaml sets is required.

    For a recipe with sensible values use ``TrainConfig.scaled(epochs, **overrides)``: the SPT recipe with
    warm-up at ~10 % of the epochs (the reference's 10 of 100).
    """

    epochs: int
    lr: float
    weight_decay: float  # AdamW; never applied to params with ndim <= 1 nor to model.no_weight_decay()
    warmup_epochs: int
    warmup_lr: float
    min_lr: float
    batch_size: int  # read by whoever builds the loaders (fit takes loaders); recorded with the run
    label_smoothing: float
    freeze_bn_stats: bool  # BatchNorm layers stay in eval mode: +2-8 pt for PEFT on CNNs here
    amp: bool  # CUDA only: bf16 autocast where supported, else fp16 + GradScaler; CPU always fp32
    device: str  # "auto" = cuda if available else cpu; see `spt_core.device.resolve_device`
    seed: int
    grad_clip: float | None  # max global grad norm over the trainable params; None = no clipping
    balance: str  # none | loss (class-weighted cross-entropy) | sampler (balanced batches, built by the loaders) | both
    # | auto (the loaders' sampler on an imbalanced split: spt_core.portable.metrics.resolve_balance; never the loss)
    select: str  # the validation metric that picks the epoch: accuracy | balanced_accuracy | overkill_at_escape | loss
    log_every: int = 0  # log the running train loss every N steps (0: one line per epoch)
    progress: bool | None = None  # tqdm bar; None = only on a tty and when SENSITUNE_NO_PROGRESS is unset

    def __post_init__(self) -> None:
        problems = [
            f"{k}={getattr(self, k)!r} must be {why}"
            for k, bad, why in [
                ("epochs", self.epochs < 1, ">= 1"),
                ("lr", not self.lr > 0, "> 0"),
                ("weight_decay", self.weight_decay < 0, ">= 0"),
                ("warmup_epochs", not 0 <= self.warmup_epochs <= self.epochs, "in [0, epochs], ~epochs/10"),
                ("min_lr", not 0 <= self.min_lr <= self.lr, "in [0, lr]"),
                ("warmup_lr", self.warmup_lr < 0, ">= 0"),
                ("batch_size", self.batch_size < 1, ">= 1"),
                ("label_smoothing", not 0 <= self.label_smoothing < 1, "in [0, 1)"),
                ("grad_clip", self.grad_clip is not None and not self.grad_clip > 0, "None or > 0"),
                ("log_every", self.log_every < 0, ">= 0"),
                ("balance", self.balance not in BALANCE, " | ".join(BALANCE)),
                ("select", self.select not in SELECT, " | ".join(SELECT)),
            ]
            if bad
        ]
        if problems:
            raise SensituneError("train config: " + "; ".join(problems))

    @classmethod
    def scaled(cls, epochs: int, **overrides: Any) -> TrainConfig:
        """`SPT_RECIPE` for ``epochs`` epochs, warm-up rounded to 10 % of them (5 -> 1, 20 -> 2, 100 -> 10)."""
        return cls(**{**SPT_RECIPE, "epochs": epochs, "warmup_epochs": (epochs + 5) // 10, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a dict (e.g. the ``train:`` block of params.yaml); unknown or missing keys are an error."""
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        unknown, missing = sorted(set(d) - known), sorted(required - set(d))
        problems = [f"unknown train config key(s) {unknown}"] if unknown else []
        problems += [f"missing train config key(s) {missing}"] if missing else []
        if problems:
            raise SensituneError("; ".join(problems) + f": valid keys are {sorted(known)}")
        return cls(**d)
