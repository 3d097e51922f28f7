"""INT8 refused by the export gate is retried (accuracy control or an ignored scope) before it is declared not
promotable; a promotable INT8 is never retried; the retry never measures on the eval (test) images.

The model that breaks plain INT8: a tiny conv net whose classifier input carries one constant channel of 500 (an
outlier activation the head ignores). Per-tensor INT8 of that input spends its 256 levels on 0..500 (~2 a level),
so the three informative channels (0..~0.3) all become 0 and every image gets the one class with a bias; keeping
the classifier's input in float restores FP32 accuracy exactly. The same net without the outlier quantizes well.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import deploy.compile.recovery as recovery
from deploy.compile.build import ExportError
from deploy.compile.export import export_all
from deploy.compile.quantize import QuantizeError, calibration_fingerprint
from deploy.compile.verify import verify
from deploy.edge.artifact import load_artifact
from spt_core.portable.preprocess import Preprocess, preprocess_batch, preprocess_image

PRE = Preprocess(size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CLASSES = ["red", "green", "blue", "grey"]
OUTLIER = 500.0
STEM, HEAD = "node_conv2d/WithoutBiases", "node_linear_1/WithoutBiases"  # the exporter's names of ColourNet's ends


def colour_images(n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """n noisy grey 16 px images; class k < 3 has channel k raised by 40 grey levels, class 3 none."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        img = rng.normal(128, 30, (16, 16, 3))
        if (k := i % len(CLASSES)) < 3:
            img[..., k] += 40
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(k)
    return images, labels


