"""deploy.edge.sync against a hostile or broken registry: a fake MLflow REST server (stdlib, in a thread) whose
replies each test bends. The box must never go dark, never serve a wrong model, never let the registry steer a path,
never wait on the network for a control action, and always say what went wrong (/healthz, counters, audit log).

The friendly path against a real `mlflow server` is tests/test_sync.py; acceptance without a registry is
tests/test_acceptance.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from support.artifacts import CLASSES, N_FEATURES, build_artifact, variant, write_manifest
from support.edge import AS, STORE
from support.registry import FakeRegistry
from support.servers import free_port, serve

from deploy.edge.rollout import load_config, read_jsonl
from deploy.edge.service import create_app
from deploy.edge.signing import keygen, sign_artifact
from deploy.edge.sync import BoxConfig, Sync

SIZE, NAME = 32, "hostile"


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    reg = FakeRegistry()
    yield reg
    reg.server.shutdown()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(len(CLASSES), N_FEATURES)), rng.normal(size=len(CLASSES))
    return build_artifact(tmp_path_factory.mktemp("hostile") / "v1", "1", w, b, SIZE)


def box(tmp: Path, url: str, **extra: Any) -> Path:
    (tmp / "box").mkdir(exist_ok=True)
    reg = {"url": url, "model_name": NAME, "timeout_s": 2, **extra.pop("registry", {})}
    d = {"box": "box-1", "line": "line-1", "store": "store", "registry": reg, "sync": {"interval_s": 3600}, **extra}
    (tmp / "box" / "box.yaml").write_text(yaml.safe_dump(d))
    return tmp / "box" / "box.yaml"


def test_uncompilable_champion_is_refused_and_a_killed_box_restarts_serving(
    fake: FakeRegistry, base: Path, tmp_path: Path
) -> None:
    fake.publish(base, "1", "champion")
    cfg, box_yaml = tmp_path / "box" / "rollout.yaml", box(tmp_path, fake.url)
    app = create_app(cfg, box=box_yaml)  # first sync: v1 accepted, the manifest written
    xml = b"<?xml version='1.0'?><net name='broken'><layers>"
    fake.publish(variant(base, tmp_path / "v2", "2", files={"model.xml": xml}), "2", "champion")
    out = app.state.service.sync.run_once()
    assert "champion v2 refused" in out["error"] and "OpenVINO" in out["error"]
    assert load_config(cfg).champion.version == "1"  # never written before it passed
    assert not (tmp_path / "box/store/2").exists() and not any((tmp_path / "box/store/.staging").iterdir())
    audit = [json.loads(line) for line in (tmp_path / "box/store/audit.jsonl").read_text().splitlines()]
    assert [(a["action"], a["version"]) for a in audit] == [("refuse", "2")]
    # kill -9: nothing closed, nothing flushed by the app; a new process on the same disk
    with serve(create_app(cfg, box=box_yaml)) as url:
        assert httpx.get(f"{url}/readyz").status_code == 200
        health = httpx.get(f"{url}/healthz").json()
    assert health["champion"] == "1" and "2" in health["sync"]["refused"]
    assert health["sync"]["refused_total"] >= 1


def test_incompatible_champion_needs_a_declared_class_change(fake: FakeRegistry, base: Path, tmp_path: Path) -> None:
    fake.publish(base, "1", "champion")
    sync = Sync(BoxConfig.load(box(tmp_path, fake.url)))
    assert "error" not in sync.run_once()
    swapped = variant(base, tmp_path / "v2", "2", class_names=[CLASSES[3], *CLASSES[1:3], CLASSES[0]])
    fake.publish(swapped, "2", "champion")
    out = sync.run_once()
    assert "names and order must match" in out["error"] and "sensitune.class_change" in out["error"]
    assert load_config(sync.box.rollout).champion.version == "1"
    fake.point("champion", "2", tags={"sensitune.class_change": "true"})  # declared in the registry
    assert "error" not in sync.run_once() and load_config(sync.box.rollout).champion.version == "2"


def test_path_like_version_is_refused_and_counted(fake: FakeRegistry, base: Path, tmp_path: Path) -> None:
    fake.publish(base, "1", "champion")
    fake.point("challenger", "../../../pwned", run="r1")
    sync = Sync(BoxConfig.load(box(tmp_path, fake.url)))
    out = sync.run_once()
    assert "not a safe id" in out["error"] and sync.status()["bad_replies"] == 1
    assert not list(tmp_path.rglob("pwned"))


def test_non_json_reply_and_torn_log_line_leave_the_loop_alive_and_say_so(
    fake: FakeRegistry, base: Path, tmp_path: Path
) -> None:
    fake.publish(base, "1", "champion")
    cfg, box_yaml = tmp_path / "box" / "rollout.yaml", box(tmp_path, fake.url)
    app = create_app(cfg, box=box_yaml)
    service = app.state.service
    logs = tmp_path / "box" / "logs"
    logs.mkdir(exist_ok=True)
    promote = {"applied": True, "action": "promote", "actor": "qa", "evidence": {"challenger_version": "2"}}
    (logs / "decisions.jsonl").write_text('{"applied": true, "act\n' + json.dumps(promote) + "\n")

    def html(h: BaseHTTPRequestHandler) -> bool:
        if "alias" not in h.path:
            return False
        h.reply(200, b"<html>proxy login</html>", "text/html")
        return True

    fake.hooks.append(html)
    service.sync.box.interval_s = 0.05
    service.sync.start()
    try:
        deadline = time.monotonic() + 20
        while service.sync.status()["errors_total"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.sync._thread.is_alive()
    finally:
        service.sync.stop()
    status = service.sync.status()
    assert "not JSON" in status["error"] and status["bad_replies"] >= 3 and status["skipped_log_lines"] == 1
    assert status["decisions_pushed"] == 1  # the torn line skipped; the promotion waits for a sane registry
    fake.hooks.clear()
    assert "error" not in service.sync.run_once() and service.sync.status()["decisions_pushed"] == 2
    assert ("POST", "/api/2.0/mlflow/registered-models/alias", {"name": NAME, "alias": "champion", "version": "2"}) \
        in fake.writes  # fmt: skip
    fake.hooks.append(html)
    assert "not JSON" in service.sync.run_once()["error"]
    with serve(app) as url:
        assert "not JSON" in httpx.get(f"{url}/healthz").json()["sync"]["error"]
        prom = httpx.get(f"{url}/metrics", params={"format": "prometheus"}).text
    counts = {line.split()[0]: float(line.split()[1]) for line in prom.splitlines() if line.startswith("sensitune_")}
    assert counts["sensitune_registry_bad_replies_total"] >= 3 and counts["sensitune_sync_errors_total"] >= 3


def test_bytes_changed_in_transit_are_refused(fake: FakeRegistry, base: Path, tmp_path: Path) -> None:
    fake.publish(base, "1", "champion")
    fake.publish(variant(base, tmp_path / "v2", "2"), "2", "challenger")
    good = fake.files["0/r2/artifacts/export/openvino/fp32/model.bin"]
    flipped = bytearray(good)
    flipped[-8:] = np.float32([3.0, -3.0]).tobytes()  # still a valid IR: only the hash can tell
    fake.files["0/r2/artifacts/export/openvino/fp32/model.bin"] = bytes(flipped)
    sync = Sync(BoxConfig.load(box(tmp_path, fake.url)))
    out = sync.run_once()
    assert "sha256 differs" in sync.status()["refused"]["2"] and "error" not in out
    assert load_config(sync.box.rollout).challenger is None and not (tmp_path / "box/store/2").exists()
    fake.files["0/r2/artifacts/export/openvino/fp32/model.bin"] = good  # a clean re-publish, a new manifest read
    fake.files["0/r2/artifacts/export/openvino/fp32/manifest.json"] += b"\n"
    sync.run_once()
    assert load_config(sync.box.rollout).challenger.version == "2"


def test_a_drip_hits_the_whole_request_deadline_and_leaves_no_tmp(
    fake: FakeRegistry, base: Path, tmp_path: Path
) -> None:
    fake.publish(base, "1", "champion")

    def drip(h: BaseHTTPRequestHandler) -> bool:
        if not h.path.endswith("model.bin"):
            return False
        data = fake.files["0/r1/artifacts/export/openvino/fp32/model.bin"]
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        for i in range(len(data)):  # one byte per 0.02 s: each read well inside timeout_s
            h.wfile.write(data[i : i + 1])
            h.wfile.flush()
            time.sleep(0.02)
        return True

    fake.hooks.append(drip)
    store = tmp_path / "box" / "store"
    (store / "9").mkdir(parents=True)
    (store / "9" / ".fp32.tmp-killed").mkdir()  # what a killed download left behind
    sync = Sync(BoxConfig.load(box(tmp_path, fake.url, registry={"download_deadline_s": 1.0})))
    assert not (store / "9" / ".fp32.tmp-killed").exists()
    t0 = time.monotonic()
    out = sync.run_once()
    assert time.monotonic() - t0 < 8 and "deadline" in out["error"]
    assert not any((store / ".staging").iterdir()) and not (store / "1").exists()


def test_unsigned_or_foreign_signed_models_are_refused_by_a_box_with_keys(
    fake: FakeRegistry, base: Path, tmp_path: Path
) -> None:
    key, pub = keygen(tmp_path / "keys" / "publisher")
    stranger, _ = keygen(tmp_path / "keys" / "stranger")
    signed = variant(base, tmp_path / "v1", "1")
    sign_artifact(signed, key)
    fake.publish(signed, "1", "champion")
    fake.publish(variant(base, tmp_path / "v2", "2"), "2", "challenger")  # unsigned
    box_yaml = box(tmp_path, fake.url, trust={"public_keys": [str(pub)]})
    app = create_app(tmp_path / "box" / "rollout.yaml", box=box_yaml)
    status = app.state.service.sync.status()
    assert "unsigned" in status["refused"]["2"] and status["trust"]["require_signature"] is True
    foreign = variant(base, tmp_path / "v3", "3")
    sign_artifact(foreign, stranger)
    fake.publish(foreign, "3", "challenger")
    app.state.service.sync.run_once()
    assert "does not trust" in app.state.service.sync.status()["refused"]["3"]
    audit = [json.loads(line) for line in (tmp_path / "box/store/audit.jsonl").read_text().splitlines()]
    assert {a["version"] for a in audit if a["action"] == "refuse"} == {"2", "3"}
    state = app.state.service.runtime.state()
    assert state["challenger"] is None and state["signatures"]["champion"].startswith("signed by ")


def test_promote_with_an_unreachable_registry_returns_at_once(base: Path, tmp_path: Path) -> None:
    v2 = variant(base, tmp_path / "v2", "2")
    reg = {"tracking_uri": f"http://127.0.0.1:{free_port()}", "model_name": NAME}
    cfg = write_manifest(tmp_path / "rollout.yaml", line="line-1", champion={"version": "1", "path": str(base)},
                         challenger={"version": "2", "path": str(v2)}, challenger_share=0.5, registry=reg,
                         log_dir="logs")  # fmt: skip
    with serve(create_app(cfg)) as url:
        t0 = time.monotonic()
        r = httpx.post(f"{url}/promote", json={"reason": "QA sign-off"}, timeout=60)
        took = time.monotonic() - t0
        other = httpx.post(f"{url}/reload", json={}, timeout=60)  # the control lock is free meanwhile
        took_both = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["state"]["champion"] == "2" and r.json()["registry"] == "pending"
    assert took < 5 and took_both < 10 and other.status_code == 200 and other.json()["champion"] == "2"
    assert load_config(cfg).champion.version == "2"  # the manifest says what serves


def test_a_ui_promote_with_an_unreachable_registry_returns_at_once(base: Path, tmp_path: Path) -> None:
    """The operator page's promote is the service's transaction (as /promote): the alias moves wait in the outbox."""
    v2 = variant(base, tmp_path / "v2", "2")
    reg = {"tracking_uri": f"http://127.0.0.1:{free_port()}", "model_name": NAME}
    cfg = write_manifest(tmp_path / "rollout.yaml", line="line-1", champion={"version": "1", "path": str(base)},
                         challenger={"version": "2", "path": str(v2)}, challenger_share=0.5, registry=reg,
                         log_dir="logs")  # fmt: skip
    form = {"version": "2", "reason": "QA sign-off", "confirm": "promote"}
    with serve(create_app(cfg, STORE)) as url:
        t0 = time.monotonic()
        r = httpx.post(f"{url}/ui/rollout/promote", data=form, headers=AS["alice"], timeout=60)
        took = time.monotonic() - t0
        ready = httpx.get(f"{url}/readyz", timeout=60).json()
    assert r.status_code == 200 and "promote of v2 done" in r.text and took < 5 and ready["champion"] == "2"
    last = read_jsonl(tmp_path / "logs" / "decisions.jsonl")[0][-1]
    assert (last["registry"], last["source"], last["actor"]) == ("pending", "ui:alice", "alice")
    assert load_config(cfg).champion.version == "2"  # the manifest says what serves
