"""Edge service + rollout: a real uvicorn server on loopback, 12 cameras sending demo defect images, feedback,
promotion and rollback (manifest + MLflow aliases), hot reload, and faults that must not take the line down.

Artifacts are tiny OpenVINO models built in tests/support/artifacts.py (not via deploy.compile.export), whose
answers the tests compute independently in numpy, so every served class is checked exactly. The rollout's rules
without a server: tests/test_rollout_rules.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.artifacts import ALWAYS_OK, CLASSES, build_artifact, demo_set, fit_linear, reference_logits, write_manifest
from support.rollout import bucket
from support.servers import serve

from deploy.edge import rollout
from deploy.edge.artifact import ArtifactError
from deploy.edge.auth import LOCAL
from deploy.edge.registry import MlflowRegistry
from deploy.edge.rollout import load_config, read_jsonl, wilson_interval
from deploy.edge.service import EdgeService, create_app, load_model
from spt_core.portable.preprocess import Preprocess

CAMS = [f"cam-{i}" for i in range(12)]
HTTP = httpx.Client(timeout=30)  # one pooled client: a fresh httpx client per call costs tens of ms
RULE = {"min_samples": 30, "min_gain": 0.0, "max_latency_increase": 10.0, "max_error_rate": 0.05}
# max_latency_increase is loose on purpose: these models take ~1 ms, so their p50 ratio is noise; the latency
# rule itself is checked on synthetic reports in test_rollout_rules.py (no timed assertions).


@dataclass
class World:
    root: Path
    images: list[bytes]  # PNG bytes as a camera sends them
    labels: list[int]
    art: dict[str, Path]  # version -> artifact dir
    expect: dict[str, np.ndarray]  # version -> class index per image (numpy reference)
    mlflow_uri: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("edge")
    items, pil, labels = demo_set(root / "images", n_per_class=12, size=64)
    w_good, b_good = fit_linear(pil, labels, Preprocess(size=(48, 48)))
    specs = {"1": (*ALWAYS_OK, 32), "2": (w_good, b_good, 48), "3": (*ALWAYS_OK, 32)}
    art, expect = {}, {}
    for v, (w, b, size) in specs.items():
        art[v] = build_artifact(root / "artifacts" / f"v{v}", v, w, b, size)
        expect[v] = reference_logits(pil, Preprocess(size=(size, size)), w, b).argmax(1)
    assert (expect["2"] == labels).mean() > 0.5, "the fitted model must beat the always-ok one for these tests"
    return World(root, [p.read_bytes() for p, _ in items], labels, art, expect, f"sqlite:///{root / 'mlflow.db'}")


def register(world: World, name: str) -> MlflowRegistry:
    """A registered model with versions 1..3 (dummy sources), champion@1, challenger@2."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=world.mlflow_uri, registry_uri=world.mlflow_uri)
    client.create_registered_model(name)
    for v in ("1", "2", "3"):
        client.create_model_version(name, source=str(world.art[v]))
    reg = MlflowRegistry(world.mlflow_uri, name)
    reg.set_champion("1")
    reg.set_challenger("2")
    return reg


def manifest(
    path: Path, world: World, champion: str, challenger: str | None, art: dict[str, Path] | None = None, **kw: object
) -> Path:
    """A rollout manifest beside `path`, artifact paths relative to it (as a user would write them)."""
    arts = world.art | (art or {})
    ref = lambda v: {"version": v, "path": os.path.relpath(arts[v], path.parent)}  # noqa: E731
    fields = {"line": "line-7", "champion": ref(champion), "challenger": ref(challenger) if challenger else None}
    fields |= {"challenger_share": 0.25, "cameras": {"pinned": {}}, "shadow": False, "decision": RULE}
    fields |= {"registry": None, "log_dir": "logs"}
    return write_manifest(path, **(fields | kw))


def send(base: str, world: World, frames: list[tuple[str, str, int]], threads: int = 6) -> list[httpx.Response]:
    """Cameras post frames concurrently: (camera_id, frame_id, image index)."""

    def post(frame: tuple[str, str, int]) -> httpx.Response:
        cam, fid, i = frame
        files = {"file": (f"{fid}.png", world.images[i], "image/png")}
        return HTTP.post(f"{base}/predict", files=files, data={"camera_id": cam, "frame_id": fid})

    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(post, frames))


