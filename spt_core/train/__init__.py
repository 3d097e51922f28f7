"""Training: `config` (TrainConfig), `loop` (fit -> History), `history` (its records), `resume` (the checkpoint)."""

from spt_core.train.config import RESUME_FREE, SPT_RECIPE, TrainConfig
from spt_core.train.loop import (
    EpochRecord,
    History,
    fit,
    lr_at,
    make_optimizer,
    set_trainable_head,
    trainable_parameters,
    validate,
)
from spt_core.train.resume import CHECKPOINT_NAME

__all__ = [
    "CHECKPOINT_NAME",
    "RESUME_FREE",
    "SPT_RECIPE",
    "EpochRecord",
    "History",
    "TrainConfig",
    "fit",
    "lr_at",
    "make_optimizer",
    "set_trainable_head",
    "trainable_parameters",
    "validate",
]
