"""LoRA as a weight-space delta, for Linear and Conv kernels, on all rows or one row segment (q/k/v of qkv).

    W'[rows] = W[rows] + scale · (B @ A).reshape(rows, *W.shape[1:])
    A ∈ R^{r × fan_in}  Kaiming-uniform (fan_in = in_features, or in_channels·kh·kw for a conv)
    B ∈ R^{rows × r}    zero: the tuned model starts as the pretrained one.
    scale = 1 by default (the official SPT code uses no α/r scaling).
Hyper-parameters (`LoRAConfig`, read from the plan): ``rank`` r and ``lora_scale``.
Trainable count: r · (fan_in + rows). Working in weight space makes one code path serve Linear, any Conv
(incl. timm's same-padding convs) and fused segments, and merging is exact: the delta is simply added.
Grouped/depthwise convs get no LoRA (allocation trains them sparse or whole instead): their kernels are tiny
and a rank-r factor of a (C × 9) kernel is nearly full rank. No dropout on the LoRA input (it does not exist
in weight space); the reference recipe's drop-path on the block still regularises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..portable.errors import PlanError
from .registry import TunerKind, register_tuner

if TYPE_CHECKING:
    from ..candidates import Candidate
    from ..plan import Plan, Target


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA's hyper-parameters: the rank r of B @ A, and the scale its delta is multiplied by."""

    rank: int
    lora_scale: float = 1.0  # SPT's: no α/r scaling

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise PlanError(f"LoRA rank={self.rank}: need rank >= 1 (plan.rank)")


class LoRADelta(nn.Module):
    """Low-rank delta B @ A on output rows [rows[0], rows[1]) of a weight of `shape`."""

    def __init__(self, shape: tuple[int, ...], rank: int, rows: tuple[int, int] | None = None, scale: float = 1.0):
        super().__init__()
        self.shape = tuple(shape)
        self.rows = tuple(rows) if rows else (0, shape[0])
        fan_in = math.prod(shape[1:])
        n_rows = self.rows[1] - self.rows[0]
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(n_rows, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises weights

    def _block(self, dtype: torch.dtype) -> torch.Tensor:
        # (rows, r) @ (r, fan_in) -> (rows, *W.shape[1:])
        d = (self.lora_B @ self.lora_A) * self.scale
        return d.to(dtype).view(self.rows[1] - self.rows[0], *self.shape[1:])

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        block = self._block(w.dtype)
        if self.rows == (0, self.shape[0]):
            return w + block
        return w.index_add(0, torch.arange(*self.rows, device=w.device), block)

    def dense(self) -> torch.Tensor:
        return self.add_to(torch.zeros(self.shape, dtype=self.lora_A.dtype, device=self.lora_A.device))


def _cost(c: Candidate, rows: int, config: LoRAConfig) -> int:
    return config.rank * (c.fan_in + rows)  # A (r × fan_in) + B (rows × r)


def _build(
    target: Target, param: nn.Parameter, host: nn.Module, plan: Plan, *, config: LoRAConfig, **_: Any
) -> LoRADelta:
    return LoRADelta(param.shape, config.rank, target.rows, scale=config.lora_scale)


register_tuner(TunerKind("lora", LoRADelta, cost=_cost, mergeable=True, build=_build, config=LoRAConfig))
