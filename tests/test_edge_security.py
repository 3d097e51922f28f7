"""Issue 15: the edge on an untrusted plant network. One test per finding; each failed on the code before the fix.
Here credentials, bytes read once and transactional promotion; limits, frames and start-up: test_edge_limits.py.

Real uvicorn servers on 127.0.0.1 (and one `sensitune-edge` process, for the file faults that used to SIGBUS it),
tiny OpenVINO artifacts (support/edge.py, the `edge_world` fixture) whose answers are known exactly.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.artifacts import CLASSES
from support.edge import AS, HTTP, STORE, EdgeWorld, post_frame, rollout
from support.servers import free_port, serve

from deploy.edge.auth import AuthError, TokenStore, token_digest
from deploy.edge.rollout import load_config, read_jsonl
from deploy.edge.service import EdgeService, create_app, main

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- 1. credentials
def test_anonymous_decide_gets_401_and_each_role_does_only_its_job(edge_world: EdgeWorld, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, edge_world, "1", "2", cameras={"pinned": {"cam-a": "champion", "cam-b": "challenger"}})
    os.chmod(cfg, 0o644)  # the service may run as another user than the one who edits the manifest
    before = cfg.read_bytes()
    with serve(create_app(cfg, STORE)) as base:
        r = HTTP.post(f"{base}/decide", json={})
        assert (
            r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "Authorization" in r.json()["error"]
        )
        assert HTTP.post(f"{base}/promote", json={}, headers={"Authorization": "Bearer guess"}).status_code == 401
        assert HTTP.post(f"{base}/decide", json={}, headers={"Cookie": "token=admin-secret"}).status_code == 401
        assert HTTP.post(f"{base}/decide?token=admin-secret", json={}).status_code == 401
        for who in ("cams", "panel"):  # least privilege: neither may change the rollout
            assert HTTP.post(f"{base}/decide", json={}, headers=AS[who]).status_code == 403
            assert HTTP.post(f"{base}/reload", json={}, headers=AS[who]).status_code == 403
        assert cfg.read_bytes() == before
        assert post_frame(base, edge_world.images[0], "cam-a", "f1").status_code == 200
        assert HTTP.post(f"{base}/predict", data={"camera_id": "cam-a"}).status_code == 401
        frame = edge_world.images[0]
        assert post_frame(base, frame, "cam-a", who="panel").status_code == 403  # operators do not predict
        fb = {"camera_id": "cam-a", "client_frame_id": "f1", "label": "ok"}
        assert HTTP.post(f"{base}/feedback", json=fb, headers=AS["cams"]).status_code == 403  # cameras do not label
        assert HTTP.post(f"{base}/feedback", json=fb, headers=AS["panel"]).status_code == 200
        assert HTTP.get(f"{base}/report").status_code == 401 and HTTP.get(f"{base}/metrics").status_code == 401
        assert HTTP.get(f"{base}/report", headers=AS["panel"]).status_code == 200
        assert HTTP.get(f"{base}/healthz").status_code == 200  # probes stay open
        r = HTTP.post(f"{base}/rollback", json={"reason": "bad lot"}, headers=AS["alice"])
        assert r.status_code == 200 and r.json()["applied"] and r.json()["actor"] == "alice"
    assert load_config(cfg).challenger is None
    audit = read_jsonl(tmp_path / "logs" / "audit.jsonl")[0]
    assert [(a["actor"], a["action"], a["outcome"]) for a in audit] == [("alice", "rollback", "applied")]
    decision = read_jsonl(tmp_path / "logs" / "decisions.jsonl")[0][-1]
    assert (decision["actor"], decision["source"], decision["reasons"]) == ("alice", "admin", ["bad lot"])
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o644  # the rewrite kept the mode (was 0600)


def test_a_cross_origin_form_post_cannot_act(edge_world: EdgeWorld, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, edge_world, "1", "2")
    before = cfg.read_bytes()
    form, evil = {"Content-Type": "application/x-www-form-urlencoded"}, {"Origin": "http://evil.plant.local"}
    for app_tokens in (STORE, None):  # another site's Origin: 403 in every mode; without an Origin header (an old
        with serve(create_app(cfg, app_tokens)) as base:  # browser) with tokens: no header, 401; open: not JSON, 415
            for path in ("/reload", "/decide", "/promote", "/rollback"):
                r = HTTP.post(f"{base}{path}", content=b"x=1", headers=form | evil)
                assert r.status_code == 403 and "another site" in r.json()["error"], (path, r.text)
                assert "access-control-allow-origin" not in r.headers
                r = HTTP.post(f"{base}{path}", content=b"x=1", headers=form)
                assert r.status_code == (401 if app_tokens else 415), (path, r.text)
                r = HTTP.post(f"{base}{path}", content=b"x=1", headers=form | AS["alice"])
                assert r.status_code == 415 and "JSON body" in r.json()["error"]
            assert HTTP.get(f"{base}/metrics", headers=AS["alice"]).json()["reloads"] == 0
    assert cfg.read_bytes() == before and not (tmp_path / "logs" / "decisions.jsonl").exists()


def test_refuses_to_start_on_a_network_address_without_tokens(edge_world: EdgeWorld, tmp_path: Path, capsys) -> None:
    cfg = rollout(tmp_path, edge_world, "1", None)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("SENSITUNE_EDGE_TOKENS", "SENSITUNE_EDGE_TOKENS_FILE"):
            mp.delenv(k, raising=False)
        assert main(["--config", str(cfg), "--host", "0.0.0.0"]) == 2
        assert "not a loopback address and no tokens" in capsys.readouterr().err
        plain = tmp_path / "tokens.yaml"
        plain.write_text("tokens:\n  - {name: cams, role: camera, token: hunter2}\n")
        assert main(["--config", str(cfg), "--host", "0.0.0.0", "--tokens", str(plain)]) == 2
        assert "stores a plain token" in capsys.readouterr().err


def test_tokens_from_a_file_or_the_environment_are_stored_hashed(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(f"tokens:\n  - {{name: qa, role: operator, sha256: {token_digest('t0k')}}}\n")
    store = TokenStore.from_file(path)
    assert store.authenticate("Bearer t0k").name == "qa" and store.authenticate("Bearer t0K") is None
    assert store.authenticate("Basic t0k") is None and store.authenticate(None) is None
    env = TokenStore.from_env({"SENSITUNE_EDGE_TOKENS": f"a:admin:{token_digest('x')},c:camera:{token_digest('y')}"})
    assert (env.authenticate("Bearer y").name, env.authenticate("Bearer y").role) == ("c", "camera")
    with pytest.raises(AuthError, match="role='boss'"):
        TokenStore([("a", "boss", token_digest("x"))], "t")
    with pytest.raises(AuthError, match="same token"):
        TokenStore([("a", "admin", token_digest("x")), ("b", "camera", token_digest("x"))], "t")
    out = subprocess.run([sys.executable, "-m", "deploy.edge.auth", "new", "cam-7", "camera"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout  # fmt: skip
    token = out.split("): ")[1].split()[0]
    entry = json.loads(out.split("- ", 1)[1])
    assert entry == {"name": "cam-7", "role": "camera", "sha256": token_digest(token)} and len(token) >= 40


# ------------------------------------------------------------------------------------- 2. bytes read once
def test_rewriting_or_truncating_model_files_while_serving_changes_no_answer_and_kills_nothing(
    edge_world: EdgeWorld, tmp_path: Path
) -> None:
    cfg = rollout(tmp_path, edge_world, "2", "1", challenger_share=0.5)
    port = free_port()
    cmd = [sys.executable, "-m", "deploy.edge.service", "--config", str(cfg), "--port", str(port),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the service did not start"
            try:
                if HTTP.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        cams = [f"cam-{i}" for i in range(8)]
        frames = [(c, i) for c in cams for i in range(len(edge_world.images))]

        def answers() -> list[tuple[str, int, float]]:
            out = []
            for c, i in frames:
                r = HTTP.post(f"{base}/predict", files={"file": ("f.png", edge_world.images[i])}, data={"camera_id": c})
                assert r.status_code == 200, r.text
                out.append((r.json()["model_version"], r.json()["class_index"], r.json()["score"]))
            return out

        before = answers()
        assert {v for v, _, _ in before} == {"1", "2"}  # both arms serve
        champion_bin = tmp_path / "art2" / "model.bin"
        with open(champion_bin, "r+b") as f:  # same size, in place (same inode): what a mapped file would show
            size = f.seek(0, 2)
            f.seek(0)
            f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
        os.truncate(tmp_path / "art1" / "model.bin", 0)  # a mapped file would SIGBUS here
        (tmp_path / "art1" / "model.xml").write_text("<broken/>")
        after = answers()
        assert proc.poll() is None, f"the service died with exit code {proc.returncode}"
        assert after == before  # bit-identical answers: what serves is what was verified
        assert HTTP.get(f"{base}/readyz").json()["challenger_state"] == "serving"
    finally:
        proc.terminate()
        proc.wait(20)


# ----------------------------------------------------------------------------------- 3. transactional promotion
def test_a_failed_promotion_leaves_the_manifest_byte_identical(edge_world: EdgeWorld, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, edge_world, "1", "2", cameras={"pinned": {"cam-a": "champion", "cam-b": "challenger"}})
    with serve(create_app(cfg, STORE)) as base:
        for k, data in enumerate(edge_world.images):  # both arms labelled: the rule says promote
            for cam in ("cam-a", "cam-b"):
                assert post_frame(base, data, cam, f"p{k}").status_code == 200
                fb = {"camera_id": cam, "client_frame_id": f"p{k}", "label": CLASSES[edge_world.labels[k]]}
                assert HTTP.post(f"{base}/feedback", json=fb, headers=AS["panel"]).status_code == 200
        assert HTTP.get(f"{base}/report", headers=AS["panel"]).json()["decision_preview"]["action"] == "promote"
        before, state = cfg.read_bytes(), HTTP.get(f"{base}/readyz").json()
        blob = bytearray((tmp_path / "art2" / "model.bin").read_bytes())  # the challenger changes on disk
        blob[len(blob) // 2] ^= 0xFF
        (tmp_path / "art2" / "model.bin").write_bytes(bytes(blob))
        for path in ("/decide", "/promote"):
            r = HTTP.post(f"{base}{path}", json={}, headers=AS["alice"])
            assert (
                r.status_code == 409
                and "sha256 differs" in r.json()["error"]
                and "nothing changed" in r.json()["error"]
            )
            assert cfg.read_bytes() == before  # byte-identical
        assert not (tmp_path / "logs" / "decisions.jsonl").exists()
        assert HTTP.get(f"{base}/readyz").json() == state  # the same runtime serves, both arms
        assert post_frame(base, edge_world.images[0], "cam-b").json()["model_version"] == "2"
    # and after a restart the manifest is still the one that served
    service = EdgeService(cfg)
    assert service.runtime.champion.version == "1"
    service.close()
    outcomes = [(a["action"], a["outcome"]) for a in read_jsonl(tmp_path / "logs" / "audit.jsonl")[0]]
    assert outcomes == [("decide", "refused"), ("promote", "refused")]


def test_decide_logs_a_decision_only_when_something_changes(edge_world: EdgeWorld, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, edge_world, "1", "2")
    with serve(create_app(cfg, STORE)) as base:
        for _ in range(5):
            r = HTTP.post(f"{base}/decide", json={}, headers=AS["alice"])
            assert r.status_code == 200 and r.json()["action"] == "wait" and not r.json()["applied"]
        r = HTTP.post(f"{base}/promote", json={"reason": "signed off by QA"}, headers=AS["alice"])
        assert r.json()["applied"] and r.json()["state"]["champion"] == "2"
        assert HTTP.post(f"{base}/promote", json={}, headers=AS["alice"]).json()["applied"] is False  # nothing left
    decisions = read_jsonl(tmp_path / "logs" / "decisions.jsonl")[0]
    assert [(d["action"], d["actor"]) for d in decisions] == [("promote", "alice")]
    assert len(read_jsonl(tmp_path / "logs" / "audit.jsonl")[0]) == 7  # every admin action is audited
