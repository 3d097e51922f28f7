"""Tuner contract table (sparse/whole/LoRA/adapter × Linear/Conv/qkv) + exact gradients + memory behaviour."""

import pytest
import timm
import torch
import torch.nn.functional as F
from support.tuner_cases import CASES, case_plan, perturb, sample_x, tiny_model, tuner_case

from spt_core.candidates import head_parameter_names
from spt_core.checkpoint import load_tuned_into, save_tuned
from spt_core.merge import merge
from spt_core.portable.errors import PlanError
from spt_core.tuners import apply_plan, remove_tuners, trainable_count, tuned_modules
from spt_core.tuners.host import _Rebuild


@pytest.mark.parametrize("kind, where", CASES)
def test_tuner_contract(kind, where, tmp_path):
    name, model, plan = tuner_case(kind, where)
    x = sample_x()
    with torch.no_grad():
        base_out = model(x)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, plan)
    # names unchanged, everything frozen but the tuners and the head
    assert set(base_state) <= set(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(head_parameter_names(model)) <= trainable
    assert all(".spt." in n for n in trainable - set(head_parameter_names(model)))
    assert trainable_count(model) == plan.trainable
    with torch.no_grad():
        assert torch.equal(model(x), base_out)  # zero-initialised tuner == identity
    perturb(model)
    with torch.no_grad():
        tuned_out = model(x)
    assert (tuned_out - base_out).abs().max() > 1e-4  # a non-zero delta changes the output
    save_tuned(model, plan, tmp_path / "tuned", info={"model_name": name})
    fresh = load_tuned_into(tiny_model(name), tmp_path / "tuned", model_name=name)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), tuned_out, rtol=0, atol=1e-6)  # save/load reproduces outputs
    merged = merge(model, keep_adapters=(kind == "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), tuned_out, rtol=0, atol=1e-5)  # merged == unmerged
    if kind != "adapter":  # a plain timm model again: loads strictly into a fresh one
        assert not tuned_modules(merged)
        plain = timm.create_model(name, num_classes=3, **({"img_size": 32} if "vit" in name else {}))
        plain.load_state_dict(merged.state_dict(), strict=True)
        assert type(plain) is type(merged)


def test_merge_refuses_adapters_without_opt_in():
    _, model, plan = tuner_case("adapter", "linear")
    apply_plan(model, plan)
    with pytest.raises(PlanError, match="adapters"):
        merge(model)


@pytest.mark.parametrize("where", ["linear", "qkv", "conv", "dwconv"])
def test_sparse_grad_equals_masked_dense_grad(where):
    name, model, plan = tuner_case("sparse", where)
    param = plan.targets[0].param
    idx = plan.indices[param]
    x, y = sample_x(), torch.tensor([0, 2])
    dense = tiny_model(name)
    w = dict(dense.named_parameters())[param]
    (g_dense,) = torch.autograd.grad(F.cross_entropy(dense(x), y), [w])
    apply_plan(model, plan)
    F.cross_entropy(model(x), y).backward()
    values = tuned_modules(model)[param.rpartition(".")[0]].deltas["weight"][0].values
    torch.testing.assert_close(values.grad, g_dense.reshape(-1)[idx], rtol=1e-5, atol=1e-7)
    # no dense gradient buffer on any frozen weight
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_only_planned_entries_change_after_a_step():
    name, model, plan = tuner_case("sparse", "conv")
    param = plan.targets[0].param
    base = dict(model.named_parameters())[param].detach().clone()
    apply_plan(model, plan)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    F.cross_entropy(model(sample_x()), torch.tensor([0, 2])).backward()
    opt.step()
    merge(model)
    changed = (dict(model.named_parameters())[param].detach() != base).reshape(-1).nonzero().flatten()
    assert len(changed) > 0 and set(changed.tolist()) <= set(plan.indices[param].tolist())
    untouched = torch.ones(base.numel(), dtype=torch.bool)
    untouched[plan.indices[param]] = False
    assert torch.equal(
        dict(model.named_parameters())[param].detach().reshape(-1)[untouched], base.reshape(-1)[untouched]
    )


@pytest.mark.parametrize(
    "kind, where", [("sparse", "linear"), ("lora", "qkv"), ("sparse", "conv"), ("whole", "vector")]
)
def test_effective_weight_is_not_saved_for_backward(kind, where, monkeypatch):
    """An op using W' would save it for backward (SPT's memory fault): the graph must hold a recipe instead."""
    _, model, plan = tuner_case(kind, where)
    apply_plan(model, plan)
    stored, rebuilt = [], []
    init, call = _Rebuild.__init__, _Rebuild.__call__
    monkeypatch.setattr(_Rebuild, "__init__", lambda self, *a: (stored.append(a[1]), init(self, *a))[1])
    monkeypatch.setattr(_Rebuild, "__call__", lambda self: (rebuilt.append(self.attr), call(self))[1])
    x = sample_x().requires_grad_(True)  # so every layer needs its input gradient, hence W'
    loss = F.cross_entropy(model(x), torch.tensor([0, 2]))
    assert stored == [plan.targets[0].param.rpartition(".")[2]]  # W' was replaced by a recipe when saved
    assert not rebuilt
    loss.backward()
    assert rebuilt == stored  # and rebuilt once, when backward needed it
    assert all(p.grad is not None for t in tuned_modules(model).values() for p in t.parameters())
    with torch.no_grad():
        model(x)
    assert len(stored) == 1  # nothing saved without autograd


def test_remove_tuners_restores_base_model():
    _, model, plan = tuner_case("lora", "linear")
    x = sample_x()
    with torch.no_grad():
        ref = model(x)
    apply_plan(model, plan)
    perturb(model)
    remove_tuners(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert not tuned_modules(model)


def test_apply_plan_rejects_wrong_backbone():
    _, _, plan = tuner_case("lora", "linear")
    with pytest.raises(PlanError, match="not a parameter"):
        apply_plan(tiny_model("test_efficientnet"), plan)


def test_tuned_weights_load_errors(tmp_path):
    name, model, plan = tuner_case("sparse", "linear")
    apply_plan(model, plan)
    save_tuned(model, plan, tmp_path / "a", info={"model_name": name})
    with pytest.raises(PlanError, match="trained on 'test_vit'"):
        load_tuned_into(tiny_model("test_vit"), tmp_path / "a", model_name="vit_tiny")
    other_classes = timm.create_model("test_vit", img_size=32, num_classes=5)
    with pytest.raises(PlanError, match="shape"):
        load_tuned_into(other_classes, tmp_path / "a")
    (tmp_path / "a" / "tuned.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(PlanError, match="corrupt") as e:
        load_tuned_into(tiny_model(name), tmp_path / "a")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("structured", ["lora", "none"])
def test_real_lite0_plan_train_merge(structured):
    """The whole method on the real embedded Lite0 weights: measure → allocate → apply → step → merge."""
    from spt_core.allocate import SPT_RULE, allocate
    from spt_core.model import create_model
    from spt_core.sensitivity import measure_sensitivity

    torch.manual_seed(0)
    model, _ = create_model("tf_efficientnet_lite0", num_classes=4, weights="embedded", img_size=32)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 2)
    sens = measure_sensitivity(model, [(x, y)], batches=1)
    plan = allocate(sens, "0.5%", **{**SPT_RULE, "structured": structured})
    assert plan.budget - 4 * 8 * 1280 <= plan.trainable <= plan.budget  # within one conv_head LoRA of the budget
    apply_plan(model, plan)
    assert trainable_count(model) == plan.trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        tuned = model(x)
    merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tuned, rtol=0, atol=1e-5)
    plain = timm.create_model("tf_efficientnet_lite0", num_classes=4)
    plain.load_state_dict(model.state_dict(), strict=True)


class _ParentReadsWeight(torch.nn.Module):
    """Like timm's BEiT/EVA attention: the parent reads a child's weight itself."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 2)

    def get_classifier(self) -> torch.nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(x, self.qkv.weight, self.qkv.bias))


def test_unreachable_tuners_are_found():
    from spt_core.tuners import check_tuners_reached

    model = _ParentReadsWeight()
    plan = case_plan("whole", "qkv.weight", (6, 6), None)
    apply_plan(model, plan)
    assert check_tuners_reached(model, torch.randn(2, 6)) == ["qkv.spt.deltas.weight.0.delta"]
    assert all(p.grad is None for p in model.parameters())  # the check leaves no gradients behind
    _, vit, vit_plan = tuner_case("lora", "qkv")
    apply_plan(vit, vit_plan)
    assert check_tuners_reached(vit, sample_x()) == []


def test_trained_bn_statistics_travel_with_the_tuned_weights(tmp_path):
    from spt_core.checkpoint import bn_buffers

    name, model, plan = tuner_case("sparse", "conv")
    apply_plan(model, plan)
    with torch.no_grad():
        for n, b in bn_buffers(model).items():
            if n.endswith("running_mean"):
                b.add_(0.5)  # as if training had updated the statistics
        out = model(sample_x())
    save_tuned(model, plan, tmp_path / "a", buffers=bn_buffers(model))
    fresh = load_tuned_into(tiny_model(name), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(sample_x()), out, rtol=0, atol=1e-6)
