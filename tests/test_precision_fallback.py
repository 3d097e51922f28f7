"""Precision fallback on the box: a box set to int8 serves a version's best promotable precision (int8, else fp16,
else fp32) and says which and why in /healthz and on the Models page (`deploy.edge.precision.choose_served`,
`deploy.edge.acceptance.Intake.choose`), against the real `mlflow server` of tests/conftest.py (`mlflow_uri`).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from support.artifacts import CLASSES, N_FEATURES, build_artifact
from support.servers import serve

from deploy.edge.precision import choose_served, fallback_chain, report_verdicts
from deploy.edge.rollout import load_config
from deploy.edge.service import create_app
from deploy.edge.sync import BoxConfig, Sync
from deploy.edge.ui.views import models_view

INT8_LOST = {"precision": "int8", "promotable": False, "verification": {"accuracy_drop": 9.2}}
WHY = "int8 not promotable: drop 9.2 pt > 1.0; serving fp16"


def register(uri: str, name: str, tmp: Path, verdicts: dict[str, dict]) -> str:
    """One registry version whose sealed export holds a tiny model per precision, with these manifest extras."""
    client = MlflowClient(uri, uri)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    version = str(len(client.search_model_versions(f"name='{name}'")) + 1)
    exp = client.get_experiment_by_name("fallback") or client.get_experiment(client.create_experiment("fallback"))
    run = client.create_run(exp.experiment_id)
    rng = np.random.default_rng(int(version))
    w, b = rng.normal(size=(len(CLASSES), N_FEATURES)), rng.normal(size=len(CLASSES))
    for prec, extra in verdicts.items():
        build_artifact(tmp / f"v{version}/openvino/{prec}", version, w, b, 32, {"precision": prec, **extra})
    client.log_artifacts(run.info.run_id, str(tmp / f"v{version}"), "export")
    client.create_model_version(name, f"runs:/{run.info.run_id}/export", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version)
    return version


def box_yaml(root: Path, url: str, name: str, precision: str) -> Path:
    root.mkdir(parents=True)
    d = {"box": "box-1", "line": "line-1", "store": "store", "sync": {"interval_s": 3600},
         "registry": {"url": url, "model_name": name, "timeout_s": 5, "precision": precision}}  # fmt: skip
    (root / "box.yaml").write_text(yaml.safe_dump(d))
    return root / "box.yaml"


def test_the_rule_walks_down_from_the_precision_the_box_is_set_to() -> None:
    assert fallback_chain("int8") == ("int8", "fp16", "fp32") and fallback_chain("fp32") == ("fp32",)
    ok, lost = {"promotable": True}, {"promotable": False, "accuracy_drop": 9.2}
    assert choose_served("int8", {"int8": lost, "fp16": ok, "fp32": ok}) == ("fp16", WHY)
    assert choose_served("int8", {"int8": ok, "fp16": ok}) == ("int8", "serving int8")
    assert choose_served("int8", {"fp32": {"promotable": None}}) == (
        "fp32", "int8 not exported; fp16 not exported; serving fp32")  # fmt: skip
    assert choose_served("fp16", {"fp16": lost, "fp32": lost})[0] is None  # nothing promotable: refuse
    assert choose_served("fp32", {"fp32": ok, "int8": ok}) == ("fp32", "serving fp32")  # never climbs up
    # INT8 within its accuracy budget that passes more defects than PyTorch at the operating point (verify's gate)
    leaky = {"promotable": False, "accuracy_drop": 0.4, "escapes": 2, "pytorch_escapes": 0}
    assert choose_served("int8", {"int8": leaky, "fp16": ok}) == (
        "fp16", "int8 not promotable: 2 escapes at the operating point > PyTorch's 0 (drop 0.4 pt); serving fp16")
    report = {"promotable": {"int8": False, "fp16": True}, "accuracy_drop": {"int8": 0.4, "fp16": 0.0},
              "int8_max_drop": 1.0, "escapes": {"pytorch": 0, "int8": 2, "fp16": 0}}  # fmt: skip
    assert report_verdicts(report)["int8"] == {**leaky, "max_drop": 1.0}


def test_a_box_set_to_int8_serves_fp16_when_int8_lost_accuracy_and_says_so(mlflow_uri: str, tmp_path: Path) -> None:
    name = "fallback-int8"
    v = register(mlflow_uri, name, tmp_path / "models", {"int8": INT8_LOST, "fp16": {"promotable": True},
                                                          "fp32": {"promotable": True}})  # fmt: skip
    box = box_yaml(tmp_path / "box", mlflow_uri, name, "int8")
    app = create_app(tmp_path / "box" / "rollout.yaml", box=box)  # the first sync writes the manifest
    cfg = load_config(tmp_path / "box" / "rollout.yaml")
    assert cfg.champion.version == v and cfg.resolve(cfg.champion.path) == (tmp_path / f"box/store/{v}/fp16").resolve()
    assert not (tmp_path / f"box/store/{v}/int8").exists()  # judged by its manifest, never downloaded
    service = app.state.service
    service.sync.run_once()  # the box's own round: the served precision and why are in its status
    with serve(app) as url:
        health = httpx.get(f"{url}/healthz").json()
    assert health["sync"]["serving"]["champion"] == {"version": v, "precision": "fp16", "why": WHY}
    page = models_view(service)
    champ = next(m for m in page["models"] if m["role"] == "champion")
    assert (champ["precision"], champ["serving_why"]) == ("fp16", WHY)
    # a restart remembers why (store/<v>/served.json), without asking the registry again
    again = Sync(BoxConfig.load(box))
    assert again.intake.choose({"version": v, "run_id": "not-asked"})[:2] == ("fp16", WHY)


def test_a_version_with_nothing_promotable_is_refused_and_the_box_keeps_serving(
    mlflow_uri: str, tmp_path: Path
) -> None:
    name = "fallback-none"
    lost = {"promotable": False, "verification": {"accuracy_drop": 3.0}}
    v1 = register(mlflow_uri, name, tmp_path / "models", {"fp16": {"promotable": True}})
    box = box_yaml(tmp_path / "box", mlflow_uri, name, "fp16")
    sync = Sync(BoxConfig.load(box))
    assert "error" not in sync.run_once()
    v2 = register(mlflow_uri, name, tmp_path / "models", {"fp16": lost, "fp32": {"promotable": False}})
    out = sync.run_once()
    refused = sync.status()["refused"][v2]
    assert "fp16 not promotable: drop 3.0 pt > 1.0; fp32 not promotable" in refused and "nothing" in refused
    assert out["error"].startswith(f"champion v{v2} refused") and not out["error"].endswith("...")
    assert load_config(tmp_path / "box" / "rollout.yaml").champion.version == v1  # keeps what it serves


@pytest.mark.parametrize("precision", [pytest.param("fp16", marks=pytest.mark.slow), "fp32"])  # fp16: `make slow`
def test_a_box_serves_the_precision_it_is_set_to_when_promotable(
    precision: str, mlflow_uri: str, tmp_path: Path
) -> None:
    name = f"fallback-{precision}"
    v = register(mlflow_uri, name, tmp_path / "models", {p: {"promotable": True} for p in ("int8", "fp16", "fp32")})
    sync = Sync(BoxConfig.load(box_yaml(tmp_path / "box", mlflow_uri, name, precision)))
    assert "error" not in sync.run_once()
    assert sync.status()["serving"]["champion"] == {"version": v, "precision": precision, "why": f"serving {precision}"}
    assert sorted(p.name for p in (tmp_path / f"box/store/{v}").iterdir() if p.is_dir()) == [precision]