def frames_for(cams: list[str], per_cam: int, tag: str, n_images: int) -> list[tuple[str, str, int]]:
    return [(c, f"{tag}-{c}-{k}", (7 * j + k) % n_images) for j, c in enumerate(cams) for k in range(per_cam)]


def give_feedback(base: str, world: World, frames: list[tuple[str, str, int]]) -> None:
    for cam, fid, i in frames:
        label = CLASSES[world.labels[i]]  # named by the camera's own frame id: (camera, client_frame_id)
        r = HTTP.post(f"{base}/feedback", json={"camera_id": cam, "client_frame_id": fid, "label": label})
        assert r.status_code == 200, r.text


def last_decision(cfg_path: Path) -> dict:
    records, _ = read_jsonl(cfg_path.parent / "logs" / "decisions.jsonl")
    return records[-1]


def registry_moves(service: EdgeService, cfg_path: Path) -> list[dict]:
    """The alias moves of the service's last decision: made after it, off the control lock, then audited."""
    assert service.outbox.wait_idle(60)
    records, _ = read_jsonl(cfg_path.parent / "logs" / "audit.jsonl")
    last = [r for r in records if r["action"] == "registry"][-1]
    assert last["outcome"] == "ok", last
    return last["alias_moves"]


# ------------------------------------------------------------------------------------------------ artifacts
def test_artifact_checksum_version_and_missing_files(world: World, tmp_path: Path) -> None:
    art = shutil.copytree(world.art["2"], tmp_path / "v2")
    assert load_model(art, "2").class_names == CLASSES
    with pytest.raises(ArtifactError, match="model_version='2' but the rollout manifest says '5'"):
        load_model(art, "5")
    m = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps(m | {"promotable": False}))  # export's verification gate failed
    with pytest.raises(ArtifactError, match="promotable=false"):
        load_model(art, "2")
    (art / "manifest.json").write_text(json.dumps(m))
    blob = bytearray((art / "model.bin").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (art / "model.bin").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=r"model.bin: sha256 differs from manifest.json") as e:
        load_model(art, "2")
    assert "\n" not in str(e.value)
    (art / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="cannot read the artifact manifest"):
        load_model(art, "2")