class ColourNet(nn.Module):
    """stem conv (RGB + 2) -> ReLU -> mean -> mid linear (minus the training mean; channel 7 = `outlier`) -> ReLU ->
    head: class k < 3 scores 10 x its channel's excess, class 3 (nothing raised) a fixed 10 x half the excess."""

    def __init__(self, train: list[np.ndarray], labels: list[int], outlier: float) -> None:
        super().__init__()
        self.num_classes = len(CLASSES)
        self.stem, self.mid, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), nn.Linear(8, len(CLASSES))
        with torch.no_grad():
            for layer in (self.stem, self.mid, self.head):
                layer.weight.zero_()
                layer.bias.zero_()
            self.stem.bias[:3] = 2.0  # keeps the normalised colours (-1..1) positive through the ReLU
            for c in range(3):
                self.stem.weight[c, c, 1, 1] = 1.0
                self.mid.weight[c, c] = 1.0
                self.head.weight[c, c] = 10.0
            pooled = torch.relu(self.stem(torch.from_numpy(preprocess_batch(train, PRE)))).mean((2, 3))  # (N, 8)
            self.mid.bias[:3] = -pooled[:, :3].mean(0)  # excess over the mean colour: ~0.23 raised, else 0
            self.mid.bias[7] = outlier
            f, y = self.features(torch.from_numpy(preprocess_batch(train, PRE))), torch.tensor(labels)
            self.head.bias[3] = 5.0 * torch.stack([f[y == k, k].mean() for k in range(3)]).mean()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.mid(torch.relu(self.stem(x)).mean((2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[list[np.ndarray], list[int]]]:
    return {"train": colour_images(48, 0), "val": colour_images(32, 1), "test": colour_images(32, 2)}


def _export(model: nn.Module, data: dict, out: Path, method: str, validation: list[np.ndarray]) -> dict:
    (train, _), (test, y_test) = data["train"], data["test"]
    return export_all(
        model, PRE, CLASSES, out, calibration_images=train, eval_images=test, eval_labels=y_test,
        validation_images=validation, int8_recovery=method, model_name="colournet", model_version=1,
        plan_hash=None, data_version=None, precisions=("int8",), calibration_size=48, opset=18,
    )  # fmt: skip


def _manifest(out: Path) -> dict:
    return json.loads((out / "openvino" / "int8" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def recovered(data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The outlier net exported with accuracy control; 5 test images slipped into its validation images."""
    model = ColourNet(*data["train"], outlier=OUTLIER).eval()
    out = tmp_path_factory.mktemp("exports") / "1"
    report = _export(model, data, out, "accuracy_control", validation=data["val"][0] + data["test"][0][:5])
    return {"model": model, "dir": out, "report": report}


def test_refused_int8_is_recovered_by_accuracy_control_on_validation_only(recovered: dict, data: dict) -> None:
    report, out = recovered["report"], recovered["dir"]
    q = report["int8_recovery"]
    assert q["ptq"]["promotable"] is False and q["ptq"]["accuracy_drop"] > 50  # plain INT8 collapses to one class
    assert q["retry"] == {"accuracy_drop": 0.0, "agreement": 100.0, "promotable": True}
    assert q["method"] == "accuracy_control" and q["tried"] and report["promotable"]["int8"] and report["int8_ok"]
    assert report["accuracy"]["int8"] == report["accuracy"]["pytorch"] == 100.0
    assert q["float_layers"] == [HEAD]  # NNCF put back in float only the layer whose input carries the outlier
    tensors = [preprocess_image(x, PRE)[None] for x in data["val"][0]]
    assert q["validation"] == calibration_fingerprint(tensors)  # measured on the validation images, test ones dropped
    assert _manifest(out)["quantization"] == q
    assert load_artifact(out / "openvino" / "int8").manifest["quantization"]["method"] == "accuracy_control"
    assert sorted(p.name for p in (out / "openvino").iterdir()) == ["int8"]  # the retry renamed into place


def test_ignored_scope_keeps_stem_and_classifier_in_float(recovered: dict, data: dict, tmp_path: Path) -> None:
    calibration = [preprocess_image(x, PRE)[None] for x in data["train"][0]]
    xml, info = recovery.rebuild_int8(
        "ignored_scope", recovered["dir"] / "model.onnx", tmp_path / "int8", calibration, [], 1.0, None
    )
    assert info["float_layers"] == [STEM, HEAD] and {STEM, HEAD} <= set(info["ignored"])  # the middle stays INT8
    r = verify(recovered["model"], {"int8": xml}, *data["test"], PRE)
    assert r["accuracy_drop"]["int8"] == 0.0 and r["promotable"]["int8"]


def test_promotable_int8_never_runs_the_retry(monkeypatch) -> None:
    monkeypatch.setattr(recovery, "rebuild_int8", lambda *a, **kw: pytest.fail("INT8 passed the gate: no retry"))
    arts = {"onnx": Path("m.onnx"), "int8": Path("openvino/int8/model.xml")}
    passed = _refused_report() | {"promotable": {"onnx": True, "int8": True}}
    kw = dict(calibration=[], eval_images=[], eval_labels=[], pre=PRE, max_drop=None, model_type=None)
    kw |= dict(class_names=CLASSES, decision=None)
    out, rec = recovery.recover_int8(None, arts, passed, method="accuracy_control", validation_images=[1], **kw)
    assert out is passed and rec == {"method": "ptq", "recovery": "accuracy_control", "tried": False}


def test_promotable_int8_export_never_runs_the_retry(data: dict, tmp_path: Path, monkeypatch) -> None:
    """The same net without the outlier quantizes well: the export keeps plain INT8 and never retries."""
    monkeypatch.setattr(recovery, "rebuild_int8", lambda *a, **kw: pytest.fail("INT8 passed the gate: no retry"))
    report = _export(ColourNet(*data["train"], outlier=0.0).eval(), data, tmp_path / "v", "accuracy_control", [])
    assert report["promotable"]["int8"] and report["int8_recovery"]["tried"] is False
    assert _manifest(tmp_path / "v")["quantization"]["method"] == "ptq"


def _refused_report() -> dict:
    return {"parity_ok": True, "promotable": {"onnx": True, "int8": False}, "accuracy_drop": {"int8": 9.0}}


def test_no_retry_for_none_for_a_wrong_graph_or_without_validation_images(monkeypatch) -> None:
    monkeypatch.setattr(recovery, "rebuild_int8", lambda *a, **kw: pytest.fail("no retry may run"))
    arts = {"onnx": Path("m.onnx"), "int8": Path("openvino/int8/model.xml")}
    kw = dict(calibration=[], eval_images=[], eval_labels=[], pre=PRE, max_drop=None, model_type=None)
    kw |= dict(class_names=CLASSES, decision=None)
    refused = _refused_report()
    assert recovery.recover_int8(None, arts, refused, method="none", validation_images=[], **kw)[1]["tried"] is False
    wrong_graph = refused | {"parity_ok": False}  # every artifact is refused: quantization cannot fix that
    _, rec = recovery.recover_int8(None, arts, wrong_graph, method="ignored_scope", validation_images=[], **kw)
    assert rec == {"method": "ptq", "recovery": "ignored_scope", "tried": False}
    _, rec = recovery.recover_int8(None, arts, refused, method="accuracy_control", validation_images=[], **kw)
    assert rec["tried"] is False and "no validation images" in rec["skipped"]


def test_a_failed_retry_keeps_plain_int8_refused_and_the_export_going(monkeypatch) -> None:
    def fail(*a, **kw):
        raise QuantizeError("NNCF accuracy-aware INT8 quantization failed (boom)")

    monkeypatch.setattr(recovery, "rebuild_int8", fail)
    arts = {"onnx": Path("m.onnx"), "int8": Path("openvino/int8/model.xml")}
    kw = dict(calibration=[], eval_images=[], eval_labels=[], pre=PRE, max_drop=None, model_type=None)
    refused = _refused_report()
    out, rec = recovery.recover_int8(None, arts, refused, method="ignored_scope", validation_images=[],
                                     class_names=CLASSES, decision=None, **kw)  # fmt: skip
    assert out is refused and rec["tried"] and "boom" in rec["error"] and rec["method"] == "ptq"


def test_a_line_must_keep_its_decisions_not_only_its_top_class() -> None:
    """With a threshold, an image whose top class stays "grey" but whose P(grey) falls under it disagrees."""
    see = recovery.line_outcome({"ok_class": "grey", "threshold": 0.9}, CLASSES)
    sure, unsure = np.array([0.0, 0.0, 0.0, 5.0]), np.array([0.0, 0.0, 0.0, 2.0])  # P(grey) 0.98 and 0.71
    assert see(sure) == (3, "ok") and see(unsure) == (3, "reject")
    assert recovery.line_outcome({"ok_class": "grey"}, CLASSES) is None  # no threshold: top-1 alone
    assert recovery.line_outcome(None, CLASSES) is None


def test_validation_tensors_drop_the_eval_images() -> None:
    (val, _), (test, _) = colour_images(4, 1), colour_images(4, 2)
    kept = recovery.validation_tensors(val + [test[2], val[0]], test, PRE)
    assert [k.tobytes() for k in kept] == [preprocess_image(x, PRE)[None].tobytes() for x in val + [val[0]]]


def test_unknown_method_fails_before_any_export(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="int8_recovery='qat'.*ignored_scope, accuracy_control, none"):
        _export(nn.Linear(1, 1), {"train": ([], []), "test": ([], [])}, tmp_path / "v", "qat", [])
    assert not (tmp_path / "v").exists()
