"""spt_core.model: create_model over timm, the offline Lite0 weights, local weight files, one-line errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import skimage.data
import timm
import torch
from safetensors.torch import save_file

from spt_core.model import ModelInfo, create_model, file_sha256
from spt_core.portable.errors import ModelError
from spt_core.portable.preprocess import preprocess_image

ESPRESSO = 967  # ImageNet-1k class index


@pytest.fixture(scope="module")
def lite0_imagenet() -> tuple[torch.nn.Module, ModelInfo]:
    return create_model("tf_efficientnet_lite0", num_classes=1000, weights="embedded")


def test_embedded_lite0_predicts_espresso(lite0_imagenet: tuple[torch.nn.Module, ModelInfo]) -> None:
    model, info = lite0_imagenet
    pre = info.preprocess
    assert (pre.size, pre.mean, pre.std, pre.interpolation) == ((224, 224), (0.5,) * 3, (0.5,) * 3, "bicubic")
    x = torch.from_numpy(preprocess_image(skimage.data.coffee(), pre))[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == ESPRESSO and probs[ESPRESSO] > 0.5
    assert timm.data.ImageNetInfo().index_to_description(ESPRESSO) == "espresso"
    assert info.weights.startswith("embedded:") and info.weights_sha256 and len(info.weights_sha256) == 64
    assert not model.training


def test_embedded_lite0_new_head_keeps_backbone(lite0_imagenet: tuple[torch.nn.Module, ModelInfo]) -> None:
    ref = lite0_imagenet[0].state_dict()
    model, info = create_model("tf_efficientnet_lite0", num_classes=4, img_size=64)
    sd = model.state_dict()
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in sd if not k.startswith("classifier."))  # every backbone tensor
    assert sd["classifier.weight"].shape == (4, 1280)
    assert info.preprocess.size == (64, 64) and info.img_size == 64  # CNN: only the preprocessing changes
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 4)


def test_embedded_only_for_lite0() -> None:
    with pytest.raises(ModelError, match="only for tf_efficientnet_lite0.*'resnet10t'"):
        create_model("resnet10t", weights="embedded")


def test_none_and_model_info_roundtrip() -> None:
    model, info = create_model("test_efficientnet", num_classes=3, weights="none", img_size=48, drop_path_rate=0.0)
    assert info.weights == "none" and info.weights_sha256 is None
    assert info.preprocess.size == (48, 48) and info.preprocess.interpolation == "bicubic"
    assert ModelInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    assert model.get_classifier().out_features == 3


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_roundtrip(suffix: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = timm.create_model("test_vit", num_classes=5).eval()
    sd = src.state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    # same head size: everything, head included, loads exactly
    same, info = create_model("test_vit", num_classes=5, weights=str(path), drop_path_rate=0.0)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in sd.items())
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(same(x), src(x), rtol=0, atol=0)
    assert info.weights == f"file:{path}" and info.weights_sha256 == file_sha256(path)
    # other head size and input size: backbone loaded, head fresh, position embeddings resampled by timm
    other, info = create_model("test_vit", num_classes=3, weights=str(path), img_size=64)
    osd = other.state_dict()
    assert osd["head.weight"].shape == (3, sd["head.weight"].shape[1])
    assert osd["pos_embed"].shape[1] == 1 + (64 // 16) ** 2 != sd["pos_embed"].shape[1]
    assert torch.equal(osd["pos_embed"][:, 0], sd["pos_embed"][:, 0])  # the class token's embedding is kept
    assert all(torch.equal(osd[k], v) for k, v in sd.items() if not k.startswith("head.") and k != "pos_embed")
    assert info.preprocess.size == (64, 64)
    with torch.no_grad():
        assert other(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


class _Payload:
    """Pickles to a call that creates a marker file (plain pickle.loads does); weights_only=True must refuse it."""

    marker: Path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _bad_file(kind: str, tmp: Path) -> Path:
    sd = timm.create_model("test_vit", num_classes=5).state_dict()
    if kind == "missing":
        return tmp / "nope.safetensors"
    if kind == "wrong suffix":
        (tmp / "w.onnx").write_bytes(b"x")
        return tmp / "w.onnx"
    if kind == "corrupt pth":
        (tmp / "w.pth").write_bytes(b"definitely not a zip or pickle")
        return tmp / "w.pth"
    if kind == "corrupt safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp / "w.safetensors")
        (tmp / "w.safetensors").write_bytes((tmp / "w.safetensors").read_bytes()[:100])
        return tmp / "w.safetensors"
    if kind == "pickled code":
        payload = _Payload()
        payload.marker = tmp / "pwned"
        (tmp / "w.pt").write_bytes(pickle.dumps({"x": payload}))
        return tmp / "w.pt"
    if kind == "other architecture":
        torch.save(timm.create_model("resnet10t").state_dict(), tmp / "w.bin")
        return tmp / "w.bin"
    if kind == "missing key":  # with a resized head timm loads non-strictly; this must still fail
        sd.pop("blocks.0.norm1.weight")
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp / "w.safetensors")
        return tmp / "w.safetensors"
    if kind == "unexpected key":
        sd["extra.weight"] = torch.zeros(2)
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp / "w.safetensors")
        return tmp / "w.safetensors"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        ("missing", "does not exist"),
        ("wrong suffix", "has extension '.onnx'"),
        ("corrupt pth", "weights_only=True"),
        ("corrupt safetensors", "not a readable state dict"),
        ("pickled code", "weights_only=True"),
        ("other architecture", "does not fit test_vit: missing keys"),
        ("missing key", "missing keys blocks.0.norm1.weight"),
        ("unexpected key", "unexpected keys extra.weight"),
    ],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_weight_files(kind: str, what: str, tmp_path: Path) -> None:
    path = _bad_file(kind, tmp_path)
    with pytest.raises(ModelError) as err:
        create_model("test_vit", num_classes=3, weights=str(path))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and what in msg, msg
    assert not (tmp_path / "pwned").exists()


def test_unknown_model_lists_close_matches() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'efficientnet_litez'.*efficientnet_lite0") as err:
        create_model("efficientnet_litez")
    assert "\n" not in str(err.value)


def test_hub_offline_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # fail fast and the same way with or without a network
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))  # and never find a cached copy
    with pytest.raises(ModelError, match="--weights PATH.*--weights embedded") as err:
        create_model("test_vit", weights="hub")
    assert "\n" not in str(err.value)


def test_new_heads_share_one_small_init():
    """A fresh head gets N(0, 0.01), bias 0, whatever timm's family default; a loaded head is untouched."""
    from spt_core.model import create_model

    for name in ("test_vit", "test_efficientnet", "resnet10t"):
        model, _ = create_model(name, num_classes=4, weights="none")
        head = model.get_classifier()
        assert 0.003 < float(head.weight.detach().std()) < 0.012 and float(head.bias.detach().abs().max()) == 0.0
    imagenet, _ = create_model("tf_efficientnet_lite0", num_classes=1000, weights="embedded")
    assert float(imagenet.get_classifier().weight.detach().std()) > 0.02  # the ImageNet classifier was loaded
