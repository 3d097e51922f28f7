"""deploy.edge.sync against a real `mlflow server` (tests/conftest.py's `mlflow_uri`): two edge boxes, each an app with
its own store, follow the registry's aliases; a promotion on one box moves the registry (audited) and the other
follows; labelled frames are uploaded once with provenance; a dead server leaves the boxes serving, stale.

Artifacts are the tiny OpenVINO models of tests/support/artifacts.py, logged as a run's sealed export (the layout
`pipelines.publish` writes), so no training runs here; tests/test_flywheel.py runs the whole loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from support.artifacts import CLASSES, N_FEATURES, build_artifact, demo_images
from support.servers import free_port, serve

from deploy.edge.auth import ADMIN, Principal
from deploy.edge.mlflow_rest import RestRegistry
from deploy.edge.rollout import load_config
from deploy.edge.rollout.decision import PROMOTE, Decision, apply_decision
from deploy.edge.service import create_app
from deploy.edge.sync import BoxConfig, Sync
from deploy.edge.sync import main as sync_main

NAME = "sensitune-test-sync"


def register(uri: str, tmp: Path, alias: str, seed: int) -> str:
    """A tiny artifact sealed with the next registry version, logged under the run's export/, registered."""
    client = MlflowClient(uri, uri)
    try:
        client.create_registered_model(NAME)
    except Exception:
        pass
    version = str(len(client.search_model_versions(f"name='{NAME}'")) + 1)
    exp = client.get_experiment_by_name("sync") or client.get_experiment(client.create_experiment("sync"))
    run = client.create_run(exp.experiment_id)
    rng = np.random.default_rng(seed)
    art = build_artifact(tmp / f"v{version}/openvino/fp32", version, rng.normal(size=(len(CLASSES), N_FEATURES)),
                         rng.normal(size=len(CLASSES)), 32)  # fmt: skip
    client.log_artifacts(run.info.run_id, str(art.parent.parent), "export")
    mv = client.create_model_version(NAME, f"runs:/{run.info.run_id}/export", run_id=run.info.run_id)
    assert str(mv.version) == version
    client.set_registered_model_alias(NAME, alias, version)
    return version


def box_yaml(root: Path, name: str, url: str, frames: bool) -> Path:
    root.mkdir(parents=True)
    d = {"box": name, "line": "line-1", "store": "store", "registry": {"url": url, "model_name": NAME, "timeout_s": 5},
         "sync": {"interval_s": 3600, "challenger_share": 0.5}}  # fmt: skip
    if frames:
        d["frames"] = {"dir": "frames", "quota_mb": 50, "low_margin": 0.0, "random_rate": 0.0}
    (root / "box.yaml").write_text(yaml.safe_dump(d))
    return root / "box.yaml"


