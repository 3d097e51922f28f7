"""Sparse and whole deltas: trainable values added to a frozen parameter.

SparseDelta:  W' = W + scatter(idx, v)      v ∈ R^nnz, zero-initialised; idx fixed flat indices.
              Trainable count: nnz. Memory: v, its grad and its optimizer state (nnz each) + idx (int64).
WholeDelta:   W' = W + D                    D has W's shape, zero-initialised (vectors, depthwise kernels).
              Trainable count: numel(W).
Neither is a `structured` choice: allocation places them by entry count. Both are mergeable (additive), and
neither has a hyper-parameter (config `NoConfig`).
Neither keeps a copy of W alive: the effective weight is rebuilt on the fly (see `host.py`), and the frozen W
never gets a `.grad`. The gradient of v is the dense gradient of W' gathered at idx (exactly the masked
dense gradient).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..portable.errors import PlanError
from .registry import TunerKind, register_tuner

if TYPE_CHECKING:
    from ..plan import Plan, Target


class SparseDelta(nn.Module):
    """Trainable values at fixed flat indices of a frozen parameter."""

    def __init__(self, shape: tuple[int, ...], indices: torch.Tensor) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("indices", indices.to(torch.int64).clone(), persistent=False)
        self.values = nn.Parameter(torch.zeros(indices.numel()))

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        """w + scatter(indices, values), out of place; autograd saves only the indices."""
        return w.reshape(-1).index_add(0, self.indices, self.values.to(w.dtype)).view(w.shape)

    def dense(self) -> torch.Tensor:
        return self.add_to(torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device))


class WholeDelta(nn.Module):
    """A dense zero-initialised delta over a whole (small) parameter."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.delta = nn.Parameter(torch.zeros(shape))

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta.to(w.dtype)

    def dense(self) -> torch.Tensor:
        return self.delta


def _build_sparse(target: Target, param: nn.Parameter, host: nn.Module, plan: Plan, **_: Any) -> SparseDelta:
    if target.param not in plan.indices:
        raise PlanError(f"plan has no indices for sparse target {target.param!r}; the plan files are incomplete")
    return SparseDelta(param.shape, plan.indices[target.param])


def _build_whole(target: Target, param: nn.Parameter, host: nn.Module, plan: Plan, **_: Any) -> WholeDelta:
    return WholeDelta(param.shape)


register_tuner(TunerKind("sparse", SparseDelta, cost=None, mergeable=True, build=_build_sparse))
register_tuner(TunerKind("whole", WholeDelta, cost=None, mergeable=True, build=_build_whole))
