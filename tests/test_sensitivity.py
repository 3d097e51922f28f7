"""measure_sensitivity: exact Σ g² and the model left exactly as it was; candidates on any timm model."""

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from spt_core.candidates import find_candidates, head_parameter_names
from spt_core.portable.errors import SensituneError
from spt_core.sensitivity import Sensitivity, measure_sensitivity


class TwoLayer(nn.Module):
    """The smallest model with a timm-style head API."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.fc1(x))))


def _batches(n: int, dim: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, dim, generator=g), torch.randint(0, classes, (4,), generator=g)) for _ in range(n)]


def test_sensitivity_is_sum_of_squared_batch_gradients():
    torch.manual_seed(0)
    model = TwoLayer()
    batches = _batches(5)
    s = measure_sensitivity(model, batches, batches=3)
    assert set(s.scores) == {"fc1.weight", "fc1.bias", "norm.weight", "norm.bias"}  # head excluded
    params = [model.fc1.weight, model.fc1.bias, model.norm.weight, model.norm.bias]
    want = [torch.zeros_like(p) for p in params]
    for x, y in batches[:3]:  # only the first `batches` batches count
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        for w, g in zip(want, grads):
            w += g.square()
    for name, w in zip(["fc1.weight", "fc1.bias", "norm.weight", "norm.bias"], want):
        torch.testing.assert_close(s.scores[name], w, rtol=1e-6, atol=0)
    assert s.meta["batches"] == 3 and s.meta["images"] == 12


def test_model_left_exactly_as_it_was():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3)
    model.eval()
    model.conv_head.weight.requires_grad_(False)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(4, 3, 32, 32)
    loader = [(x, torch.tensor([0, 1, 2, 0]))] * 2
    # train mode with BN updating its running stats during the pass: they must be restored afterwards
    s = measure_sensitivity(model, loader, batches=2, train_mode=True, freeze_bn_stats=False)
    assert all(bool((v >= 0).all()) for v in s.scores.values())
    assert sum(float(v.sum()) for v in s.scores.values()) > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(m.training for m in model.modules())
    assert torch.equal(model.classifier.weight.grad, torch.ones_like(model.classifier.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("classifier"))


def test_sensitivity_save_load_roundtrip(tmp_path):
    model = TwoLayer()
    s = measure_sensitivity(model, _batches(2), batches=2)
    s.save(tmp_path / "s.safetensors")
    s2 = Sensitivity.load(tmp_path / "s.safetensors")
    assert s2.candidates == s.candidates
    assert all(torch.equal(s.scores[k], s2.scores[k]) for k in s.scores)
    assert s2.meta["batches"] == 2


def test_candidates_use_timm_api_on_vit():
    model = timm.create_model("test_vit", img_size=32, num_classes=4)
    c = find_candidates(model)
    names = [n for n, _ in model.named_parameters()]
    assert list(c) == [n for n in names if n in c]  # keyed and ordered by named_parameters()
    assert "head.weight" not in c and "head.bias" not in c  # head: always trained, outside the budget
    assert "pos_embed" not in c and "cls_token" not in c  # tokens: frozen
    assert not any(n.startswith("patch_embed") for n in c)  # stem: frozen by default
    assert any(n.startswith("patch_embed") for n in find_candidates(model, include_stem=True))
    qkv = c["blocks.0.attn.qkv.weight"]
    assert qkv.kind == "linear" and qkv.segments == ((0, 64), (64, 128), (128, 192))
    assert c["blocks.0.norm1.weight"].kind == "vector"
    assert head_parameter_names(model) == ["head.weight", "head.bias"]


def test_candidates_on_cnns():
    eff = find_candidates(timm.create_model("test_efficientnet", num_classes=2))
    dw = [c for c in eff.values() if c.kind == "conv" and c.groups > 1]
    assert dw and all(c.groups == c.shape[0] for c in dw)  # depthwise kernels recognised
    assert "classifier.weight" not in eff and "conv_stem.weight" not in eff
    cnx = find_candidates(timm.create_model("convnext_atto", num_classes=2))
    assert "stages.0.blocks.0.gamma" in cnx  # layer scale: a vector candidate
    assert "head.fc.weight" not in cnx
    swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=2)
    sc = find_candidates(swin)
    assert not any("relative_position_bias_table" in n for n in sc)  # timm's no_weight_decay set: frozen
    assert sc["layers.0.blocks.0.attn.qkv.weight"].segments[1] == (96, 192)


def test_measure_task_is_probe_then_class_balanced_batches(tiny_digits):
    """measure_task == the steps spelled out (probe head, class-balanced BalancedSampler batches, Σg²), bit for bit."""
    from torch.utils.data import DataLoader

    from spt_core.data import BalancedSampler, load_dataset_info, make_loaders
    from spt_core.portable.preprocess import Preprocess
    from spt_core.probe import fit_probe
    from spt_core.sensitivity import measure_task

    n_classes = len(load_dataset_info(tiny_digits).class_names)

    def fresh():
        torch.manual_seed(0)
        return timm.create_model("test_efficientnet", num_classes=n_classes)

    loaders = make_loaders(tiny_digits, Preprocess(size=(32, 32)), batch_size=8, seed=3)
    ds, cpu = loaders["train"].dataset, torch.device("cpu")
    kw = {"probe_epochs": 3, "batches": 2, "batch_size": 8, "seed": 3, "device": cpu}
    model = fresh()
    probe = fit_probe(model, loaders, epochs=3, seed=3, device=cpu, select="accuracy").to_dict()
    want = measure_sensitivity(
        model, DataLoader(ds, batch_size=8, sampler=BalancedSampler(ds.labels, 3)), 2, device=cpu
    )
    got_model = fresh()
    got = measure_task(got_model, ds, loaders, head="probe", **kw)
    assert all(torch.equal(got.scores[n], want.scores[n]) for n in want.scores) and set(got.scores) == set(want.scores)
    assert torch.equal(got_model.get_classifier().weight, model.get_classifier().weight)  # the probe head stays
    timeless = [k for k in probe if k != "probe_seconds"]
    assert got.meta["head"] == "probe" and {k: got.meta[k] for k in timeless} == {k: probe[k] for k in timeless}
    random_model = fresh()
    head0 = random_model.get_classifier().weight.detach().clone()
    rnd = measure_task(random_model, ds, loaders, head="random", **kw)
    assert rnd.meta["head"] == "random" and "probe_val_acc" not in rnd.meta
    assert torch.equal(random_model.get_classifier().weight, head0)
    assert not all(torch.equal(rnd.scores[n], want.scores[n]) for n in want.scores)
    with pytest.raises(SensituneError, match="head='linear'"):
        measure_task(fresh(), ds, loaders, head="linear", **kw)
