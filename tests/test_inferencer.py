"""The one model runner: `open_inferencer` opens every kind of artifact and answers exactly what the sessions each
module used to build itself answer (OpenVINO compiled from the IR file, an ONNX Runtime session on the file, the
PyTorch module); the precision table is the one place the layout and the choices come from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import pytest
import timm
import torch
from PIL import Image

from deploy.compile.export import export_all
from deploy.compile.inferencer import TorchInferencer, open_inferencer
from deploy.edge.artifact import ArtifactError, build_manifest
from deploy.edge.inferencer import ModelCard, OnnxRuntimeInferencer, OpenVINOInferencer
from deploy.edge.inferencer import open_inferencer as open_exported
from deploy.edge.precision import BUILDABLE, DEFAULT, PRECISIONS, SERVED, SOURCE, artifact_dir, for_manifest
from spt_core.portable.preprocess import Preprocess, preprocess_batch

CLASSES = ["ok", "scratch", "spot"]
PRE = Preprocess(size=(32, 32))


def _images(n: int, seed: int) -> list[np.ndarray]:
    """Random RGB frames of assorted sizes (uint8): preprocessing resizes them, as it does camera frames."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(24, 64, size=(n, 2))
    return [rng.integers(0, 256, size=(int(h), int(w), 3), dtype=np.uint8) for h, w in sizes]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", num_classes=len(CLASSES)).eval()


