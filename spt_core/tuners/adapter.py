"""Bottleneck adapter on a module's output channels (SPT-Adapter), for Linear and Conv, all or a row segment.

    y[..., rows] = y[..., rows] + W_up · GELU(W_down · y[..., rows] + b_down) + b_up
    W_down ∈ R^{r × d} (Kaiming-uniform), W_up ∈ R^{d × r} and b_up zero: the identity at initialisation.
Hyper-parameter (`AdapterConfig`, read from the plan): the bottleneck width ``rank`` r.
Trainable count: 2·r·d + r + d with d = rows. Applied along the channel axis: the last axis for Linear outputs
(B, N, C), axis 1 for Conv outputs (B, C, H, W). Costs one (B, ..., r) activation per adapted module.
An adapter is nonlinear, so it cannot be folded into the weights: registered as not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..portable.errors import PlanError
from .registry import TunerKind, register_tuner

if TYPE_CHECKING:
    from ..candidates import Candidate
    from ..plan import Plan, Target


@dataclass(frozen=True)
class AdapterConfig:
    """The adapter's hyper-parameter: its bottleneck width r (``rank``, shared with LoRA's rank in a plan)."""

    rank: int

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise PlanError(f"adapter rank={self.rank}: need a bottleneck width >= 1 (plan.rank)")


class Adapter(nn.Module):
    """y -> y + up(GELU(down(y))) on output channels [rows[0], rows[1])."""

    def __init__(self, channels: int, rank: int, rows: tuple[int, int] | None = None, channel_dim: int = -1):
        super().__init__()
        self.rows = tuple(rows) if rows else (0, channels)
        d = self.rows[1] - self.rows[0]
        self.channels, self.channel_dim = channels, channel_dim
        self.down = nn.Linear(d, rank)
        self.up = nn.Linear(rank, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y_c = y.movedim(self.channel_dim, -1)  # (..., C)
        seg = y_c[..., self.rows[0] : self.rows[1]]
        out = self.up(F.gelu(self.down(seg)))  # (..., d)
        if self.rows != (0, self.channels):
            out = F.pad(out, (self.rows[0], self.channels - self.rows[1]))
        return (y_c + out).movedim(-1, self.channel_dim)


def _cost(c: Candidate, rows: int, config: AdapterConfig) -> int:
    return 2 * config.rank * rows + config.rank + rows  # Linear(d→r) + bias, Linear(r→d) + bias, d = rows


def _build(
    target: Target, param: nn.Parameter, host: nn.Module, plan: Plan, *, config: AdapterConfig, **_: Any
) -> Adapter:
    channel_dim = 1 if isinstance(host, nn.modules.conv._ConvNd) else -1  # (B, C, H, W) vs (B, N, C)
    return Adapter(param.shape[0], config.rank, target.rows, channel_dim)


register_tuner(TunerKind("adapter", Adapter, cost=_cost, mergeable=False, build=_build, config=AdapterConfig))
