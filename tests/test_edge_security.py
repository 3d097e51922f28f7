"""Issue 15: the edge on an untrusted plant network. One test per finding; each failed on the code before the fix.

Real uvicorn servers on 127.0.0.1 (and one `sensitune-edge` process, for the file faults that used to SIGBUS it),
tiny OpenVINO artifacts from deploy_fixtures whose answers are known exactly.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from deploy_fixtures import (
    ALWAYS_OK,
    CLASSES,
    build_artifact,
    demo_set,
    fit_linear,
    free_port,
    serve,
    write_manifest,
)
from PIL import Image, ImageFile

from deploy.edge.auth import AuthError, TokenStore, token_digest
from deploy.edge.rollout import load_config, read_jsonl
from deploy.edge.service import EdgeService, create_app, main
from spt_core.portable.preprocess import Preprocess

ROOT = Path(__file__).resolve().parents[1]
HTTP = httpx.Client(timeout=60)
TOKENS = {"cams": ("camera", "cam-secret"), "panel": ("operator", "op-secret"), "alice": ("admin", "admin-secret")}
STORE = TokenStore([(n, role, token_digest(t)) for n, (role, t) in TOKENS.items()], "test")
AS = {n: {"Authorization": f"Bearer {t}"} for n, (_, t) in TOKENS.items()}
RULE = {"min_samples": 5, "min_gain": 0.0, "max_latency_increase": 100.0, "max_error_rate": 0.05}


@dataclass
class World:
    root: Path
    images: list[bytes]
    labels: list[int]
    art: dict[str, Path]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("sec")
    items, pil, labels = demo_set(root / "images", n_per_class=4, size=48)
    w, b = fit_linear(pil, labels, Preprocess(size=(40, 40)))
    art = {"1": build_artifact(root / "v1", "1", *ALWAYS_OK, 32), "2": build_artifact(root / "v2", "2", w, b, 40)}
    return World(root, [p.read_bytes() for p, _ in items], labels, art)


def rollout(tmp: Path, world: World, champion: str, challenger: str | None, **kw: object) -> Path:
    """A rollout manifest in `tmp` with copies of the artifacts (tests may damage them)."""
    ref = {}
    for v in filter(None, (champion, challenger)):
        dst = tmp / f"art{v}"
        if not dst.exists():
            shutil.copytree(world.art[v], dst)
        ref[v] = {"version": v, "path": dst.name}
    fields = {"line": "line-7", "champion": ref[champion], "challenger": ref.get(challenger), "challenger_share": 0.5}
    fields |= {"decision": RULE, "log_dir": "logs"}
    return write_manifest(tmp / "rollout.yaml", **(fields | kw))


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def post_frame(base: str, data: bytes, cam: str, fid: str | None = None, who: str = "cams") -> httpx.Response:
    form = {"camera_id": cam} | ({"frame_id": fid} if fid else {})
    return HTTP.post(f"{base}/predict", files={"file": ("f.png", data, "image/png")}, data=form, headers=AS[who])


# --------------------------------------------------------------------------------------------- 1. credentials
def test_anonymous_decide_gets_401_and_each_role_does_only_its_job(world: World, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, world, "1", "2", cameras={"pinned": {"cam-a": "champion", "cam-b": "challenger"}})
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
        assert post_frame(base, world.images[0], "cam-a", "f1").status_code == 200
        assert HTTP.post(f"{base}/predict", data={"camera_id": "cam-a"}).status_code == 401
        assert post_frame(base, world.images[0], "cam-a", who="panel").status_code == 403  # operators do not predict
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


def test_a_cross_origin_form_post_cannot_act(world: World, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, world, "1", "2")
    before = cfg.read_bytes()
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.plant.local"}
    for app_tokens in (STORE, None):  # with tokens: no header, 401; even open on loopback: not JSON, 415
        with serve(create_app(cfg, app_tokens)) as base:
            for path in ("/reload", "/decide", "/promote", "/rollback"):
                r = HTTP.post(f"{base}{path}", content=b"x=1", headers=form)
                assert r.status_code == (401 if app_tokens else 415), (path, r.text)
                assert "access-control-allow-origin" not in r.headers
                r = HTTP.post(f"{base}{path}", content=b"x=1", headers=form | AS["alice"])
                assert r.status_code == 415 and "JSON body" in r.json()["error"]
            assert HTTP.get(f"{base}/metrics", headers=AS["alice"]).json()["reloads"] == 0
    assert cfg.read_bytes() == before and not (tmp_path / "logs" / "decisions.jsonl").exists()


def test_refuses_to_start_on_a_network_address_without_tokens(world: World, tmp_path: Path, capsys) -> None:
    cfg = rollout(tmp_path, world, "1", None)
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
    world: World, tmp_path: Path
) -> None:
    cfg = rollout(tmp_path, world, "2", "1", challenger_share=0.5)
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
        frames = [(c, i) for c in cams for i in range(len(world.images))]

        def answers() -> list[tuple[str, int, float]]:
            out = []
            for c, i in frames:
                r = HTTP.post(f"{base}/predict", files={"file": ("f.png", world.images[i])}, data={"camera_id": c})
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
def test_a_failed_promotion_leaves_the_manifest_byte_identical(world: World, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, world, "1", "2", cameras={"pinned": {"cam-a": "champion", "cam-b": "challenger"}})
    with serve(create_app(cfg, STORE)) as base:
        for k, data in enumerate(world.images):  # both arms labelled: the rule says promote
            for cam in ("cam-a", "cam-b"):
                assert post_frame(base, data, cam, f"p{k}").status_code == 200
                fb = {"camera_id": cam, "client_frame_id": f"p{k}", "label": CLASSES[world.labels[k]]}
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
        assert post_frame(base, world.images[0], "cam-b").json()["model_version"] == "2"
    # and after a restart the manifest is still the one that served
    service = EdgeService(cfg)
    assert service.runtime.champion.version == "1"
    service.close()
    outcomes = [(a["action"], a["outcome"]) for a in read_jsonl(tmp_path / "logs" / "audit.jsonl")[0]]
    assert outcomes == [("decide", "refused"), ("promote", "refused")]


def test_decide_logs_a_decision_only_when_something_changes(world: World, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, world, "1", "2")
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


# ---------------------------------------------------------------------------------------------- 4. limits
@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A 12000 x 12000 PNG of ~18 KB: 432 MB once decoded to RGB."""
    return png(Image.new("1", (12000, 12000)))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_12000px_png_is_refused_before_decode_with_bounded_memory(world: World, tmp_path: Path, bomb: bytes) -> None:
    code = (
        "import resource, sys\n"
        "from deploy.edge.limits import Limits, LimitError, open_image\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    open_image(data, Limits())\nexcept LimitError as e:\n    print(e.status, str(e))\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    (tmp_path / "bomb.png").write_bytes(bomb)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", code, str(tmp_path / "bomb.png")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=env).stdout.splitlines()
    assert out[0].startswith("413 file: 12000x12000 = 144000000 pixels")
    assert int(out[1]) < 20, f"peak RSS grew {out[1]} MB"  # a decode would be 144-432 MB
    cfg = rollout(tmp_path, world, "1", None)
    app = create_app(cfg, STORE)
    decoded = []
    with pytest.MonkeyPatch.context() as mp, serve(app) as base:
        load = ImageFile.ImageFile.load
        mp.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = post_frame(base, bomb, "cam-a", "big")
        assert r.status_code == 413 and "limits.max_pixels=25000000" in r.json()["error"]
        assert (12000, 12000) not in decoded  # the decode was never attempted
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100 * 1024
        assert post_frame(base, world.images[0], "cam-a").status_code == 200
    assert app.state.service.metrics.counts["refused_limits"] == 1


