"""Export: ONNX + OpenVINO FP32/FP16/INT8 on tiny timm models, verified on real (skimage) images, CPU only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from support.images import photo_crops
from torch import nn

import deploy.compile.export as export_mod
from deploy.compile.build import ExportError, compile_openvino, ir_weight_types
from deploy.compile.export import export_all, export_onnx, onnx_opset, write_manifest
from deploy.compile.quantize import calibration_fingerprint, nncf_model_type
from deploy.compile.verify import verify
from deploy.edge.artifact import ArtifactError, load_artifact
from deploy.edge.inferencer import OpenVINOInferencer, open_inferencer
from spt_core.model import create_model
from spt_core.portable.io import file_sha256
from spt_core.portable.preprocess import Preprocess, preprocess_batch, preprocess_image

CLASSES = ["coffee", "astronaut", "brick", "chelsea"]
PRE = Preprocess(size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CONTRACT_KEYS = set(  # docs/ARCHITECTURE.md, "Artifacts"
    "format precision model_version model_name class_names preprocess input_name output_name sensitune_version "
    "plan_hash data_version files created".split()
)




def _fit_centroid_head(model: nn.Module, images: list[np.ndarray], labels: list[int]) -> None:
    """Turn a timm backbone into a real 4-class classifier: nearest class centroid of standardised features.

    logit_k = z . c_k - |c_k|^2 / 2 with z = (f - mu) / sd, written into the linear head and scaled to |logit| <= 10
    (trained-model range, where an absolute parity tolerance of 1e-4 is meaningful).
    """
    y = torch.tensor(labels)
    with torch.no_grad():
        x = torch.from_numpy(preprocess_batch(images, PRE))
        f = model.forward_head(model.forward_features(x), pre_logits=True)  # (N, D)
        mu, sd = f.mean(0), f.std(0) + 1e-6
        c = torch.stack([((f[y == k] - mu) / sd).mean(0) for k in range(len(CLASSES))])  # (K, D)
        w, b = c / sd, -(c * mu / sd).sum(1) - 0.5 * (c * c).sum(1)
        scale = 10.0 / (f @ w.T + b).abs().max()
        head = model.get_classifier()
        head.weight.copy_(w * scale)
        head.bias.copy_(b * scale)


# export_all's options the pipeline takes from params.yaml's export section (no library defaults)
EXPORT_SECTION = dict(precisions=("fp32", "fp16", "int8"), opset=18)


def _export_kw(data: dict[str, list], **overrides) -> dict:
    kw = dict(calibration_images=data["train"], eval_images=data["test"], eval_labels=data["y_test"])
    kw |= dict(model_name="m", model_version=1, plan_hash=None, data_version=None, calibration_size=300)
    return kw | EXPORT_SECTION | overrides


def _manifest_kw(precision: str, **overrides) -> dict:
    kw = dict(precision=precision, model_name="m", class_names=CLASSES, pre=PRE, model_version=1)
    return kw | dict(plan_hash=None, data_version=None) | overrides


@pytest.fixture(scope="module")
def data() -> dict[str, list]:
    train, y_train = photo_crops(8, seed=0)
    test, y_test = photo_crops(6, seed=1)
    return {"train": train, "y_train": y_train, "test": test, "y_test": y_test}


@pytest.fixture(scope="module")
def lite0(data: dict[str, list]) -> nn.Module:
    """The offline ImageNet Lite0 with a centroid head: realistic activations, so INT8 behaves as in production
    (a random-init Lite0 has no meaningful activation ranges and quantizes to noise, correlation ~0.7)."""
    model, _ = create_model("tf_efficientnet_lite0", num_classes=len(CLASSES), weights="embedded")
    _fit_centroid_head(model.eval(), data["train"], data["y_train"])
    return model


def test_random_init_lite0_parity_with_legacy_exporter(data: dict[str, list], tmp_path: Path) -> None:
    """The fallback exporter on Lite0's dynamic "same" padding graph; random init gives large logits (strict)."""
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=len(CLASSES)).train()
    onnx_path = export_onnx(model, PRE, tmp_path / "model.onnx", opset=17, dynamo=False)
    assert model.training  # exported in eval mode (BN running stats), the caller's mode restored
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"] and onnx_opset(onnx_path) == 17  # no temp files
    xml = compile_openvino(onnx_path, tmp_path / "fp32", "fp32") / "model.xml"
    r = verify(model.eval(), {"onnx": onnx_path, "fp32": xml}, data["test"], data["y_test"], PRE)
    assert r["max_abs_diff"]["onnx"] <= 1e-4 and r["max_abs_diff"]["fp32"] <= 1e-4 and r["passed"]


