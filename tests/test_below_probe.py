"""``train.below_probe``: a run whose tuned model is below the linear probe on validation exports the probe
(``export_probe``) or stops with nothing exported (``stop``); a tuned model above the probe is the model.

The set-ups, on digits (linearly separable: a probe on a random-init test_efficientnet's features fits them) with
``0`` as the good class, measured and planned once:
    CRIPPLED      the tuned model cannot move (a random head, lr ~0) while the probe fits: tuning cannot beat it;
    TUNING_WINS   the probe gets one epoch from a random head, tuning three at a real lr: tuning beats it.
Each test asserts its set-up's premise on validation first, so a changed premise fails loudly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipelines import cli, stages
from pipelines.assess import probe_warnings
from pipelines.below_probe import STOP_EXIT, ProbeModel, Saved, settle
from pipelines.config import load_params
from pipelines.layout import FILES
from pipelines.models import build_model, load_merged
from pipelines.training import data_loaders
from spt_core.api import ModelInfo, Plan, collect, fit_probe, head_only, read_tuned
from spt_core.portable.operating_point import OperatingPoint
from spt_core.probe import extract_features

BASE: dict[str, Any] = {
    "data": {"source": "digits", "split": None, "n_train": 40, "n_val": 20, "n_test": 20, "ok_class": "0",
             "min_per_class": 1},
    "model": {"name": "test_efficientnet", "weights": "none", "input_size": 32, "drop_path_rate": 0.0},
    "sensitivity": {"batches": 1, "batch_size": 8, "probe_epochs": 2, "device": "cpu"},
    "plan": {"budget": "5%"},
    "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "device": "cpu", "amp": False, "probe_epochs": 20},
    "export": {"precisions": ["fp32"], "calibration_size": 8},
}  # fmt: skip
CRIPPLED = {"head_init": "random", "lr": 1e-9, "min_lr": 0.0}
TUNING_WINS = {"head_init": "random", "probe_epochs": 1, "lr": 0.01, "epochs": 3}
PLANNED = ("sensitivity.safetensors", "plan.json", "plan.safetensors")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared digits, their sensitivity and plan (in base/), shared by every scenario."""
    root = tmp_path_factory.mktemp("below_probe")
    params = scenario(root, "base", {})[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages, "plot_plan", lambda *a, **k: None)  # plan.png is no input of train
        for s in stages.stages_until("plan"):
            s.run(params)
    return root


def scenario(root: Path, name: str, train: dict[str, Any]) -> tuple[dict, Path]:
    """(params, params.yaml) of run dir root/name with base's sensitivity and plan, and these train values."""
    run = root / name
    run.mkdir(exist_ok=True)
    for f in PLANNED if name != "base" else ():
        shutil.copy2(root / "base" / f, run / f)
    doc = {**BASE, "paths": {"raw": str(root / "raw"), "data": str(root / "prepared"), "run": str(run)},
           "train": {**BASE["train"], **train}}  # fmt: skip
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(doc))
    return load_params(config), config


def refit_probe(params: dict, info: dict) -> torch.nn.Module:
    """The probe fitted again, apart from the pipeline: a fresh build of the backbone, its head fitted on features."""
    fresh, _ = build_model(info["model_args"], params["train"]["seed"])
    loaders = data_loaders(params, ModelInfo.from_dict(info).preprocess, params["train"]["batch_size"], 0)
    fit_probe(fresh, loaders, epochs=params["train"]["probe_epochs"], seed=0, select=params["train"]["select"],
              ok_index=0, max_escape_rate=params["evaluate"]["max_escape_rate"])  # fmt: skip
    return fresh.eval()