def test_bodies_formats_and_ids_over_the_limits_get_clear_4xx(world: World, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, world, "1", None, limits={"max_body_bytes": 1 << 20, "feedback_per_minute": 3})
    small = Image.open(io.BytesIO(world.images[0])).convert("RGB")
    with serve(create_app(cfg, STORE)) as base:
        r = HTTP.post(f"{base}/predict", content=b"\0" * (3 << 20), headers=AS["cams"] | {"Content-Type": "image/png"})
        assert r.status_code == 413 and "max_body_bytes=1048576" in r.json()["error"]

        def chunks():  # no Content-Length: cut off while it streams in
            yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="f.png"\r\n\r\n'
            for _ in range(64):
                yield b"\0" * (64 << 10)

        r = HTTP.post(
            f"{base}/predict",
            content=chunks(),
            headers=AS["cams"] | {"Content-Type": "multipart/form-data; boundary=x"},
        )
        assert r.status_code == 413
        for fmt in ("GIF", "TIFF", "WEBP", "ICO", "BMP"):
            r = post_frame(base, png(small, fmt), "cam-a")
            assert r.status_code == 415 and "PNG/JPEG" in r.json()["error"], fmt
        assert post_frame(base, png(small, "JPEG"), "cam-a").status_code == 200
        huge_id = "f" * (900 << 10)  # under the body limit, over the id limit
        for cam, fid in (("cam-a", huge_id), ("cam a", "x"), ("cam-a", "../../etc"), ("c" * 129, "x")):
            r = post_frame(base, world.images[0], cam, fid)
            assert r.status_code == 422 and len(r.text) < 400, (cam[:10], fid[:10])
        assert post_frame(base, world.images[0], "cam-a", "f" * (3 << 20)).status_code == 413
        served = post_frame(base, world.images[0], "cam-a", "ok-1").json()["frame_id"]
        fb = {"frame_id": served, "label": "ok"}
        for _ in range(3):
            assert HTTP.post(f"{base}/feedback", json=fb, headers=AS["panel"]).status_code == 200
        r = HTTP.post(f"{base}/feedback", json=fb, headers=AS["panel"])
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert HTTP.post(f"{base}/feedback", json=fb, headers=AS["alice"]).status_code == 200  # per client
    preds = read_jsonl(tmp_path / "logs" / "predictions.jsonl")[0]
    assert len(preds) == 2 and max(len(json.dumps(p)) for p in preds) < 1000  # no refused input reached a log