@pytest.fixture(scope="module")
def export_dir(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "1"
    images = _images(12, seed=1)
    export_all(model, PRE, CLASSES, out, calibration_images=images, eval_images=images, eval_labels=[0, 1, 2] * 4,
               model_name="test_efficientnet", model_version=1, plan_hash=None, data_version=None,
               precisions=("fp32",), calibration_size=4, opset=18,
               decision={"ok_class": "ok", "threshold": 0.5})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return preprocess_batch(_images(5, seed=2), PRE)  # (5, 3, 32, 32)


def _old_openvino(xml: Path, x: np.ndarray) -> np.ndarray:
    """How verify, predict and the benchmarks each compiled an IR before: from the file, with the f32 hint."""
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.array(compiled.create_infer_request().infer({compiled.input("input"): x})[compiled.output("logits")])


def _old_onnxruntime(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def _bare_copy(src: Path, dst: Path, names: tuple[str, ...]) -> Path:
    """The model files without their manifest: what export verifies before it seals."""
    dst.mkdir(parents=True)
    for n in names:
        shutil.copy2(src / n, dst / n)
    return dst / names[0]


def test_every_kind_of_artifact_gives_the_old_sessions_logits(
    export_dir: Path, model: torch.nn.Module, x: np.ndarray, tmp_path: Path
) -> None:
    ov_dir = export_dir / "openvino/fp32"
    ov_ref, ort_ref = _old_openvino(ov_dir / "model.xml", x), _old_onnxruntime(export_dir / "model.onnx", x)
    with torch.inference_mode():
        torch_ref = model(torch.from_numpy(x)).float().numpy()
    assert np.abs(ov_ref - torch_ref).max() < 1e-4 and not np.array_equal(ov_ref, torch_ref)  # three real sessions

    bare = {_bare_copy(ov_dir, tmp_path / "ir", ("model.xml", "model.bin")),
            _bare_copy(export_dir, tmp_path / "onnx", ("model.onnx",))}  # fmt: skip
    openvino = [export_dir, (export_dir, "fp32"), ov_dir, ov_dir / "model.xml", ov_dir / "model.bin"]
    openvino.append(tmp_path / "ir/model.xml")
    onnx = [(export_dir, "onnx"), export_dir / "model.onnx", tmp_path / "onnx/model.onnx"]
    for kinds, runtime, ref in ((openvino, "openvino", ov_ref), (onnx, "onnxruntime", ort_ref)):
        for k in kinds:
            path, precision = k if isinstance(k, tuple) else (k, None)
            for factory in (open_exported, open_inferencer):  # the edge's, and the compile side's that delegates
                inf = factory(path, precision)
                assert inf.runtime == runtime, k
                assert np.array_equal(inf.infer(x), ref), k  # bit-identical: same graph, same properties
            assert (inf.card is None) == (path in bare), k  # only a sealed artifact says what its logits mean

    info = {"class_names": CLASSES, "preprocess": PRE.to_dict(), "ok_class": "ok", "threshold": 0.5}
    loaded = open_inferencer(tmp_path / "merged.safetensors", torch_loader=lambda p: (model, info))
    assert isinstance(loaded, TorchInferencer) and loaded.source.endswith("merged.safetensors")
    assert np.array_equal(loaded.infer(x), torch_ref) and loaded.class_names == CLASSES
    assert np.array_equal(open_inferencer(model).infer(x), torch_ref)


def test_sealed_runtimes_answer_a_frame_as_the_edge_does(export_dir: Path, model: torch.nn.Module) -> None:
    frame = Image.fromarray(_images(1, seed=3)[0])
    card = ModelCard.of(open_exported(export_dir).artifact)
    answers = {
        "openvino": open_exported(export_dir).predict(frame),
        "onnxruntime": open_exported(export_dir, "onnx").predict(frame),
        "torch": open_inferencer(model, card=card).predict(frame),
    }
    for runtime, a in answers.items():
        assert a["class"] in CLASSES and a["decision"] in ("ok", "reject"), runtime
        assert a["latency_ms"] > 0 and a["queue_ms"] >= 0, runtime
        assert (a["decision"] == "ok") == (a["p_good"] >= 0.5), runtime  # the manifest's threshold decides
    scores = [a["score"] for a in answers.values()]
    assert len({a["class"] for a in answers.values()}) == 1 and max(scores) - min(scores) < 1e-5


def test_wrong_paths_and_precisions_are_one_line_errors(export_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    bare = _bare_copy(export_dir, tmp_path / "bare", ("model.onnx",))
    cases = [
        (lambda: open_exported(export_dir, "fp8"), "precision='fp8': use one of onnx, fp32"),
        (lambda: open_exported(export_dir, "int8"), "no int8 artifact in this export"),  # not built
        (lambda: open_exported(export_dir / "openvino/fp32", "fp16"), "holds fp32, not fp16"),
        (lambda: open_exported(bare, "fp32"), "an onnx file, but precision fp32 is openvino"),
        (lambda: open_inferencer(tmp_path / "weights"), "not an exported artifact; pass torch_loader"),
        (lambda: open_exported(bare).predict(Image.new("RGB", (8, 8))), "no manifest.json, so no class names"),
        (lambda: OpenVINOInferencer.from_artifact(open_exported(export_dir, "onnx").artifact), "serves OpenVINO IR"),
    ]
    for call, needle in cases:
        with pytest.raises(ArtifactError, match=needle) as e:
            call()
        assert "\n" not in str(e.value)


def test_the_table_is_the_one_layout(export_dir: Path, tmp_path: Path) -> None:
    report = json.loads((export_dir / "export_report.json").read_text())
    for name, rel in report["artifacts"].items():  # export writes where the table says
        assert (export_dir / rel).resolve() == artifact_dir(export_dir, name).resolve()
        m = json.loads((artifact_dir(export_dir, name) / "manifest.json").read_text())
        assert for_manifest(m["format"], m["precision"]) is PRECISIONS[name]
        assert m["runtime_config"] == dict(PRECISIONS[name].runtime_config)
    assert SOURCE not in BUILDABLE and SERVED in DEFAULT and "onnx_int8" in BUILDABLE and "onnx_int8" not in DEFAULT
    assert len({p.path for p in PRECISIONS.values()}) == len(PRECISIONS)  # one directory per precision
    for row in PRECISIONS.values():  # a manifest's format + precision name exactly one row
        assert for_manifest(row.format, row.weights) is row

    from pipelines import config

    choices = next(k.choices for k in config.keys() if k.dotted == "export.precisions")
    assert tuple(choices) == BUILDABLE and config.ExportSection().precisions == list(DEFAULT)
    d = tmp_path / "onnx-fp16"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"")
    with pytest.raises(ArtifactError, match=r"precision='fp16' for a onnx artifact: use one of fp32, int8"):
        build_manifest(d, precision="fp16", model_name="m", class_names=CLASSES, pre=PRE, model_version=1,
                       plan_hash=None, data_version=None, versions={"sensitune": "0"})  # fmt: skip
    assert OnnxRuntimeInferencer.runtime == "onnxruntime"


def test_the_gate_scores_a_registered_model_through_the_runner(tmp_path: Path, x: np.ndarray, monkeypatch) -> None:
    """`registry_scores` (the hand-over gate) gives what MLflow's own pyfunc predict gives, logit for logit."""
    monkeypatch.chdir(tmp_path)  # a sqlite store's default artifact root is ./mlruns: keep it out of the checkout
    from safetensors.torch import save_file

    from pipelines.assess import held_out_scores, registry_scores
    from pipelines.tracking.common import mlflow_session
    from pipelines.tracking.registry import register_model
    from spt_core.model import create_model
    from spt_core.portable.metrics import softmax
    from spt_core.portable.operating_point import OperatingPoint

    args = {"name": "test_efficientnet", "num_classes": 3, "weights": "none", "img_size": 32, "drop_path_rate": 0.0}
    torch.manual_seed(0)
    net, _ = create_model(**args)
    images, labels = [], [CLASSES[i % 3] for i in range(12)]
    for i, im in enumerate(_images(12, seed=4)):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(images[-1])
    with torch.inference_mode():
        p_ok = softmax(net(torch.from_numpy(preprocess_batch(images, PRE))).numpy())[:, 0]
    info = {"model_args": args, "class_names": CLASSES, "preprocess": PRE.to_dict(), "ok_class": "ok",
            "threshold": float(np.median(p_ok)), "plan_hash": "p", "data_hash": "d"}  # fmt: skip
    merged = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, merged, {"sensitune": json.dumps(info)})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_session(uri) as mlflow:
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        with mlflow.start_run():
            model = {"name": "gate", "merged": str(merged), "input_size": [32, 32], "num_classes": 3, "info": info,
                     "version_tags": {}}  # fmt: skip
            version = register_model(mlflow, client, model)
        pyfunc = mlflow.pyfunc.load_model(f"models:/gate/{version}")
    assert np.array_equal(open_inferencer(pyfunc.unwrap_python_model().model).infer(x), pyfunc.predict(x))

    got = registry_scores(uri, f"models:/gate/{version}", images, labels)
    probs = softmax(pyfunc.predict(preprocess_batch(images, PRE)))
    assert got == held_out_scores(probs, labels, CLASSES, OperatingPoint.from_dict(info, where="test"))
    assert 0 < got["overkilled"] + got["escaped"] < len(images)  # a threshold in the middle: decisions vary