def test_export_probe_carries_the_probe_on_the_frozen_backbone(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params, _ = scenario(root, "probe", CRIPPLED)
    run = Path(params["paths"]["run"])
    m = stages.train_stage(params)
    assert m["tuned"]["val_score"] < m["probe_val_score"]  # the premise: tuning cannot beat the probe on validation
    assert (m["model"], m["below_probe"], m["warnings"], m["val_score"]) == ("probe", True, [], m["probe_val_score"])
    assert m["outcome"].startswith("no candidate beats the linear probe on validation (balanced_accuracy ")
    assert "train.below_probe: export_probe" in m["outcome"]
    plan, _, meta = read_tuned(run / FILES["tuned"])
    assert plan.targets == [] and meta["info"]["model"] == "probe" and m["trainable"] == 0
    assert m["plan_hash"] == plan.hash() == head_only(Plan.load(run / FILES["plan"])).hash()
    assert stages.merge_stage(params)["model"] == "probe"

    model, info = load_merged(run / FILES["merged"])
    probe = refit_probe(params, info)
    torch.testing.assert_close(model.get_classifier().state_dict(), probe.get_classifier().state_dict())
    test = data_loaders(params, ModelInfo.from_dict(info).preprocess, 8, 0)["test"]
    feats, _ = extract_features(probe, test, torch.device("cpu"))  # (N, D) features of the pretrained backbone
    with torch.inference_mode():
        logits, expected = torch.cat([model(x) for x, _ in test]), probe.get_classifier()(feats)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # the probe's own operating point, chosen on validation, and its test numbers at it, as for any model
    names = info["class_names"]
    val_loader = data_loaders(params, ModelInfo.from_dict(info).preprocess, 8, 0)["val"]
    op = OperatingPoint.choose(*collect(model, val_loader)[:2], names, "0", params["evaluate"]["max_escape_rate"])
    assert (m["threshold"], info["threshold"]) == (op.threshold, op.threshold)
    at = op.metrics(*collect(model, test)[:2], names)
    assert (m["escape_rate"], m["overkill"]) == (at["at_threshold"]["escape_rate"]["value"],
                                                 at["at_threshold"]["overkill"]["value"])  # fmt: skip
    assert m["test_acc"] == at["accuracy"] == pytest.approx(m["probe_test_acc"])

    seen: dict[str, Any] = {}  # the export stage hands the probe on, marked (the real export: the slow test below)
    monkeypatch.setattr("deploy.compile.export.export_all", lambda model, *a, **kw: seen.update(kw) or {"passed": 1})
    stages.export_stage(params)
    assert (seen["model_kind"], seen["plan_hash"]) == ("probe", plan.hash())
    assert seen["decision"]["threshold"] == op.threshold


def test_stop_ends_the_run_at_train_with_nothing_exported(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    params, config = scenario(root, "stop", CRIPPLED)
    run = Path(params["paths"]["run"])
    (run / FILES["tuned"]).mkdir()  # an older run's model: a stopped run must not leave it to be merged
    (run / FILES["tuned"] / "tuned.json").write_text("{}")
    after_train = ("train", "evaluate", "merge", "export")  # `run` from train on (prepare .. plan ran in `root`)
    monkeypatch.setattr(cli, "run_order", lambda no_export=False: tuple(stages.stage(n) for n in after_train))
    assert cli.main(["run", "--config", str(config), "--below-probe", "stop", "-q"]) == STOP_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stopped: no candidate beats the linear probe on validation (balanced_accuracy ")
    assert "train.below_probe: stop" in err[-1]
    m = json.loads((run / FILES["metrics"]).read_text())
    assert m["stopped"] in err[-1] and m["model"] is None and m["val_score"] < m["probe_val_score"]
    written = {"metrics.json", "history.csv", "confusion.png", FILES["train_state"]}
    assert sorted(p.name for p in run.iterdir()) == sorted({*PLANNED, *written})  # no model, no temp files
    for verb in ("merge", "export"):  # by hand, too: nothing to merge or export
        assert cli.main([verb, "--config", str(config), "-q"]) == STOP_EXIT
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"stopped: nothing to {verb}: ")
    assert sorted(p.name for p in run.iterdir()) == sorted({*PLANNED, *written})


def test_a_tuned_model_above_the_probe_is_the_model(root: Path) -> None:
    params, _ = scenario(root, "tuned", TUNING_WINS)
    run = Path(params["paths"]["run"])
    m = stages.train_stage(params)
    assert m["val_score"] > m["probe_val_score"]  # the premise: tuning beats the probe on validation
    assert (m["model"], m["below_probe"], "outcome" in m, "tuned" in m) == ("tuned", False, False, False)
    plan, _, meta = read_tuned(run / FILES["tuned"])
    assert plan.hash() == Plan.load(run / FILES["plan"]).hash() == m["plan_hash"] and plan.trainable > 0
    assert meta["info"]["model"] == "tuned" and stages.merge_stage(params)["model"] == "tuned"


def _fake(threshold: float) -> tuple[Saved, ProbeModel]:
    """A tuned Saved and a probe, as data: the rule reads their numbers, not their weights."""
    plan = Plan(targets=[], indices={}, budget=5, structured="none", tuner_config={}, alpha=10.0, beta=5.0,
                backbone_params=100, meta={"ladder": [{"budget": "1%"}]})  # fmt: skip
    head = torch.nn.Linear(2, 2)
    at = {"accuracy": 0.5, "confusion": [[1, 1], [0, 2]]}
    op = OperatingPoint("ok", threshold, 0.005)
    return Saved(head, plan, {"model_args": {}}, {}), ProbeModel(head, op, {**op.to_dict(), "test": at, "val": at}, 0.7)


@pytest.mark.parametrize("rule", ["export_probe", "stop"])
def test_validation_alone_decides(rule: str) -> None:
    """Below on validation but far above on test: the probe (or the stop); above on validation but far below on
    test: the tuned model, and the probe is not even built."""
    base = {"select": "accuracy", "probe_val_acc": 0.75, "probe_best_epoch": 3, "by_kind": {"sparse": 5}}
    below = {**base, "val_score": 0.6, "probe_val_score": 0.75, "test_acc": 0.99, "probe_test_acc": 0.1}
    above = {**base, "val_score": 0.8, "probe_val_score": 0.75, "test_acc": 0.1, "probe_test_acc": 0.99}
    tie = {**base, "val_score": 0.75, "probe_val_score": 0.75}
    tuned, probe = _fake(0.25)
    for m in (above, tie):
        m["below_probe"] = bool(probe_warnings(m))
        kept = settle(m, tuned, lambda: pytest.fail("the probe was built for a tuned model not below it"),
                      below_probe=rule)  # fmt: skip
        assert kept is not None and kept.plan is tuned.plan and (m["model"], kept.info["model"]) == ("tuned", "tuned")
    below["below_probe"] = bool(probe_warnings(below))
    kept = settle(below, tuned, lambda: probe, below_probe=rule)
    if rule == "stop":
        assert kept is None and below["stopped"] == below["outcome"] and below["model"] is None
        return
    assert kept is not None and kept.model is probe.model and kept.plan.targets == [] and "ladder" not in kept.plan.meta
    assert (kept.info["model"], kept.info["threshold"], below["threshold"]) == ("probe", 0.25, 0.25)
    assert (below["val_score"], below["test_acc"], below["trainable"]) == (0.75, 0.5, 0)
    assert below["by_kind"] == {"sparse": 0}
    assert below["tuned"]["val_score"] == 0.6 and below["tuned"]["test_acc"] == 0.99


@pytest.mark.slow
def test_the_exported_probe_computes_the_probe(root: Path) -> None:
    """The real export (ONNX + OpenVINO FP32) of a probe: its logits are the probe's head on the backbone features,
    and every manifest says model: probe."""
    import onnxruntime as ort

    from deploy.edge.artifact import load_artifact
    from deploy.edge.precision import SOURCE, artifact_dir
    from spt_core.api import scan_split
    from spt_core.portable.preprocess import preprocess_batch

    params, _ = scenario(root, "exported", CRIPPLED)
    run = Path(params["paths"]["run"])
    for s in ("train", "merge", "export"):
        stages.stage(s).run(params)
    _, info = load_merged(run / FILES["merged"])
    for name in (SOURCE, "fp32"):
        assert load_artifact(artifact_dir(run / FILES["export"], name)).manifest["model"] == "probe"
    files = [p for p, _ in scan_split(Path(params["paths"]["data"]) / "test", info["class_names"])]
    x = preprocess_batch(files, ModelInfo.from_dict(info).preprocess)  # (N, 3, 32, 32)
    onnx = artifact_dir(run / FILES["export"], SOURCE) / "model.onnx"
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    exported = session.run(None, {session.get_inputs()[0].name: x})[0]
    probe = refit_probe(params, info)
    with torch.inference_mode():
        feats = probe.forward_head(probe.forward_features(torch.from_numpy(x)), pre_logits=True)
        expected = probe.get_classifier()(feats).numpy()
    np.testing.assert_allclose(exported, expected, atol=1e-4, rtol=1e-4)