# ------------------------------------------------------------------------------------- 5. feedback ↔ frames
def test_colliding_frame_ids_cannot_join_across_cameras(world: World, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, world, "1", "2", cameras={"pinned": {"cam-a": "champion", "cam-b": "challenger"}})
    with serve(create_app(cfg, STORE)) as base:
        a = post_frame(base, world.images[5], "cam-a", "17").json()
        b = post_frame(base, world.images[9], "cam-b", "17").json()  # the same client id on another camera
        assert (a["role"], b["role"]) == ("champion", "challenger") and a["frame_id"] != b["frame_id"]
        fb = {"camera_id": "cam-a", "client_frame_id": "17", "label": "crack"}
        r = HTTP.post(f"{base}/feedback", json=fb, headers=AS["panel"])
        assert r.status_code == 200 and r.json()["frame_id"] == a["frame_id"]
        unknown = {"frame_id": "0" * 32, "label": "ok"}
        assert HTTP.post(f"{base}/feedback", json=unknown, headers=AS["panel"]).status_code == 404
        fb_c = {"camera_id": "cam-c", "client_frame_id": "17", "label": "ok"}
        assert HTTP.post(f"{base}/feedback", json=fb_c, headers=AS["panel"]).status_code == 404
        report = HTTP.get(f"{base}/report", headers=AS["panel"]).json()
    assert report["overall"]["champion"]["labelled"] == 1 and report["overall"]["challenger"]["labelled"] == 0
    assert report["paired"] is None  # McNemar only from shadow mode
    assert read_jsonl(tmp_path / "logs" / "feedback.jsonl")[0][0]["camera_id"] == "cam-a"
    # a restart keeps the served frames: feedback still joins
    service = EdgeService(cfg)
    assert service.frames.get(b["frame_id"]).camera_id == "cam-b"
    service.close()


# ------------------------------------------------------------------------------- 7. start-up, status, docs
def test_a_challenger_missing_at_start_is_retried_not_dropped(world: World, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, world, "1", "2", challenger_retry_s=30)
    shutil.move(tmp_path / "art2", tmp_path / "later")  # the mount is not there yet
    with serve(create_app(cfg, STORE)) as base:
        health = HTTP.get(f"{base}/healthz").json()
        assert (health["challenger"], health["challenger_state"]) == ("2", "pending")
        shutil.move(tmp_path / "later", tmp_path / "art2")
        deadline = time.monotonic() + 20
        while HTTP.get(f"{base}/healthz").json()["challenger_state"] != "serving":
            assert time.monotonic() < deadline, "the challenger was not retried"
            time.sleep(0.1)
    assert load_config(cfg).challenger.version == "2"
    assert not (tmp_path / "logs" / "decisions.jsonl").exists()


def test_healthz_has_the_rollout_state_and_docs_load_no_cdn(world: World, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, world, "1", "2")
    with serve(create_app(cfg, STORE)) as base:
        health = HTTP.get(f"{base}/healthz").json()
        assert health["status"] == "alive" and (health["champion"], health["challenger"]) == ("1", "2")
        assert health["challenger_state"] == "serving" and health["line"] == "line-7"
        for page, assets in (
            ("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")),
            ("/redoc", ("redoc.standalone.js",)),
        ):
            html = HTTP.get(f"{base}{page}").text
            assert "cdn" not in html.lower() and "https://" not in html and "http://" not in html, page
            for asset in assets:
                src = next(s for s in html.split('"') if s.endswith(asset))
                assert src.startswith("/static/") and HTTP.get(f"{base}{src}").status_code == 200
        prom = HTTP.get(f"{base}/metrics?format=prometheus", headers=AS["cams"])
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(prom.text)}
    assert {"sensitune_requests", "sensitune_request_latency_ms", "sensitune_model_requests"} <= names
    assert "python_gc_objects_collected" not in names  # a per-service registry, not the process-global one
