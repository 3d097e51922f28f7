"""ONNX Runtime static INT8 (`onnx_int8`, opt-in): a row of `deploy.edge.precision` and a builder in
`deploy.compile.build`, and nothing else: export builds it from the same calibration tensors as OpenVINO INT8,
verify records its parity and accuracy, and its accuracy budget decides whether it is promotable."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from support.images import photo_crops

from deploy.compile.export import export_all
from deploy.compile.quantize import calibration_fingerprint
from deploy.compile.verify import verify
from deploy.edge.artifact import ArtifactError, load_artifact
from deploy.edge.inferencer import OpenVINOInferencer, open_inferencer
from deploy.edge.precision import PRECISIONS, artifact_dir
from spt_core.portable.preprocess import Preprocess, preprocess_batch, preprocess_image

CLASSES = ["coffee", "astronaut", "brick", "chelsea"]
PRE = Preprocess(size=(48, 48), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))




@pytest.fixture(scope="module")
def data() -> dict[str, list]:
    train, y_train = photo_crops(8, seed=0)
    test, y_test = photo_crops(8, seed=1)
    return {"train": train, "y_train": y_train, "test": test, "y_test": y_test}


@pytest.fixture(scope="module")
def model(data: dict[str, list]) -> torch.nn.Module:
    """A tiny timm CNN made a real 4-class classifier: nearest class centroid of its standardised features, written
    into the head and scaled to |logit| <= 10 (75 % on the test crops, chance 25 %)."""
    torch.manual_seed(0)
    m = timm.create_model("test_efficientnet", num_classes=len(CLASSES)).eval()
    y = torch.tensor(data["y_train"])
    with torch.no_grad():
        f = m.forward_head(m.forward_features(torch.from_numpy(preprocess_batch(data["train"], PRE))), pre_logits=True)
        mu, sd = f.mean(0), f.std(0) + 1e-6
        c = torch.stack([((f[y == k] - mu) / sd).mean(0) for k in range(len(CLASSES))])  # (K, D)
        w, b = c / sd, -(c * mu / sd).sum(1) - 0.5 * (c * c).sum(1)
        scale = 10.0 / (f @ w.T + b).abs().max()
        m.get_classifier().weight.copy_(w * scale)
        m.get_classifier().bias.copy_(b * scale)
    return m


@pytest.fixture(scope="module")
def exported(model: torch.nn.Module, data: dict[str, list], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("exports") / "5"
    report = export_all(model, PRE, CLASSES, out, calibration_images=data["train"], eval_images=data["test"],
                        eval_labels=data["y_test"], model_name="test_efficientnet", model_version=5, plan_hash="p",
                        data_version="d", precisions=("int8", "onnx_int8"), calibration_size=16, opset=18)  # fmt: skip
    return {"dir": out, "report": report}


def test_onnx_int8_is_built_quantized_and_sealed_from_the_openvino_calibration(exported: dict, data: dict) -> None:
    out, report = exported["dir"], exported["report"]
    d = artifact_dir(out, "onnx_int8")
    assert d == out / "onnx/int8" and report["artifacts"]["onnx_int8"] == "onnx/int8"
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "model.onnx"]  # no pre-processing leftovers
    m = json.loads((d / "manifest.json").read_text())
    ov_int8 = json.loads((out / "openvino/int8/manifest.json").read_text())
    assert (m["format"], m["precision"], m["model_version"], m["runtime_config"]) == ("onnx", "int8", "5", {})
    idx = np.unique(np.linspace(0, len(data["train"]) - 1, 16))  # export_all's evenly spaced calibration subset
    expected = calibration_fingerprint([preprocess_image(data["train"][int(i)], PRE)[None] for i in idx])
    assert m["calibration"] == ov_int8["calibration"] == expected  # the very tensors OpenVINO INT8 saw
    assert "nncf_model_type" not in m and "nncf" not in m["versions"] and "onnxruntime" in m["versions"]
    graph = onnx.load(str(d / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights  # conv weights stored as int8, not only activations fake-quantized
    assert (d / "model.onnx").stat().st_size < 0.5 * (out / "model.onnx").stat().st_size


def test_verify_records_parity_and_accuracy_and_the_budget_decides(
    exported: dict, model: torch.nn.Module, data: dict
) -> None:
    report, out = exported["report"], exported["dir"]
    acc = report["accuracy"]
    assert acc["pytorch"] >= 60.0 and acc["onnx"] == acc["pytorch"]  # a real classifier, an exact ONNX file
    drop = report["accuracy_drop"]["onnx_int8"]
    assert drop == acc["pytorch"] - acc["onnx_int8"]
    assert report["onnx_int8_max_drop"] == PRECISIONS["onnx_int8"].max_drop == 1.0  # the row's default budget
    assert 0.9 < report["correlation"]["onnx_int8"] < 1.0 and report["max_abs_diff"]["onnx_int8"] > 1e-3  # quantized
    assert report["onnx_int8_ok"] == (drop <= 1.0) and report["promotable"]["onnx_int8"] == report["onnx_int8_ok"]
    m = json.loads((out / "onnx/int8/manifest.json").read_text())
    assert m["promotable"] == report["promotable"]["onnx_int8"]
    assert m["verification"]["accuracy_drop"] == drop
    assert m["verification"]["agreement"] == report["agreement"]["onnx_int8"]

    arts = {"onnx_int8": out / "onnx/int8"}  # the sealed artifact, checksums verified
    for budget, ok in ((drop, True), (drop - 0.5, False)):
        r = verify(model, arts, data["test"], data["y_test"], PRE, max_drop={"onnx_int8": budget})
        assert r["accuracy_drop"]["onnx_int8"] == drop  # deterministic
        assert r["onnx_int8_ok"] is ok and r["promotable"]["onnx_int8"] is ok and r["int8_ok"] is None
        assert r["passed"]  # a weak INT8 is flagged, it does not fail the export


def test_the_sealed_onnx_int8_runs_on_onnxruntime_but_not_on_the_edge(exported: dict, data: dict) -> None:
    out = exported["dir"]
    x = preprocess_batch(data["test"][:3], PRE)
    old = ort.InferenceSession(str(out / "onnx/int8/model.onnx"), providers=["CPUExecutionProvider"])
    for path, precision in ((out, "onnx_int8"), (out / "onnx/int8", None), (out / "onnx/int8/model.onnx", None)):
        inf = open_inferencer(path, precision)
        assert inf.runtime == "onnxruntime" and inf.artifact.precision == "int8"
        assert np.array_equal(inf.infer(x), old.run(["logits"], {"input": x})[0])
    with pytest.raises(ArtifactError, match="the edge serves OpenVINO IR"):
        OpenVINOInferencer.from_artifact(load_artifact(out / "onnx/int8"))