@pytest.fixture(scope="module")
def exported(lite0: nn.Module, data: dict[str, list], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("exports")
    report = export_all(
        lite0,
        PRE,
        CLASSES,
        root / "3",
        calibration_images=data["train"],
        eval_images=data["test"],
        eval_labels=data["y_test"],
        model_name="tf_efficientnet_lite0",
        model_version=3,
        plan_hash="abc123",
        data_version="d1",
        calibration_size=16,
        **EXPORT_SECTION,
    )
    return {"root": root, "dir": root / "3", "report": report}


def test_export_all_parity_accuracy_and_layout(exported: dict) -> None:
    out, report = exported["dir"], exported["report"]
    assert sorted(p.name for p in exported["root"].iterdir()) == ["3"]  # no staging dir left behind
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    for p in ("fp32", "fp16", "int8"):
        assert sorted(f.name for f in (out / "openvino" / p).iterdir()) == ["manifest.json", "model.bin", "model.xml"]
    assert json.loads((out / "export_report.json").read_text()) == json.loads(json.dumps(report))

    assert report["max_abs_diff"]["onnx"] <= 1e-4 and report["max_abs_diff"]["fp32"] <= 1e-4
    assert report["parity_ok"] and report["passed"]
    acc = report["accuracy"]
    assert acc["pytorch"] >= 75.0  # the centroid head really classifies (chance: 25 %)
    assert acc["onnx"] == acc["fp32"] == acc["pytorch"]
    assert set(acc) == {"pytorch", "onnx", "fp32", "fp16", "int8"}
    assert report["correlation"]["fp16"] > 0.999 and report["correlation"]["int8"] > 0.95
    assert report["agreement"]["int8"] >= 90.0
    assert report["int8_ok"] == (report["accuracy_drop"]["int8"] <= 1.0)
    assert report["onnx_opset"] == onnx_opset(out / "model.onnx") >= 17


def test_manifests_follow_the_contract(exported: dict, data: dict[str, list]) -> None:
    out, report = exported["dir"], exported["report"]
    for fmt, rel in report["artifacts"].items():
        m = json.loads((out / rel / "manifest.json").read_text())
        assert CONTRACT_KEYS <= m.keys()
        assert m["format"] == ("onnx" if fmt == "onnx" else "openvino")
        assert (m["precision"], m["model_version"], m["class_names"]) == (
            "fp32" if fmt == "onnx" else fmt,
            "3",
            CLASSES,
        )
        assert (m["input_name"], m["output_name"], m["plan_hash"], m["data_version"]) == (
            "input",
            "logits",
            "abc123",
            "d1",
        )
        assert Preprocess.from_dict(m["preprocess"]) == PRE
        assert m["files"] == {name: file_sha256(out / rel / name) for name in m["files"]}
        assert m["onnx_opset"] == report["onnx_opset"] and m["promotable"] == report["promotable"][fmt]
        assert "ok_class" in m and m["ok_class"] is None  # no decision given: recorded as plain classification
        assert m["verification"]["max_abs_diff"] == report["max_abs_diff"][fmt]
        assert {"openvino", "onnx", "torch"} <= m["versions"].keys()
        if fmt != "onnx":  # the edge compiles with this: without it the CPU plugin computes in bf16 on AMX/BF16 CPUs
            assert m["runtime_config"] == {"INFERENCE_PRECISION_HINT": "f32"}
    int8 = json.loads((out / "openvino/int8/manifest.json").read_text())
    idx = np.unique(np.linspace(0, len(data["train"]) - 1, 16))  # export_all's evenly spaced calibration subset
    calib = [preprocess_image(data["train"][int(i)], PRE)[None] for i in idx]
    assert int8["calibration"] == calibration_fingerprint(calib) and int8["calibration"]["size"] == 16


def test_each_openvino_manifest_says_which_input_variant_it_ships(exported: dict) -> None:
    """export.graph_preprocess auto: the graph variant where its parity on the eval images holds, else host."""
    out, report = exported["dir"], exported["report"]
    for fmt, rel in report["artifacts"].items():
        m = json.loads((out / rel / "manifest.json").read_text())
        if fmt == "onnx":
            assert m["input_variant"] == "host" and "graph_preprocess" not in m
            continue
        parity = m["graph_preprocess"]["parity"]
        assert (parity["split"], parity["n_images"], m["graph_preprocess"]["resize"]) == ("test", 24, "bicubic_pillow")
        passed = parity["agreement"] >= 99.0 and parity["max_dp"] <= 0.01
        assert parity["passed"] == passed and m["input_variant"] == ("graph" if passed else "host")
        assert report["graph_preprocess"][fmt]["input_variant"] == m["input_variant"]
    assert json.loads((out / "openvino/fp32/manifest.json").read_text())["input_variant"] == "graph"


def test_ir_weights_really_have_their_precision(exported: dict) -> None:
    ov_dir = exported["dir"] / "openvino"
    proto = onnx.load(str(exported["dir"] / "model.onnx"))
    n_float = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    fp32_bytes = (ov_dir / "fp32/model.bin").stat().st_size
    assert abs(fp32_bytes - 4 * n_float) / (4 * n_float) < 0.01  # 4 bytes per weight
    assert "f16" not in ir_weight_types(ov_dir / "fp32/model.xml")
    assert ir_weight_types(ov_dir / "fp16/model.xml")["f16"] > 0
    assert 0.45 < (ov_dir / "fp16/model.bin").stat().st_size / fp32_bytes < 0.55
    assert (ov_dir / "int8/model.bin").stat().st_size / fp32_bytes < 0.35


def test_loaded_artifacts_match_pytorch_at_any_batch_size(exported: dict, lite0: nn.Module, data: dict) -> None:
    for n in (1, 3):  # dynamic batch axis
        x = preprocess_batch(data["test"][:n], PRE)
        with torch.no_grad():
            ref = lite0(torch.from_numpy(x)).numpy()
        for name in ("fp32", "onnx"):  # OpenVINO FP32 and the ONNX file, each by its precision in the export dir
            assert np.abs(open_inferencer(exported["dir"], name).infer(x) - ref).max() <= 1e-4
    artifact = load_artifact(exported["dir"] / "openvino/fp32")
    compiled = OpenVINOInferencer.from_artifact(artifact).compiled
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")
    assert artifact.manifest["model_version"] == "3"


def test_int8_flag_follows_the_accuracy_budget(exported: dict, lite0: nn.Module, data: dict) -> None:
    drop = exported["report"]["accuracy_drop"]["int8"]
    arts = {"int8": exported["dir"] / "openvino/int8"}
    for budget, ok in ((drop, True), (drop - 0.5, False)):
        r = verify(lite0, arts, data["test"], data["y_test"], PRE, max_drop={"int8": budget})
        assert r["accuracy_drop"]["int8"] == drop  # deterministic
        assert r["int8_ok"] is ok and r["promotable"]["int8"] is ok
        assert r["passed"]  # a weak INT8 is flagged, it does not fail the export


def test_int8_that_passes_more_defects_than_pytorch_is_not_promotable(exported: dict, lite0: nn.Module, data: dict):
    """Accuracy within budget is not enough: at the line's operating point an INT8 model must let no more defective
    parts through than PyTorch does on the same images (escapes); a threshold where they differ flips promotable."""
    from deploy.compile.inferencer import TorchInferencer, open_inferencer
    from spt_core.portable.metrics import softmax
    from spt_core.portable.preprocess import preprocess_batch

    x = preprocess_batch(data["test"], PRE)
    runners = {"pytorch": TorchInferencer(lite0), "int8": open_inferencer(exported["dir"] / "openvino/int8", "int8")}
    p_good = {k: softmax(inf.infer(x))[:, 0] for k, inf in runners.items()}  # ok_class "coffee", index 0
    defect = np.asarray(data["y_test"]) != 0
    escapes = lambda k, t: int(np.sum(defect & (p_good[k] >= t)))  # noqa: E731
    cuts = np.unique(np.concatenate([p_good["pytorch"][defect], p_good["int8"][defect]]))
    worse = max(cuts, key=lambda t: escapes("int8", t) - escapes("pytorch", t))  # INT8's worst threshold here
    assert escapes("int8", worse) > escapes("pytorch", worse)  # the fixture's INT8 does differ somewhere
    arts = {"int8": exported["dir"] / "openvino/int8"}
    lax = {"int8": 100.0}  # accuracy is never the reason below
    for t, ok in ((float(worse), False), (float(np.nextafter(1.0, 2.0)), True)):  # rejects all: no escape
        r = verify(lite0, arts, data["test"], data["y_test"], PRE, max_drop=lax,
                   decision={"ok_class": "coffee", "threshold": t}, class_names=CLASSES)  # fmt: skip
        assert r["defects"] == int(defect.sum())
        assert r["escapes"] == {"pytorch": escapes("pytorch", t), "int8": escapes("int8", t)}
        assert r["int8_escapes_ok"] is ok and r["promotable"]["int8"] is ok
    plain = verify(lite0, arts, data["test"], data["y_test"], PRE, max_drop=lax, decision={"ok_class": None},
                   class_names=CLASSES)  # fmt: skip
    assert "escapes" not in plain and plain["promotable"]["int8"]  # plain classification: accuracy alone


def _load_and_compile(d: Path) -> OpenVINOInferencer:
    return OpenVINOInferencer.from_artifact(load_artifact(d))


def _truncate_bin(d: Path) -> None:
    b = d / "model.bin"
    b.write_bytes(b.read_bytes()[: b.stat().st_size // 2])


def _edit_xml(d: Path) -> None:
    x = d / "model.xml"
    x.write_text(x.read_text().replace("<layers>", "<layerz>", 1))


def _bad_checksum(d: Path) -> None:
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["model.xml"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))


def _corrupt_bin_matching_checksum(d: Path) -> None:  # passes the checksum, so the runtime must catch it
    _truncate_bin(d)
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["model.bin"] = file_sha256(d / "model.bin")
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (_truncate_bin, "does not match"),
        (_edit_xml, "does not match"),
        (_bad_checksum, "does not match"),
        (_corrupt_bin_matching_checksum, "cannot be loaded"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda d: (d / "manifest.json").write_text('{"format": "openvino",'), "not valid JSON"),
        (lambda d: (d / "manifest.json").write_text('{"format": "openvino"}'), "lacks"),
        (lambda d: (d / "model.bin").unlink(), "model.bin is missing"),
        (lambda d: shutil.rmtree(d), "does not exist"),
    ],
    ids=[
        "truncated-bin",
        "edited-xml",
        "bad-checksum",
        "corrupt-bin",
        "no-manifest",
        "bad-json",
        "incomplete",
        "no-bin",
        "no-dir",
    ],
)
def test_corrupt_artifact_is_a_one_line_artifact_error(exported: dict, tmp_path: Path, corrupt, needle: str) -> None:
    d = tmp_path / "fp32"
    shutil.copytree(exported["dir"] / "openvino/fp32", d)
    _load_and_compile(d)  # the intact copy loads
    corrupt(d)
    with pytest.raises(ArtifactError, match=needle) as e:
        _load_and_compile(d)
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_existing_versions_are_never_overwritten(exported: dict, lite0: nn.Module, data: dict) -> None:
    out = exported["dir"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ExportError, match="already exists.*new model_version"):
        export_all(lite0, PRE, CLASSES, out, **_export_kw(data, model_version=3))
    with pytest.raises(ExportError, match="already exists"):
        compile_openvino(out / "model.onnx", out / "openvino/fp32", "fp32")
    with pytest.raises(ArtifactError, match="sealed artifact is never rewritten"):
        write_manifest(out / "openvino/fp16", **_manifest_kw("fp16", model_version=3))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=len(CLASSES), img_size=64).eval()