def test_two_boxes_follow_the_registry_promote_upload_and_go_stale(mlflow_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(mlflow_uri, mlflow_uri)
    assert register(mlflow_uri, tmp_path / "models", "champion", 1) == "1"
    boxes = {n: box_yaml(tmp_path / n, f"box-{n}", mlflow_uri, frames=n == "a") for n in ("a", "b")}
    # no manifest yet: the first sync writes it and fetches v1 into the box's own store
    apps = {n: create_app(tmp_path / n / "rollout.yaml", box=b) for n, b in boxes.items()}
    svc = {n: app.state.service for n, app in apps.items()}
    for n in boxes:
        assert load_config(tmp_path / n / "rollout.yaml").champion.version == "1"
        assert (tmp_path / n / "store/1/fp32/manifest.json").is_file()

    assert register(mlflow_uri, tmp_path / "models", "challenger", 2) == "2"
    for n in boxes:
        out = svc[n].sync.run_once()
        assert out["changed"] and out["versions"] == {"champion": "1", "challenger": "2"} and "error" not in out
        state = svc[n].runtime.state()  # hot-reloaded
        assert (state["champion"], state["challenger"], state["challenger_state"]) == ("1", "2", "serving")
        assert svc[n].sync.run_once()["changed"] is False  # nothing new: no rewrite, no reload
    # a damaged file in box b's store is moved aside and fetched again, verified
    (tmp_path / "b/store/2/fp32/model.bin").write_bytes(b"garbage")
    svc["b"].sync.run_once()
    assert svc["b"].runtime.state()["challenger_state"] == "serving"
    assert list((tmp_path / "b/store/2").glob(".damaged-fp32-*"))

    images = demo_images(tmp_path / "img", 2, 32)
    with serve(apps["a"]) as url_a:
        served = []
        for i, (path, _) in enumerate(images[:4]):
            r = httpx.post(f"{url_a}/predict", files={"file": path.read_bytes()}, data={"camera_id": f"cam-{i}"})
            assert r.status_code == 200
            served.append(r.json())
        # operators correct two frames (a label other than the served class) and confirm one: all three are kept
        labelled = [(s["frame_id"], next(c for c in CLASSES if c != s["class"])) for s in served[:2]]
        labelled.append((served[2]["frame_id"], served[2]["class"]))
        for fid, label in labelled:
            assert httpx.post(f"{url_a}/feedback", json={"frame_id": fid, "label": label}).json()["frame_kept"]
        svc["a"].sync.run_once()  # the app's own sync loop (started with the server) may have sent some already
        assert svc["a"].frame_store.labelled_since(0, not_uploaded=True) == []  # all three are out
        rest = RestRegistry(mlflow_uri, NAME)
        for fid, label in labelled:
            frame, data = svc["a"].frame_store.get(fid)
            names = {Path(f["path"]).name for f in rest.list_files(f"incoming/line-1/{label}")}
            assert {f"{frame.sha256}.png", f"{frame.sha256}.json"} <= names
            prov = json.loads(rest.get_file(f"incoming/line-1/{label}/{frame.sha256}.json"))
            assert (prov["camera_id"], prov["box"], prov["label"]) == (frame.camera_id, "box-a", label)
            assert prov["labelled_by"]  # the token's name (here: the loopback development principal)
            assert prov["model_version"] in ("1", "2") and prov["line"] == "line-1"
        assert svc["a"].sync.run_once()["uploaded"] == 0  # each frame once

        # the rule promotes the challenger on box a: registry aliases move (audited), box b follows
        decision = Decision(PROMOTE, ["test evidence"], {"champion_version": "1", "challenger_version": "2"})
        assert apply_decision(tmp_path / "a/rollout.yaml", decision, actor="qa-lead")["applied"]
        svc["a"].reload(Principal("test", ADMIN))
        out = svc["a"].sync.run_once()
        assert out.get("pushed") == 1, out
        assert client.get_model_version_by_alias(NAME, "champion").version == "2"
        audits = [json.loads(v) for k, v in client.get_registered_model(NAME).tags.items() if k.startswith("audit.")]
        champ = next(a for a in audits if a["alias"] == "champion")
        assert (champ["from_version"], champ["to_version"], champ["who"]) == ("1", "2", "box-a:qa-lead")
        assert champ["evidence"]["reasons"] == ["test evidence"] and champ["ts"]
        svc["b"].sync.run_once()
        assert svc["b"].runtime.state()["champion"] == "2" and svc["b"].runtime.state()["challenger"] is None

        # a person promotes v3 from the command line; both boxes follow on their next sync
        register(mlflow_uri, tmp_path / "models", "challenger", 3)
        assert sync_main(["promote", "--box", str(boxes["b"]), "--version", "3", "--who", "alice",
                          "--evidence", "QA sign-off"]) == 0  # fmt: skip
        for n in boxes:
            svc[n].sync.run_once()
            assert svc[n].runtime.state()["champion"] == "3"
        assert json.loads(client.get_model_version(NAME, "3").tags["audit.champion"])["who"] == "alice"

        # the server goes away: box a keeps serving and says how stale it is
        svc["a"].sync.reg.url = f"http://127.0.0.1:{free_port()}"
        assert "error" in svc["a"].sync.run_once()
        health = httpx.get(f"{url_a}/healthz").json()
        assert health["sync"]["stale"] is True and "unreachable" in health["sync"]["error"]
        assert health["sync"]["last_ok"] is not None and health["sync"]["stale_s"] >= 0
        r = httpx.post(f"{url_a}/predict", files={"file": images[0][0].read_bytes()}, data={"camera_id": "cam-0"})
        assert r.status_code == 200 and r.json()["model_version"] == "3"
        prom = httpx.get(f"{url_a}/metrics", params={"format": "prometheus"}).text
        assert "sensitune_sync_ok 0" in prom and "sensitune_sync_stale_seconds" in prom


def test_box_config_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "box.yaml").write_text("box: a\n")
    with pytest.raises(Exception, match="not a usable box config"):
        BoxConfig.load(tmp_path / "box.yaml")
    box = BoxConfig.load(box_yaml(tmp_path / "x", "x", f"http://127.0.0.1:{free_port()}", frames=False))
    sync = Sync(box)
    out = sync.run_once()
    assert "unreachable" in out["error"] and sync.status()["stale"] is True and sync.status()["stale_s"] is None
