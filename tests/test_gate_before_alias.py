"""The registry from the start: `sensitune publish` and the DVC track stage move an alias only after the hand-over
gate (`pipelines.gate`), identity is per store, and `sensitune registry set|serve` (against the real `mlflow server`
of tests/conftest.py, `mlflow_uri`, and the `tiny_run` fixture; the flow's side is in tests/test_flows.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from support.artifacts import CLASSES, N_FEATURES, build_artifact

from deploy.edge.artifact import load_artifact
from pipelines.cli import main
from pipelines.gate import BOOTSTRAP, HANDOVER, NOT_PROMOTED, served_precision
from pipelines.publish import publish
from pipelines.track import track_stage

REPORT_OK = {"promotable": {"fp32": True}, "accuracy_drop": {"fp32": 0.0}}


def _copy(tiny_run: tuple, dst: Path, report: dict, precision: str = "fp32") -> tuple[dict, Path]:
    """tiny_run's run dir with a real tiny OpenVINO export, the given export report and no training warnings
    (the gate refuses a model that warned: that rule is tests/test_line.py's)."""
    params, run, _ = tiny_run
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("mlflow_*", "published", "export"))
    rng = np.random.default_rng(0)
    build_artifact(dst / "export/openvino/fp32", "plan-hash", rng.normal(size=(len(CLASSES), N_FEATURES)),
                   np.zeros(len(CLASSES)), 32)  # fmt: skip
    (dst / "export/export_report.json").write_text(json.dumps(report))
    m = json.loads((dst / "metrics.json").read_text())
    (dst / "metrics.json").write_text(json.dumps({**m, "warnings": [], "below_probe": False}))
    pub = {**params["publish"], "precision": precision}
    return {**params, "paths": {**params["paths"], "run": str(dst)}, "publish": pub}, dst


def _aliases(uri: str, name: str) -> dict[str, str | None]:
    client, out = MlflowClient(uri, uri), {}
    for alias in ("champion", "challenger"):
        try:
            out[alias] = client.get_model_version_by_alias(name, alias).version
        except Exception:
            out[alias] = None
    return out


def test_the_first_model_becomes_champion_a_second_challenger_after_the_gate(
    tiny_run: tuple, mlflow_uri: str, tmp_path: Path
) -> None:
    name = "gate-first"
    params, run = _copy(tiny_run, tmp_path / "run", REPORT_OK)
    first = publish(params, run, tracking_uri_=mlflow_uri, model_name=name)
    assert first["status"] == "published" and first["champion_set"] and not first["challenger_moved"], first
    assert first["gate"]["decision"] == BOOTSTRAP and first["gate"]["precision"] == "fp32"
    v1 = first["model_version"]
    assert _aliases(mlflow_uri, name) == {"champion": v1, "challenger": None}
    audit = json.loads(MlflowClient(mlflow_uri, mlflow_uri).get_model_version(name, v1).tags["audit.champion"])
    assert (audit["alias"], audit["from_version"], audit["to_version"]) == ("champion", None, v1)
    assert audit["who"].startswith("sensitune publish") and "first published model" in audit["evidence"]
    # another identity (params), the same weights: held-out gain 0 >= 0 -> challenger, moved after the gate
    other = {**params, "plan": {**params["plan"], "budget": "7%"}}
    second = publish(other, run, tracking_uri_=mlflow_uri, model_name=name)
    assert second["gate"]["decision"] == HANDOVER and second["challenger_moved"], second["gate"]
    assert second["gate"]["comparison"]["challenger_acc"] == second["gate"]["comparison"]["champion_acc"]
    assert _aliases(mlflow_uri, name) == {"champion": v1, "challenger": second["model_version"]}
    # the same model again: identical in this store, nothing registered or moved
    again = publish(other, run, tracking_uri_=mlflow_uri, model_name=name)
    assert (again["status"], again["model_version"]) == ("identical", second["model_version"])
    assert again["gate"]["decision"] == NOT_PROMOTED and again["gate"]["alias_moves"] == []
    assert "challenger already" in again["gate"]["reason"]


def test_publish_to_store_a_then_to_a_new_store_b_registers_in_b(
    tiny_run: tuple, mlflow_uri: str, tmp_path: Path
) -> None:
    name = "gate-stores"
    params, run = _copy(tiny_run, tmp_path / "run", REPORT_OK)
    store_a = f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}"
    (tmp_path / "a").mkdir()
    in_a = publish(params, run, tracking_uri_=store_a, model_name=name)
    assert in_a["status"] == "published" and in_a["champion_set"]
    in_b = publish(params, run, tracking_uri_=mlflow_uri, model_name=name)  # same model, another store
    assert in_b["status"] == "published" and in_b["registered"] and in_b["champion_set"], in_b
    assert in_b["run_id"] != in_a["run_id"]
    # the sealed export names B's run (same version number "1" in both stores: resealed, not kept)
    art = load_artifact(run / "published/openvino/fp32", expected_version=in_b["model_version"])
    assert art.manifest["registry"]["run_id"] == in_b["run_id"]
    client = MlflowClient(mlflow_uri, mlflow_uri)
    files = {a.path for a in client.list_artifacts(in_b["run_id"], "export/openvino/fp32")}
    assert "export/openvino/fp32/manifest.json" in files
    assert client.get_run(in_b["run_id"]).info.artifact_uri.startswith("mlflow-artifacts:")


