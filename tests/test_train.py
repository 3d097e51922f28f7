"""TrainConfig / fit / evaluate on tiny timm models (CPU, 32 px random tensors); resume: tests/test_resume.py."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from support.training import comparable, random_loaders, tiny_effnet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spt_core.train.loop as train_loop
from spt_core.evaluate import evaluate, predict, write_predictions_csv
from spt_core.portable.errors import SensituneError
from spt_core.train import (
    SPT_RECIPE,
    History,
    TrainConfig,
    fit,
    lr_at,
    make_optimizer,
    trainable_parameters,
)

REPO = Path(__file__).resolve().parents[1]


def _vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=3, img_size=32, **kw)
    for n, p in model.named_parameters():  # a PEFT-like split: head + the last block's MLP
        p.requires_grad_(n.startswith(("head.", "blocks.5.mlp.")))
    return model


def _cfg(**kw) -> TrainConfig:
    return TrainConfig.scaled(**{"epochs": 2, "warmup_epochs": 1, "lr": 1e-2, "progress": False, **kw})


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- config and schedule -------------------------------------------------------------------------------------


def test_config_roundtrip_unknown_key_and_validation():
    cfg = TrainConfig.scaled(7, warmup_epochs=1, lr=3e-4, grad_clip=1.0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    with pytest.raises(SensituneError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(SensituneError, match=r"epochs=0.*min_lr"):  # every problem reported at once
        TrainConfig.scaled(0, min_lr=1.0)
    assert [TrainConfig.scaled(e).warmup_epochs for e in (3, 5, 20, 100)] == [0, 1, 2, 10]
    assert TrainConfig.scaled(20, lr=5e-4).lr == 5e-4


def test_config_has_no_defaults_for_what_params_yaml_sets():
    import yaml

    train = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    cfg_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    required = {f.name for f in dataclasses.fields(TrainConfig) if f.default is dataclasses.MISSING}
    assert required == cfg_keys & set(train)  # params.yaml (or whoever builds the config) gives every value
    with pytest.raises(TypeError):
        TrainConfig(epochs=3)  # type: ignore[call-arg]
    with pytest.raises(SensituneError, match=r"missing train config key\(s\) \['amp'"):
        TrainConfig.from_dict({k: v for k, v in SPT_RECIPE.items() if k != "amp"})
    assert TrainConfig.scaled(100).to_dict() == {**SPT_RECIPE, "log_every": 0, "progress": None}


def test_lr_schedule_values():
    cfg = TrainConfig.scaled(10, warmup_epochs=2, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5)
    total, warmup = 100, 20
    lrs = [lr_at(s, total, warmup, cfg) for s in range(total)]
    assert lrs[0] == cfg.warmup_lr
    assert lrs[10] == pytest.approx((cfg.warmup_lr + cfg.lr) / 2, rel=1e-12)
    assert lrs[warmup] == pytest.approx(cfg.lr, rel=1e-12)
    assert lrs[-1] == cfg.min_lr  # cos(pi) = -1 exactly
    mid = warmup + (total - 1 - warmup) / 2  # the cosine's midpoint is the mean of lr and min_lr
    assert lr_at(mid, total, warmup, cfg) == pytest.approx((cfg.lr + cfg.min_lr) / 2, rel=1e-12)
    assert all(a < b for a, b in zip(lrs[: warmup + 1], lrs[1 : warmup + 1]))
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))
    no_warm = TrainConfig.scaled(10, warmup_epochs=0)
    assert lr_at(0, 50, 0, no_warm) == pytest.approx(no_warm.lr, rel=1e-12)


def test_no_weight_decay_on_1d_and_model_no_weight_decay():
    model = _vit()
    for p in model.parameters():
        p.requires_grad_(True)
    params = trainable_parameters(model)
    skip = model.no_weight_decay()  # pos_embed, cls_token: timm's own list
    opt = make_optimizer(params, TrainConfig.scaled(100, weight_decay=0.05), no_decay=skip)
    by_id = {id(p): n for n, p in params.items()}
    groups = {g["weight_decay"]: {by_id[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(groups) == {0.05, 0.0}
    assert groups[0.0] == {n for n, p in params.items() if p.ndim <= 1 or n in skip}
    assert groups[0.05] == {n for n, p in params.items() if p.ndim > 1 and n not in skip}
    assert {"pos_embed", "cls_token", "head.bias", "blocks.0.norm1.weight"} <= groups[0.0]
    assert "head.weight" in groups[0.05]


# --- what fit changes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("freeze_bn_stats", [True, False])
def test_fit_changes_only_trainable_and_bn_stats_when_asked(freeze_bn_stats):
    model = tiny_effnet()
    model.conv_head.eval()  # a mixed mode that fit must give back as it was
    trainable = set(trainable_parameters(model))
    before = _snapshot(model)
    hist = fit(model, random_loaders(), _cfg(epochs=1, warmup_epochs=0, freeze_bn_stats=freeze_bn_stats))
    after = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    for n in trainable:
        assert not torch.equal(before[n], after[n]), n
    for n in set(before) - trainable - buffers:
        assert torch.equal(before[n], after[n]), n
    changed = {n for n in buffers if not torch.equal(before[n], after[n])}
    if freeze_bn_stats:
        assert changed == set()
    else:
        assert "bn1.running_mean" in changed and "blocks.4.0.bn3.running_var" in changed
    assert model.training and not model.conv_head.training and model.bn2.training
    assert hist.trainable_params == sum(after[n].numel() for n in trainable)
    assert hist.best_epoch == 1 and hist.test_acc is not None and hist.peak_memory_mb > 0


def test_selection_uses_val_only_and_tests_the_selected_weights(monkeypatch):
    """The epoch is chosen on validation alone: the test images are read once, after the last epoch.

    Test reads are caught at the data itself (whatever code path would evaluate them), and the scripted
    validation curve picks epoch 2 while the per-epoch test curve (on a separate copy) peaks elsewhere.
    """
    loaders = random_loaders()
    scripted_val = iter([0.5, 0.75, 0.75, 0.25])  # best = epoch 2 (epoch 3 ties on the score, its loss is higher)
    scripted_loss = iter([1.0, 0.5, 0.6, 0.4])
    calls = {"val": 0}

    def fake_evaluate(model, loader, *args, **kw):
        assert loader is not loaders["val"]  # validation goes through collect
        return evaluate(model, loader, *args, **kw)

    real_collect = train_loop.collect

    def fake_collect(model, loader, *args, **kw):  # validation: collect -> selection_score (scripted)
        assert loader is loaders["val"]
        calls["val"] += 1
        y, p, _ = real_collect(model, loader, *args, **kw)
        return y, p, next(scripted_loss)

    monkeypatch.setattr(train_loop, "evaluate", fake_evaluate)
    monkeypatch.setattr(train_loop, "collect", fake_collect)
    monkeypatch.setattr(train_loop, "selection_score", lambda *a, **k: next(scripted_val))
    phase = {"epochs_done": 0}
    test_reads: list[int] = []

    class SpyTest(torch.utils.data.Dataset):  # records when each test image is read
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            test_reads.append(phase["epochs_done"])
            return self.inner[i]

    test_copy = DataLoader(loaders["test"].dataset, batch_size=8)  # the test's own per-epoch probe
    loaders["test"] = DataLoader(SpyTest(loaders["test"].dataset), batch_size=8)

    class EpochSampler(torch.utils.data.RandomSampler):  # what a DistributedSampler needs each epoch
        def set_epoch(self, epoch):
            phase.setdefault("set_epoch", []).append(epoch)

    train_set = loaders["train"].dataset
    loaders["train"] = DataLoader(train_set, batch_size=8, sampler=EpochSampler(train_set))
    model = _vit()
    names = list(trainable_parameters(model))
    snaps, test_acc_per_epoch = {}, {}

    def on_epoch(rec):
        snaps[rec["epoch"]] = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
        test_acc_per_epoch[rec["epoch"]] = evaluate(model, test_copy)["accuracy"]
        phase["epochs_done"] = rec["epoch"]

    hist = fit(model, loaders, _cfg(epochs=4), on_epoch=on_epoch)
    assert [e.val_score for e in hist.epochs] == [0.5, 0.75, 0.75, 0.25]
    assert hist.best_epoch == 2 and hist.best_val_score == 0.75 and hist.best_val_acc == hist.epochs[1].val_acc
    assert hist.best_val_loss == 0.5
    assert calls["val"] == 4 and phase["set_epoch"] == [0, 1, 2, 3]
    assert test_reads and set(test_reads) == {4}  # never during training, once after it
    assert len(test_reads) == len(loaders["test"].dataset)
    final = trainable_parameters(model)
    assert all(torch.equal(final[n], snaps[2][n]) for n in names)
    assert not all(torch.equal(snaps[2][n], snaps[4][n]) for n in names)  # selection is not a no-op
    assert hist.test_acc == test_acc_per_epoch[2] == evaluate(model, test_copy)["accuracy"]


@pytest.mark.parametrize(
    "losses, best",
    [([1.0, 0.6, 0.5, 0.4], 3),  # epochs 2 and 3 tie on the score: the lower loss (epoch 3), not the earlier one
     ([1.0, 0.5, 0.5, 0.1], 2),  # a tie on both keeps the earlier epoch; epoch 4's low loss cannot beat a score
     ([0.2, 0.6, 0.5, 0.4], 3)],  # epoch 1's lowest loss does not make up for its lower score
)  # fmt: skip
def test_a_validation_tie_goes_to_the_lower_validation_loss(monkeypatch, losses, best):
    scores, loss_iter = iter([0.5, 0.75, 0.75, 0.25]), iter(losses)
    real_collect = train_loop.collect

    def scripted_collect(model, loader, *args, **kw):
        y, p, _ = real_collect(model, loader, *args, **kw)
        return y, p, next(loss_iter)

    monkeypatch.setattr(train_loop, "collect", scripted_collect)
    monkeypatch.setattr(train_loop, "selection_score", lambda *a, **k: next(scores))
    hist = fit(_vit(), random_loaders(), _cfg(epochs=4))
    assert (hist.best_epoch, hist.best_val_score, hist.best_val_loss) == (best, 0.75, losses[best - 1])


def test_same_seed_same_history_and_lr_record():
    def run(seed):
        model = _vit(drop_path_rate=0.1)  # drop-path draws from the global RNG
        h = fit(model, random_loaders(), _cfg(epochs=3, seed=seed))
        return h, _snapshot(model)

    (h1, s1), (h2, s2), (h3, _) = run(0), run(0), run(1)
    assert comparable(h1.to_dict()) == comparable(h2.to_dict())
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert [e.train_loss for e in h1.epochs] != [e.train_loss for e in h3.epochs]
    cfg, steps = _cfg(epochs=3), 4  # 32 train images / batch 8
    assert [e.lr for e in h1.epochs] == [lr_at(e * steps - 1, 3 * steps, steps, cfg) for e in (1, 2, 3)]
    assert History.from_dict(json.loads(json.dumps(h1.to_dict()))) == h1


# --- evaluate / predict --------------------------------------------------------------------------------------


def test_evaluate_exact_confusion_and_restores_modes():
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0, 2])
    logits = F.one_hot(pred, 3).float() * 2.0 + torch.linspace(-0.5, 0.5, 21).view(7, 3)
    loader = DataLoader(TensorDataset(logits, y), batch_size=3)  # 3 batches, the last one short
    model = nn.Sequential(nn.Identity(), nn.Dropout(0.5))
    model[0].eval()  # mixed modes must survive
    out = evaluate(model, loader)
    assert out["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert out["n"] == 7 and out["accuracy"] == 5 / 7
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert out["per_class_recall"] == [0.5, 1.0, 2 / 3]
    assert out["per_class_precision"] == [0.5, 2 / 3, 1.0]
    assert model.training and not model[0].training and model[1].training
    four = evaluate(nn.Linear(3, 4), [(logits, y)], num_classes=4)  # a class nobody has: None, not NaN
    assert four["per_class_recall"][3] is None and len(four["confusion"]) == 4
    json.dumps(out)
    with pytest.raises(SensituneError, match="label range"):
        evaluate(model, [(logits, torch.tensor([0, 1, 2, 3, 0, 1, 2]))])


def test_predict_and_predictions_csv(tmp_path):
    model = _vit().eval()
    x = torch.randn(10, 3, 32, 32)
    preds, probs = predict(model, x, batch_size=4)
    preds2, probs2 = predict(model, DataLoader(TensorDataset(x, torch.zeros(10, dtype=torch.long)), batch_size=3))
    assert preds.dtype == np.int64 and probs.shape == (10, 3) and probs.dtype == np.float32
    np.testing.assert_array_equal(preds, probs.argmax(1))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, probs2, rtol=1e-5, atol=1e-6)
    names = ["ok", "scratch", "dent"]
    path = write_predictions_csv([f"img{i}.png" for i in range(10)], preds, probs, names, tmp_path / "p.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["pred"] for r in rows] == [names[k] for k in preds]
    assert all(math.isclose(float(r["confidence"]), float(r[f"p_{r['pred']}"])) for r in rows)
    assert [p.name for p in tmp_path.iterdir()] == ["p.csv"]  # no temp file left behind
    with pytest.raises(SensituneError, match="9 paths"):
        write_predictions_csv(["a"] * 9, preds, probs, names, tmp_path / "q.csv")