@pytest.fixture(scope="module")
def vit_onnx(vit: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(vit, PRE, tmp_path_factory.mktemp("vit") / "vit.onnx")


def test_vit_parity_onnx_and_openvino_fp32(vit: nn.Module, vit_onnx: Path, data: dict, tmp_path: Path) -> None:
    assert onnx_opset(vit_onnx) == 18
    xml = compile_openvino(vit_onnx, tmp_path / "fp32", "fp32") / "model.xml"
    r = verify(vit, {"onnx": vit_onnx, "fp32": xml}, data["test"], data["y_test"], PRE)
    assert r["max_abs_diff"]["onnx"] <= 1e-4 and r["max_abs_diff"]["fp32"] <= 1e-4 and r["parity_ok"]


def test_vit_int8_quantizes_as_transformer(vit: nn.Module, vit_onnx: Path, data: dict, tmp_path: Path) -> None:
    assert nncf_model_type(vit) == "transformer" and nncf_model_type(timm.create_model("test_efficientnet")) is None
    calib = [preprocess_image(im, PRE) for im in data["train"][::4]]
    xml = compile_openvino(vit_onnx, tmp_path / "int8", "int8", calibration=calib, model_type="transformer")
    r = verify(vit, {"int8": xml / "model.xml"}, data["test"], data["y_test"], PRE)
    assert r["correlation"]["int8"] > 0.9 and "int8" in r["accuracy"]


def test_failed_export_leaves_nothing(vit: nn.Module, data: dict, tmp_path: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise ExportError("simulated conversion failure")

    monkeypatch.setattr(export_mod, "build", boom)
    with pytest.raises(ExportError, match="simulated"):
        export_all(vit, PRE, CLASSES, tmp_path / "7", **_export_kw(data, precisions=("fp32",)))
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_one_line_errors(tmp_path: Path, vit: nn.Module, data: dict) -> None:
    kw = _export_kw(data)
    with pytest.raises(ExportError, match="precisions"):
        export_all(vit, PRE, CLASSES, tmp_path / "a", **(kw | {"precisions": ("fp8",)}))
    with pytest.raises(ExportError, match="3 class_names"):
        export_all(vit, PRE, CLASSES[:3], tmp_path / "a", **kw)
    with pytest.raises(ExportError, match="calibration"):
        export_all(vit, PRE, CLASSES, tmp_path / "a", **_export_kw(data, calibration_images=[]))
    (tmp_path / "d").mkdir()
    (tmp_path / "d/model.xml").write_bytes(b"")
    (tmp_path / "d/model.bin").write_bytes(b"")
    with pytest.raises(ArtifactError, match="calibration"):
        write_manifest(tmp_path / "d", **_manifest_kw("int8"))
    with pytest.raises(ArtifactError, match="overrides computed key"):
        write_manifest(tmp_path / "d", **_manifest_kw("fp32", extra={"files": {}}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_verify_reads_the_contract_not_export() -> None:
    """export calls verify, so verify takes the contract from deploy.edge.artifact and never imports export."""
    code = ("import sys, deploy.compile.verify\n"
            "assert 'deploy.compile.export' not in sys.modules, 'verify imports export'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
