"""A new tuner kind with its own hyper-parameter is one module, one config and one registration (spt_core.api).

The toy kind here, "blockshift", adds one trainable value per (output row, column block) of a matrix; its own
hyper-parameter `blocks` says how many contiguous column blocks each row is cut into:

    W'[i, j] = W[i, j] + v[i, block(j)]    v ∈ R^{rows × blocks}, zero-initialised; trainable count rows · blocks

It is additive in weight space, so it merges exactly. Nothing in spt_core names it: the test goes through the
front door the way a user would (plan, apply, train one step, merge).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from spt_core.api import (
    Plan,
    TrainConfig,
    TunerKind,
    allocate,
    apply_plan,
    fit,
    measure_sensitivity,
    merge,
    register_tuner,
    structured_choices,
)
from spt_core.portable.errors import PlanError
from spt_core.tuners import TUNERS, tuned_modules

OPTIONS = {"rank": 8, "alpha": 10.0, "beta": 5.0, "allocation": "global"}  # SPT's α/β rule; rank is LoRA's, unused


@dataclass(frozen=True)
class BlockShiftConfig:
    blocks: int  # column blocks per row: the kind's own hyper-parameter (no default: a plan must give it)

    def __post_init__(self) -> None:
        if self.blocks < 1:
            raise PlanError(f"blockshift blocks={self.blocks}: need blocks >= 1")


class BlockShift(nn.Module):
    """v[i, k] added to the k-th of `blocks` contiguous column blocks of output row i (rows [rows))."""

    def __init__(self, shape: tuple[int, ...], blocks: int, rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.shape, self.rows = tuple(shape), tuple(rows) if rows else (0, shape[0])
        sizes = [len(c) for c in torch.tensor_split(torch.arange(math.prod(self.shape[1:])), blocks)]
        self.register_buffer("block", torch.repeat_interleave(torch.arange(blocks), torch.tensor(sizes)), False)
        self.values = nn.Parameter(torch.zeros(self.rows[1] - self.rows[0], blocks))

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        delta = self.values.to(w.dtype)[:, self.block].view(-1, *w.shape[1:])  # (rows, fan_in) -> (rows, *W[1:])
        return w.index_add(0, torch.arange(*self.rows, device=w.device), delta)


def _cost(candidate: Any, rows: int, config: BlockShiftConfig) -> int:
    return rows * config.blocks


def _build(target: Any, param: nn.Parameter, host: nn.Module, plan: Plan, *, config: BlockShiftConfig, **_: Any):
    return BlockShift(param.shape, config.blocks, target.rows)


BLOCKSHIFT = TunerKind("blockshift", BlockShift, cost=_cost, mergeable=True, build=_build, config=BlockShiftConfig)


@contextmanager
def registered(kind: TunerKind) -> Iterator[TunerKind]:
    before = list(TUNERS)
    register_tuner(kind)
    try:
        yield kind
    finally:
        TUNERS.pop(kind.name)
        assert list(TUNERS) == before


@pytest.fixture
def blockshift() -> Iterator[TunerKind]:
    with registered(BLOCKSHIFT) as kind:
        yield kind


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=3, img_size=32).eval()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]


def test_a_new_kind_plans_applies_trains_and_merges_exactly(blockshift, tmp_path):
    model = _vit()
    sensitivity = measure_sensitivity(model, _batches(), batches=2)
    allocate(sensitivity, "3%", structured="blockshift", blocks=3, **OPTIONS).save(tmp_path / "plan.json")
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["blocks"] == 3 and written["rank"] == 8  # the kind's own value, in plan.json beside rank
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.tuner_config == {"rank": 8, "blocks": 3} and "blocks=3" in plan.summary()
    shifted = [t for t in plan.targets if t.kind == "blockshift"]
    assert shifted and all(t.count == 3 * (t.rows[1] - t.rows[0] if t.rows else t.shape[0]) for t in shifted)

    x, y = _batches()[0]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base_out = model(x)
    apply_plan(model, plan)  # checks every target's count formula against the built modules
    with torch.no_grad():
        assert torch.equal(model(x), base_out)  # zero-initialised == identity

    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # one batch: one optimizer step
    cfg = TrainConfig.scaled(1, lr=1e-2, batch_size=4, amp=False, device="cpu", progress=False)
    assert fit(model, {"train": loader, "val": loader}, cfg).best_epoch == 1
    tuners = [d for t in tuned_modules(model).values() for d in t.all_tuners()]
    assert len(tuners) == len(shifted) + sum(t.kind != "blockshift" for t in plan.targets)
    shifts = [d for d in tuners if isinstance(d, BlockShift)]
    assert all(d.values.abs().min() > 0 for d in shifts)  # the step reached every (row, block) value
    head = {n for n, p in model.named_parameters() if p.requires_grad and ".spt." not in n}
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base and n not in head)

    d = shifts[0]  # the delta is the formula: row i of block k holds v[i, k] on the k-th column block
    dense = d.add_to(torch.zeros(d.shape)).reshape(d.shape[0], -1)[d.rows[0] : d.rows[1]]
    for k, cols in enumerate(torch.tensor_split(torch.arange(dense.shape[1]), d.values.shape[1])):
        assert torch.equal(dense[:, cols], d.values.detach()[:, k : k + 1].expand(-1, len(cols)))

    with torch.no_grad():
        tuned_out = model(x)
        kept = [s.values.clone() for s in shifts]
        for s in shifts:
            s.values.zero_()
        without_shift = model(x)  # same head, the blockshift deltas at zero
        for s, v in zip(shifts, kept):
            s.values.copy_(v)
    assert (tuned_out - without_shift).abs().max() > 1e-4  # a non-zero delta changes the output

    merged = merge(model)  # mergeable by registration: a plain timm model afterwards
    assert not tuned_modules(merged)
    with torch.no_grad():
        assert torch.equal(merged(x), tuned_out)  # merged == unmerged: the same W' either way
    timm.create_model("test_vit", num_classes=3, img_size=32).load_state_dict(merged.state_dict(), strict=True)


def test_the_kind_checks_its_own_hyper_parameter(blockshift):
    sensitivity = measure_sensitivity(_vit(), _batches(), batches=2)
    assert "blockshift" in structured_choices()
    with pytest.raises(PlanError, match=r"tuner kind 'blockshift' needs blocks.*allocate\(\.\.\., blocks=\.\.\.\)"):
        allocate(sensitivity, "3%", structured="blockshift", **OPTIONS)
    with pytest.raises(PlanError, match="blockshift blocks=0: need blocks >= 1"):
        allocate(sensitivity, "3%", structured="blockshift", blocks=0, **OPTIONS)
    with pytest.raises(PlanError, match=r"unknown tuner hyper-parameter\(s\) blokcs: .*blocks \(blockshift\)"):
        allocate(sensitivity, "3%", structured="blockshift", blokcs=3, **OPTIONS)
    lora = allocate(sensitivity, "3%", **{**OPTIONS, "structured": "lora"}, blocks=3)  # another kind's: recorded
    assert lora.tuner_config == {"rank": 8, "blocks": 3} and not any(t.kind == "blockshift" for t in lora.targets)


def test_a_hyper_parameter_named_like_a_plan_key_is_refused():
    @dataclass(frozen=True)
    class Clash:
        format: int = 1  # would overwrite plan.json's own "format"

    kind = TunerKind("clash", BlockShift, cost=lambda c, rows, cfg: rows, mergeable=True, build=_build, config=Clash)
    with registered(kind):
        sensitivity = measure_sensitivity(_vit(), _batches(), batches=2)
        with pytest.raises(PlanError, match=r"tuner hyper-parameter\(s\) \['format'\] clash with plan.json's keys"):
            allocate(sensitivity, "3%", structured="clash", format=2, **OPTIONS)