@pytest.mark.slow  # default suite <= ~15 min: `make slow` runs it (test_flows covers the refused alias)
def test_track_stage_moves_no_alias_when_the_gate_fails(tiny_run: tuple, mlflow_uri: str, tmp_path: Path) -> None:
    name = "gate-track"
    bad = {"promotable": {"fp32": False}, "accuracy_drop": {"fp32": 0.0}}
    params, run = _copy(tiny_run, tmp_path / "run", bad)
    res = track_stage(params, run, tracking_uri=mlflow_uri, model_name=name)
    assert res["status"] == "published" and res["registered"]  # registered and sealed, but not offered
    assert res["gate"]["decision"] == NOT_PROMOTED and "fp32 not promotable" in res["gate"]["reason"]
    assert not res["champion_set"] and not res["challenger_moved"]
    assert _aliases(mlflow_uri, name) == {"champion": None, "challenger": None}
    assert json.loads((run / "mlflow_run.json").read_text())["gate"]["decision"] == NOT_PROMOTED

    # with a champion: a model that fails the gate leaves `challenger` where it was
    params2, run2 = _copy(tiny_run, tmp_path / "run2", REPORT_OK)
    champ = track_stage(params2, run2, tracking_uri=mlflow_uri, model_name=name)
    assert champ["champion_set"]
    other = {**params, "plan": {**params["plan"], "budget": "9%"}}
    res = track_stage(other, run, tracking_uri=mlflow_uri, model_name=name)
    assert res["registered"] and res["gate"]["decision"] == NOT_PROMOTED
    assert _aliases(mlflow_uri, name) == {"champion": champ["model_version"], "challenger": None}


def test_the_gate_judges_the_precision_the_boxes_serve(tiny_run: tuple, mlflow_uri: str, tmp_path: Path) -> None:
    """Boxes set to int8: an INT8 export that lost 9.2 points does not block a version whose FP16 serves."""
    report = {"promotable": {"fp32": True, "fp16": True, "int8": False}, "int8_max_drop": 1.0,
              "accuracy_drop": {"fp32": 0.0, "fp16": 0.1, "int8": 9.2}}  # fmt: skip
    assert served_precision(report, "int8") == ("fp16", "int8 not promotable: drop 9.2 pt > 1.0; serving fp16")
    assert served_precision(report, "fp32") == ("fp32", "serving fp32")
    assert served_precision({"promotable": {"fp32": False}}, "fp16")[0] is None
    params, run = _copy(tiny_run, tmp_path / "run", report, precision="int8")
    res = publish(params, run, tracking_uri_=mlflow_uri, model_name="gate-int8")
    assert res["gate"]["decision"] == BOOTSTRAP and res["gate"]["precision"] == "fp16"
    assert "int8 not promotable: drop 9.2 pt" in res["gate"]["precision_why"]


def test_registry_set_moves_an_alias_with_an_audit_record(
    tiny_run: tuple, mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "gate-set"
    params, run = _copy(tiny_run, tmp_path / "run", REPORT_OK)
    v1 = publish(params, run, tracking_uri_=mlflow_uri, model_name=name)["model_version"]
    never = {**params["publish"], "challenger": "never"}
    other = {**params, "plan": {**params["plan"], "budget": "11%"}, "publish": never}
    v2 = publish(other, run, tracking_uri_=mlflow_uri, model_name=name)["model_version"]
    assert _aliases(mlflow_uri, name) == {"champion": v1, "challenger": None}  # never: registered only
    cli = ["--set", f"publish.model_name={name}", "--tracking-uri", mlflow_uri]
    capsys.readouterr()
    assert main(["registry", "set", "challenger", v2, "--why", "QA report 2026-12-01", *cli]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert _aliases(mlflow_uri, name) == {"champion": v1, "challenger": v2}
    tags = MlflowClient(mlflow_uri, mlflow_uri).get_model_version(name, v2).tags
    rec = json.loads(tags["audit.challenger"])
    assert rec == printed[0] and (rec["evidence"], rec["from_version"], rec["to_version"]) == (
        "QA report 2026-12-01", None, v2)  # fmt: skip
    # champion to v2: challenger comes off it, both moves audited
    assert main(["registry", "set", "champion", v2, "--why", "line trial passed", *cli]) == 0
    assert [m["alias"] for m in json.loads(capsys.readouterr().out)] == ["champion", "challenger"]
    assert _aliases(mlflow_uri, name) == {"champion": v2, "challenger": None}
    # one-line errors, exit 2: no --why, an unknown version
    assert main(["registry", "set", "challenger", v1, *cli]) == 2
    assert "--why" in capsys.readouterr().err
    assert main(["registry", "set", "challenger", "99", "--why", "x", *cli]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot point") and err.count("\n") == 1


def test_registry_serve_prints_the_uri_and_a_server_boxes_can_pull_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["registry", "serve", "--dir", str(tmp_path / "reg"), "--port", "5123", "--dry-run"]) == 0
    uri_line, cmd = capsys.readouterr().out.splitlines()
    assert "http://127.0.0.1:5123" in uri_line
    assert "--serve-artifacts" in cmd and f"--artifacts-destination {tmp_path / 'reg' / 'artifacts'}" in cmd
    assert f"sqlite:///{tmp_path / 'reg' / 'mlflow.db'}" in cmd and "--host 127.0.0.1" in cmd