def test_edge_modules_import_neither_torch_nor_spt_core_internals() -> None:
    edge = "artifact inferencer metrics service registry rollout rollout.cli rollout.decision rollout.logs"
    edge += " api auth frames guard limits runtime schemas"
    edge += " rollout.manifest rollout.split rollout.stats"
    code = (
        f"import sys, {', '.join('deploy.edge.' + m for m in edge.split())}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'mlflow', 'timm', 'onnx', 'onnxruntime', 'nncf')"
        " or m.startswith('spt_core.') and m != 'spt_core.portable' and not m.startswith('spt_core.portable.')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ------------------------------------------------------------------------------------------------ live service
def test_cameras_ab_split_feedback_promotion_and_rollback(world: World, tmp_path: Path) -> None:
    registry = register(world, "inspector-ab")
    reg = {"tracking_uri": world.mlflow_uri, "model_name": "inspector-ab"}
    cfg_path = manifest(
        tmp_path / "rollout.yaml", world, "1", "2", cameras={"pinned": {"cam-3": "challenger"}}, registry=reg
    )
    logs = tmp_path / "logs"
    expected_ch = {c for c in CAMS if c == "cam-3" or bucket(c, "2") < 0.25}
    assert 2 <= len(expected_ch) <= 6  # the hash gives these 12 cameras a share near 0.25 (plus the pinned one)
    frames = frames_for(CAMS, 20, "a", len(world.images))
    with serve(app := create_app(cfg_path)) as base:
        health = HTTP.get(f"{base}/healthz").json()
        assert (health["status"], health["champion"], health["challenger"]) == ("alive", "1", "2")
        assert HTTP.get(f"{base}/readyz").status_code == 200
        res = send(base, world, frames)
        assert [r.status_code for r in res] == [200] * len(frames)
        seen: dict[str, set[tuple[str, str]]] = {}
        for (cam, fid, i), r in zip(frames, res):
            body = r.json()
            assert body["client_frame_id"] == fid and body["camera_id"] == cam and len(body["frame_id"]) == 32
            assert body["class_index"] == world.expect[body["model_version"]][i]  # exact: numpy reference
            assert body["class"] == CLASSES[body["class_index"]] and 0.25 <= body["score"] <= 1.0
            seen.setdefault(cam, set()).add((body["role"], body["model_version"]))
        assert all(len(v) == 1 for v in seen.values())  # sticky: one arm per camera
        assert {c for c, v in seen.items() if v == {("challenger", "2")}} == expected_ch
        assert {c for c, v in seen.items() if v == {("champion", "1")}} == set(CAMS) - expected_ch

        give_feedback(base, world, frames)
        assert HTTP.post(f"{base}/feedback", json={"frame_id": "x", "label": "dent"}).status_code == 422
        report = HTTP.get(f"{base}/report").json()
        for role, v, cams in (("champion", "1", set(CAMS) - expected_ch), ("challenger", "2", expected_ch)):
            mine = [i for c, _, i in frames if c in cams]
            stats = report["overall"][role]
            assert stats["labelled"] == len(mine) and stats["versions"] == [v]
            assert stats["correct"] == sum(world.expect[v][i] == world.labels[i] for i in mine)
            lo, hi = wilson_interval(stats["correct"], len(mine))
            assert stats["accuracy_ci95"] == [lo, hi]
            defects = [i for i in mine if world.labels[i] != 0]
            assert stats["defect_recall"] == sum(world.expect[v][i] != 0 for i in defects) / len(defects)
            assert set(report["per_camera"]) == set(CAMS)
        assert report["overall"]["champion"]["defect_recall"] == 0.0  # the always-ok model misses every defect
        assert report["decision_preview"]["action"] == "promote"

        metrics = HTTP.get(f"{base}/metrics").json()
        n_ch = sum(c in expected_ch for c, _, _ in frames)
        assert metrics["requests"] == len(frames) and metrics["errors"] == 0
        assert metrics["models"]["challenger:2"]["requests"] == n_ch
        assert metrics["models"]["champion:1"]["requests"] == len(frames) - n_ch
        assert metrics["latency_ms"]["p50"] <= metrics["latency_ms"]["p99"]
        prom = HTTP.get(f"{base}/metrics", params={"format": "prometheus"}).text
        assert f"sensitune_requests_total {float(len(frames))}\n" in prom
        assert f'sensitune_model_requests_total{{role="challenger",version="2"}} {float(n_ch)}' in prom

        # promote: manifest rewritten, alias moved, decision + evidence + alias moves logged
        out = HTTP.post(f"{base}/decide", json={}).json()
        assert out["action"] == "promote" and out["applied"] and out["state"]["champion"] == "2"
        cfg = load_config(cfg_path)
        assert cfg.champion.version == "2" and cfg.challenger is None
        rec = read_jsonl(logs / "decisions.jsonl")[0][-1]
        assert rec["action"] == "promote" and rec["evidence"]["challenger"]["labelled"] == n_ch
        assert rec["registry"] == "pending"  # the registry follows off the control lock (test_sync_hostile.py)
        moves = [(m["alias"], m["from_version"], m["to_version"]) for m in registry_moves(app.state.service, cfg_path)]
        assert moves == [("champion", "1", "2"), ("challenger", "2", None)]
        assert registry.get_alias("champion") == "2" and registry.get_alias("challenger") is None
        after = send(base, world, frames_for(CAMS, 2, "b", len(world.images)))
        assert {(r.json()["role"], r.json()["model_version"]) for r in after} == {("champion", "2")}

        # a worse challenger (always ok), half the cameras, judged through the CLI, which reloads the service
        manifest(cfg_path, world, "2", "3", challenger_share=0.5, registry=reg)
        registry.set_challenger("3")
        assert HTTP.post(f"{base}/reload", json={}).json()["challenger"] == "3"
        frames_c = frames_for(CAMS, 12, "c", len(world.images))
        assert all(r.status_code == 200 for r in send(base, world, frames_c))
        give_feedback(base, world, frames_c)
        assert rollout.main(["decide", "--config", str(cfg_path), "--reload-url", base]) == 0
        cfg = load_config(cfg_path)
        assert cfg.champion.version == "2" and cfg.challenger is None
        assert registry.get_alias("champion") == "2" and registry.get_alias("challenger") is None
        rec = read_jsonl(logs / "decisions.jsonl")[0][-1]
        # the always-ok v3 passes every defect: the escape-rate guard rolls it back before accuracy is weighed
        assert rec["action"] == "rollback" and rec["source"] == "cli" and "escape rate" in rec["reasons"][0]
        assert HTTP.get(f"{base}/readyz").json()["challenger"] is None  # --reload-url reached the service


def test_malformed_manifest_on_reload_is_refused_and_old_config_serves(world: World, tmp_path: Path) -> None:
    cfg_path = manifest(tmp_path / "rollout.yaml", world, "2", "1", challenger_share=0.5)
    good = cfg_path.read_text()
    frames = frames_for(CAMS, 2, "m", len(world.images))
    with serve(create_app(cfg_path)) as base:
        before = [(r.json()["role"], r.json()["model_version"]) for r in send(base, world, frames)]
        cfg_path.write_text("line: [unclosed\n")
        r = HTTP.post(f"{base}/reload", json={})
        assert r.status_code == 400 and "not valid YAML" in r.json()["error"] and "\n" not in r.json()["error"]
        cfg_path.write_text(good.replace("challenger_share: 0.5", "challenger_share: 1.5"))
        r = HTTP.post(f"{base}/reload", json={})
        assert r.status_code == 400 and "challenger_share=1.5" in r.json()["error"]
        assert r.json()["champion"] == "2" and r.json()["challenger"] == "1"  # still the old configuration
        again = send(base, world, frames)
        assert [(r.json()["role"], r.json()["model_version"]) for r in again] == before
        assert HTTP.get(f"{base}/readyz").status_code == 200
        assert HTTP.get(f"{base}/metrics").json()["reloads_refused"] == 2


def test_corrupt_challenger_while_serving_is_rolled_back_and_no_request_fails(world: World, tmp_path: Path) -> None:
    registry = register(world, "inspector-fault")
    registry.set_challenger("3")
    art = shutil.copytree(world.art["3"], tmp_path / "v3")  # a copy: this test corrupts it
    reg = {"tracking_uri": world.mlflow_uri, "model_name": "inspector-fault"}
    cfg_path = manifest(tmp_path / "rollout.yaml", world, "2", "3", art={"3": art}, challenger_share=0.5, registry=reg)
    stop, results = threading.Event(), []

    def camera_traffic(base: str) -> None:
        k = 0
        while not stop.is_set():
            k += 1
            started = time.monotonic()  # a batch counts as "after the reload" only if it started after it
            results.append((started, send(base, world, frames_for(CAMS, 1, f"f{k}", len(world.images)))))

    with serve(app := create_app(cfg_path)) as base:
        traffic = threading.Thread(target=camera_traffic, args=(base,))
        traffic.start()
        while len(results) < 2:
            time.sleep(0.01)
        blob = bytearray((art / "model.bin").read_bytes())
        blob[: len(blob) // 2] = bytes(len(blob) // 2)
        (art / "model.bin").write_bytes(bytes(blob))
        r = HTTP.post(f"{base}/reload", json={})
        reloaded = time.monotonic()
        n_before = len(results)
        while len(results) < n_before + 3:  # more traffic after the swap
            time.sleep(0.01)
        stop.set()
        traffic.join()
        state = HTTP.get(f"{base}/readyz").json()
    assert (
        r.status_code == 200 and r.json()["challenger_state"] == "failed" and "sha256" in r.json()["challenger_error"]
    )
    responses = [x for _, batch in results for x in batch]
    assert [x.status_code for x in responses] == [200] * len(responses)  # the line never saw an error
    late = [x.json() for t, batch in results if t > reloaded for x in batch]
    assert late and {(b["role"], b["model_version"]) for b in late} == {("champion", "2")}
    assert state["challenger"] is None and state["challenger_state"] == "failed"
    assert load_config(cfg_path).challenger is None
    rec = last_decision(cfg_path)
    assert (rec["action"], rec["source"], rec["applied"]) == ("rollback", "auto:load", True)
    assert "sha256 differs" in rec["reasons"][0]
    moves = registry_moves(app.state.service, cfg_path)
    assert [(m["alias"], m["to_version"]) for m in moves] == [("challenger", None)]
    assert registry.get_alias("challenger") is None and registry.get_alias("champion") == "1"


def test_challenger_inference_error_is_answered_by_champion_then_rolled_back(world: World, tmp_path: Path) -> None:
    cfg_path = manifest(tmp_path / "rollout.yaml", world, "2", "1", challenger_share=1.0)
    app = create_app(cfg_path)

    def broken(*args: object) -> dict:
        raise RuntimeError("Exception from src/inference: simulated device fault")

    app.state.service.runtime.challenger.predict = broken
    frames = frames_for(CAMS[:4], 3, "e", len(world.images))
    with serve(app) as base:
        res = send(base, world, frames, threads=1)
        for (_, _, i), r in zip(frames, res):
            assert r.status_code == 200
            assert (r.json()["role"], r.json()["model_version"], r.json()["class_index"]) == (
                "champion",
                "2",
                world.expect["2"][i],
            )
        deadline = time.monotonic() + 20
        while load_config(cfg_path).challenger is not None and time.monotonic() < deadline:
            time.sleep(0.05)  # the rollback runs in a background thread
        metrics = HTTP.get(f"{base}/metrics").json()
    assert load_config(cfg_path).challenger is None
    # 1 error in 1 attempt already puts the error rate's 95 % lower bound (0.21) above 0.05: one fallback only
    assert metrics["fallbacks"] == 1 and metrics["models"]["challenger:1"]["errors"] == 1
    rec = last_decision(cfg_path)
    assert (rec["action"], rec["source"]) == ("rollback", "auto:error-rate") and "simulated device fault" in rec[
        "reasons"
    ][0]
    preds = read_jsonl(tmp_path / "logs" / "predictions.jsonl")[0]
    assert sum(bool(p.get("error")) for p in preds) == 1 and sum(bool(p.get("fallback")) for p in preds) == 1


def test_shadow_mode_logs_challenger_on_champion_frames_for_a_paired_test(world: World, tmp_path: Path) -> None:
    cfg_path = manifest(tmp_path / "rollout.yaml", world, "1", "2", challenger_share=0.0, shadow=True)
    frames = [(CAMS[i % 12], f"s-{i}", i) for i in range(len(world.images))]
    with serve(create_app(cfg_path)) as base:
        res = send(base, world, frames)
        assert {(r.json()["role"], r.json()["model_version"]) for r in res} == {("champion", "1")}
        give_feedback(base, world, frames)
        deadline = time.monotonic() + 20
        while (HTTP.get(f"{base}/report").json()["paired"] or {}).get("frames", 0) < len(frames):
            assert time.monotonic() < deadline, "shadow predictions did not arrive"
            time.sleep(0.05)
        report = HTTP.get(f"{base}/report").json()
    truth, champ, chall = np.array(world.labels), world.expect["1"], world.expect["2"]
    b = int(((champ == truth) & (chall != truth)).sum())
    c = int(((champ != truth) & (chall == truth)).sum())
    paired = report["paired"]
    assert (paired["frames"], paired["labelled"], paired["b"], paired["c"]) == (len(frames), len(frames), b, c)
    assert paired["p_value"] == pytest.approx(
        min(1.0, 2 * sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c))
    )
    assert paired["agreement"] == pytest.approx(float((champ == chall).mean()))
    ch = report["overall"]["challenger"]
    assert (ch["served"], ch["shadow"], ch["labelled"]) == (0, len(frames), len(frames))
    records = read_jsonl(tmp_path / "logs" / "predictions.jsonl")[0]
    assert all(json.dumps(r) for r in records) and len(records) == 2 * len(frames)


def test_missing_champion_starts_unready_until_a_reload_fixes_it(world: World, tmp_path: Path) -> None:
    cfg_path = manifest(tmp_path / "rollout.yaml", world, "2", None, art={"2": tmp_path / "nowhere"})
    service = EdgeService(cfg_path)
    assert service.runtime.state()["champion"] is None and "nowhere" in service.runtime.champion_error
    status, body = service.predict(world.images[0], "cam-0", None)
    assert status == 503 and "champion not loaded" in body["error"]
    manifest(cfg_path, world, "2", None)
    assert service.reload(LOCAL)["ok"] and service.runtime.champion.version == "2"
    status, body = service.predict(world.images[0], "cam-0", "f1")
    assert status == 200 and body["class_index"] == world.expect["2"][0]
    service.close()
