"""The tuner registry: the built-in kinds, and a new kind added by one registration (no edits elsewhere)."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.nn as nn

from spt_core.allocate import SPT_RULE, allocate, structured_cost
from spt_core.candidates import Candidate
from spt_core.checkpoint import load_tuned_into, save_tuned
from spt_core.merge import merge
from spt_core.plan import KINDS, Plan, Target
from spt_core.portable.errors import PlanError
from spt_core.sensitivity import measure_sensitivity
from spt_core.tuners import (
    TUNERS,
    TunerKind,
    apply_plan,
    plan_is_mergeable,
    register_tuner,
    structured_choices,
    tuned_modules,
)

BUILTIN = {"sparse": True, "whole": True, "lora": True, "adapter": False}  # kind -> mergeable


class RowShift(nn.Module):
    """A toy kind: W'[i] = W[i] + b_i on output rows [rows), one zero-initialised value per row."""

    def __init__(self, shape: tuple[int, ...], rows: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.rows = tuple(rows) if rows else (0, shape[0])
        self.shift = nn.Parameter(torch.zeros(self.rows[1] - self.rows[0]))

    def add_to(self, w: torch.Tensor) -> torch.Tensor:
        block = self.shift.to(w.dtype).view(-1, *[1] * (w.ndim - 1)).expand(-1, *w.shape[1:])  # (rows, *W[1:])
        return w.index_add(0, torch.arange(*self.rows, device=w.device), block)


ROWSHIFT = TunerKind(
    "rowshift",
    RowShift,
    cost=lambda c, rows, rank: rows,
    mergeable=True,
    build=lambda target, param, host, plan, **_: RowShift(param.shape, target.rows),
)


@pytest.fixture
def rowshift():
    register_tuner(ROWSHIFT)
    try:
        yield ROWSHIFT
    finally:
        TUNERS.pop(ROWSHIFT.name)
        assert dict((k, v.mergeable) for k, v in TUNERS.items()) == BUILTIN


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=3, img_size=32).eval()


def _sensitivity(model: nn.Module):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    return measure_sensitivity(model, batches, batches=2)


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in tuned_modules(model).values():
            for p in t.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def test_builtin_kinds_in_plan_order():
    assert {k: v.mergeable for k, v in TUNERS.items()} == BUILTIN and list(KINDS) == list(BUILTIN)
    assert structured_choices() == ("lora", "adapter", "none")
    c = Candidate("w", "m", "weight", "linear", (100, 50), 0)
    assert structured_cost(c, 100, "lora", {"rank": 2}) == 2 * (50 + 100)
    assert structured_cost(c, 100, "adapter", {"rank": 2}) == 2 * 2 * 100 + 2 + 100
    with pytest.raises(PlanError, match="use one of lora, adapter, none"):
        structured_cost(c, 100, "whole", {"rank": 2})  # placed by entry count, not a structured module
    with pytest.raises(ValueError, match="already registered"):
        register_tuner(dataclasses.replace(TUNERS["lora"]))


def test_a_new_kind_is_one_registration(rowshift, tmp_path):
    assert "rowshift" in structured_choices() and "rowshift" in KINDS
    model = _vit()
    sens = _sensitivity(model)
    rule = {**SPT_RULE, "structured": "rowshift", "rank": 4}
    plan = allocate(sens, "3%", **rule)  # allocate prices it by its registered cost
    shifted = [t for t in plan.targets if t.kind == "rowshift"]
    assert shifted and all(t.count == (t.rows[1] - t.rows[0] if t.rows else t.shape[0]) for t in shifted)
    assert plan.by_kind()["rowshift"] == {"targets": len(shifted), "params": sum(t.count for t in shifted)}
    assert plan_is_mergeable(plan)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = model(x)
    apply_plan(model, plan)  # built by the registration; apply_plan checks the count formula against the modules
    with torch.no_grad():
        assert torch.equal(model(x), base_out)  # zero-initialised == identity
    _perturb(model)
    with torch.no_grad():
        tuned_out = model(x)
    assert (tuned_out - base_out).abs().max() > 1e-4  # a non-zero delta changes the output

    save_tuned(model, plan, tmp_path / "tuned")  # the tuned-weights round trip goes through apply_plan too
    with torch.no_grad():
        torch.testing.assert_close(load_tuned_into(_vit(), tmp_path / "tuned")(x), tuned_out, rtol=0, atol=1e-6)

    merged = merge(model)  # mergeable by registration: a plain timm model afterwards
    assert not tuned_modules(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), tuned_out, rtol=0, atol=1e-5)
    timm.create_model("test_vit", num_classes=3, img_size=32).load_state_dict(merged.state_dict(), strict=True)


def test_merge_refuses_what_the_registry_says_is_not_mergeable(rowshift):
    TUNERS["rowshift"] = dataclasses.replace(rowshift, mergeable=False)  # the fixture removes it again
    model = _vit()
    plan = allocate(_sensitivity(model), "3%", **{**SPT_RULE, "structured": "rowshift", "rank": 4})
    assert not plan_is_mergeable(plan)
    apply_plan(model, plan)
    _perturb(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tuned_out = model(x)
    n = sum(t.kind == "rowshift" for t in plan.targets)
    with pytest.raises(PlanError, match=rf"the model has {n} rowshifts, which cannot be folded.*'lora'"):
        merge(model)
    merge(model, keep_adapters=True)  # folds the sparse/whole deltas, keeps the rowshifts attached
    kept = [tuner for t in tuned_modules(model).values() for tuner in t.all_tuners()]
    assert len(kept) == n and all(isinstance(k, RowShift) for k in kept)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tuned_out, rtol=0, atol=1e-5)


def test_unregistered_kinds_are_refused():
    model = _vit()
    with pytest.raises(PlanError, match="structured='rowshift': use one of lora, adapter, none"):
        allocate(_sensitivity(model), "3%", **{**SPT_RULE, "structured": "rowshift"})
    shape = tuple(model.blocks[0].mlp.fc1.weight.shape)
    plan = Plan([Target("blocks.0.mlp.fc1.weight", "rowshift", shape[0], "linear", shape, 0)], {}, 64, "none",
                {"rank": 4}, 10.0, 5.0, 10**6)  # fmt: skip
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(PlanError, match="unknown tuner kind 'rowshift'; registered kinds: sparse, whole, lora"):
        apply_plan(model, plan)
    assert not tuned_modules(model) and {n: p.requires_grad for n, p in model.named_parameters()} == flags
