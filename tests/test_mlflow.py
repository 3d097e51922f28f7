"""pipelines.tracking against a real `mlflow server` (sqlite backend, proxied artifacts) on 127.0.0.1.

A tiny real run (`tiny_run` of tests/conftest.py: demo defects, test_vit at 32 px, two epochs) is logged, read
back through MlflowClient, and the registered model is loaded as `models:/<name>@challenger` and compared with
`load_merged`. A closed port gives a warning, a fallback file, exit code 0, and the fallback is replayed once the
server is back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from support.params import RAW_MD5
from support.servers import free_port

from pipelines import track
from pipelines.layout import FILES
from pipelines.models import load_merged
from pipelines.tracking import FALLBACK_FILE, RECORD_FILE, TrackingWarning, git_commit, log_run, replay
from spt_core.data import load_dataset_info, scan_split
from spt_core.model import ModelInfo
from spt_core.portable.preprocess import preprocess_batch

NAME = "sensitune-test-tiny"


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_log_run_to_server_reads_back_and_registered_model_predicts(
    tiny_run: tuple[dict, Path, Path], mlflow_uri: str, tmp_path: Path
) -> None:
    import mlflow

    params, run, _ = tiny_run
    m = json.loads((run / "metrics.json").read_text())
    result = log_run(params, run, tracking_uri=mlflow_uri, model_name=NAME, tags={"origin": "test"},
                     register_alias="challenger")  # fmt: skip
    assert result["status"] == "logged", result
    assert result["model_name"] == NAME and result["alias"] == "challenger"
    client = _client(mlflow_uri)
    r = client.get_run(result["run_id"])
    assert r.info.status == "FINISHED"

    # params: every params.yaml value flattened, plus the exact trainable count by kind
    p = r.data.params
    assert p["train.lr"] == str(params["train"]["lr"]) and p["plan.budget"] == "5%" and p["model.name"] == "test_vit"
    assert p["export.precisions"] == '["fp32", "fp16", "int8"]' and p["data.n_test"] == "null"
    assert {k: int(p[f"trainable.{k}"]) for k in m["by_kind"]} == m["by_kind"]
    assert sum(m["by_kind"].values()) == m["trainable"] == int(p["trainable.total"])

    # per-epoch metrics with step = epoch, and the final numbers
    history = [line.split(",") for line in (run / "history.csv").read_text().splitlines()[1:]]
    val = client.get_metric_history(r.info.run_id, "val_acc")
    assert sorted((x.step, x.value) for x in val) == [(int(h[0]), float(h[3])) for h in history]
    assert len(client.get_metric_history(r.info.run_id, "train_loss")) == len(history) == 2
    final = r.data.metrics
    assert final["test_acc"] == m["test_acc"] and final["best_val_acc"] == m["val_acc"]
    assert final["probe_test_acc"] == m["probe_test_acc"] and final["trainable"] == m["trainable"]
    assert final["trainable_pct"] == pytest.approx(m["trainable_pct"]) and "peak_memory_mb" in final
    assert final["train_seconds"] == m["train_seconds"] and "sensitivity_seconds" in final
    assert final["export.accuracy.fp32"] == 50.0

    # tags: data versions, plan hash, git commit, version
    t = r.data.tags
    assert t["data.raw_md5"] == RAW_MD5 == t["data_version"]
    assert t["data.prepared_hash"] == load_dataset_info(Path(params["paths"]["data"])).data_hash
    assert t["plan_hash"] == m["plan_hash"] and t["sensitune.version"] == "0.1.0" and t["origin"] == "test"
    assert t.get("git.commit") == git_commit()[0]

    # artifacts
    names = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"plan.json", "plan.png", "tuned", "metrics.json"} <= names
    # no large file twice: the merged weights live only in the registered model, the export is publish's
    assert not names & {"merged", "export"}, names
    assert {a.path for a in client.list_artifacts(r.info.run_id, "tuned")} == {
        f"tuned/{f.name}" for f in (run / "tuned").iterdir()
    }
    got = Path(client.download_artifacts(r.info.run_id, "plan.json", str(tmp_path)))
    assert got.read_bytes() == (run / "plan.json").read_bytes()

    # registry: the new version carries the alias and tags
    mv = client.get_model_version_by_alias(NAME, "challenger")
    assert mv.version == result["model_version"] and mv.run_id == r.info.run_id
    assert mv.tags["plan_hash"] == m["plan_hash"] and mv.tags["data_version"] == RAW_MD5
    assert float(mv.tags["test_acc"]) == m["test_acc"]

    # the registered pyfunc model predicts what load_merged predicts, on real preprocessed test images
    reference, info = load_merged(run / FILES["merged"])
    names_ = load_dataset_info(Path(params["paths"]["data"])).class_names
    files = [f for f, _ in scan_split(Path(params["paths"]["data"]) / "test", names_)]
    x = preprocess_batch(files, ModelInfo.from_dict(info).preprocess)  # (N, 3, 32, 32) float32
    with torch.inference_mode():
        expected = reference(torch.from_numpy(x)).numpy()
    prev = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_registry_uri(mlflow_uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    finally:
        mlflow.set_tracking_uri(prev[0])
        mlflow.set_registry_uri(prev[1])
    logits = model.predict(x)
    assert logits.shape == (len(files), 4) and logits.dtype == np.float32
    assert np.abs(logits - expected).max() <= 1e-5
    probs = model.predict(x, params={"output": "probabilities"})
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == expected.argmax(1)).all()
    assert model.metadata.metadata["sensitune"]["class_names"] == names_


def test_unreachable_server_warns_falls_back_and_replays(
    tiny_run: tuple[dict, Path, Path], mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    params, run, config = tiny_run
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.warns(TrackingWarning, match="mlflow_fallback.json"):
        result = log_run(params, run, tracking_uri=dead, model_name=NAME)
    assert result["status"] == "fallback" and result["run_id"] is None and "URLError" in result["error"]
    saved = json.loads((run / FALLBACK_FILE).read_text())
    assert saved["tracking_uri"] == dead
    rec = saved["record"]
    assert rec["params"]["train.lr"] == str(params["train"]["lr"]) and rec["model"]["name"] == NAME
    assert {x["key"] for x in rec["metrics"]} >= {"val_acc", "train_loss", "test_acc", "trainable"}
    assert {Path(a["path"]).name for a in rec["artifacts"]} >= {"plan.json", "tuned"}  # the model goes by registry

    # the DVC track stage: same fallback, a one-line warning, exit code 0, the outcome in mlflow_run.json
    capsys.readouterr()
    assert track.main(["--config", str(config), "--tracking-uri", dead, "--model-name", NAME]) == 0
    err = capsys.readouterr().err
    assert f"warning: MLflow at {dead} failed" in err and "--replay" in err
    assert json.loads((run / RECORD_FILE).read_text())["status"] == "fallback"

    # the server is back: replay logs the saved run and registers a new version
    before = len(_client(mlflow_uri).search_model_versions(f"name='{NAME}'"))
    capsys.readouterr()
    assert track.main(["--replay", str(run / FALLBACK_FILE), "--tracking-uri", mlflow_uri]) == 0
    out = capsys.readouterr().out  # MLflow prints a "View run ... at: URL" line before the result
    replayed = json.loads(out[out.index("{\n") :])
    assert replayed["status"] == "logged"
    assert not (run / FALLBACK_FILE).exists() and (run / "mlflow_fallback.replayed.json").is_file()
    client = _client(mlflow_uri)
    assert client.get_run(replayed["run_id"]).data.params["train.lr"] == str(params["train"]["lr"])
    assert len(client.search_model_versions(f"name='{NAME}'")) == before + 1
    # a replay registers but gates nothing: no alias moves to it (`sensitune registry set` or a publish does)
    assert client.get_model_version(NAME, str(before + 1)).aliases == []


def test_track_without_a_trained_run_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "params.yaml"
    config.write_text(yaml.safe_dump({"paths": {"run": str(tmp_path / "nothing")}}))
    assert track.main(["--config", str(config), "--tracking-uri", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.json not found" in err and err.count("\n") == 1


def test_fallbacks_of_two_runs_are_both_kept_and_a_stale_replay_sends_no_files(
    tiny_run: tuple[dict, Path, Path], mlflow_uri: str, tmp_path: Path
) -> None:
    params, run, _ = tiny_run
    run2 = tmp_path / "run"
    shutil.copytree(run, run2, ignore=shutil.ignore_patterns("mlflow_*"))
    params2 = {**params, "paths": {**params["paths"], "run": str(run2)}}
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.warns(TrackingWarning):
        log_run(params2, run2, tracking_uri=dead)
    first = json.loads((run2 / FALLBACK_FILE).read_text())["record"]
    time.sleep(1.1)  # the retry's clock reads a later second: the record keeps the first one's `created`
    with pytest.warns(TrackingWarning):  # the same run again (a retry): still one file
        log_run(params2, run2, tracking_uri=dead)
    assert [f.name for f in run2.glob("mlflow_fallback*.json")] == [FALLBACK_FILE]

    # a later run in the same directory fails to log too: the first run's record is kept beside it
    metrics = json.loads((run2 / "metrics.json").read_text())
    (run2 / "metrics.json").write_text(json.dumps({**metrics, "test_acc": 0.125}))
    with pytest.warns(TrackingWarning):
        log_run(params2, run2, tracking_uri=dead)
    kept = [f for f in run2.glob("mlflow_fallback.*.json")]
    assert len(kept) == 1 and json.loads(kept[0].read_text())["record"] == first
    assert json.loads((run2 / FALLBACK_FILE).read_text())["record"]["fingerprint"] != first["fingerprint"]

    # replaying the first run now: its files were overwritten, so only params, metrics and tags are sent
    with pytest.warns(TrackingWarning, match="now holds another run"):
        result = replay(kept[0], tracking_uri=mlflow_uri)
    assert result["status"] == "logged" and result["model_version"] is None
    client = _client(mlflow_uri)
    r = client.get_run(result["run_id"])
    assert r.data.metrics["test_acc"] == metrics["test_acc"] and r.data.tags["sensitune.replay"] == "no-files"
    assert client.list_artifacts(r.info.run_id) == []


def test_mlflow_session_leaves_no_uri_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry that followed the tracking URI follows it again after a session, and mlflow's environment
    variables are as before (they would reach every later client and subprocess)."""
    import mlflow

    from pipelines.tracking.common import mlflow_session

    uri = {k: f"sqlite:///{tmp_path / k}.db" for k in "abc"}
    prev = mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    try:
        mlflow.set_tracking_uri(uri["a"])
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        with mlflow_session(uri["b"]):
            assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (uri["b"], uri["b"])
        assert mlflow.get_tracking_uri() == uri["a"]
        assert "MLFLOW_REGISTRY_URI" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ
        mlflow.set_tracking_uri(uri["c"])
        assert mlflow.get_registry_uri() == uri["c"]  # not pinned to a
    finally:
        mlflow.set_tracking_uri(prev)
        mlflow.set_registry_uri(None)
