"""Issue 15, continued from test_edge_security.py: the edge's limits (decompression bombs, bodies, formats, ids,
rates), feedback joined to frames per camera, and start-up, status and docs that need no CDN.

Real uvicorn servers on 127.0.0.1, tiny OpenVINO artifacts (support/edge.py, the `edge_world` fixture).
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageFile
from support.edge import AS, HTTP, STORE, EdgeWorld, png, post_frame, rollout
from support.servers import serve

from deploy.edge.rollout import load_config, read_jsonl
from deploy.edge.service import EdgeService, create_app

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- 4. limits
@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A 12000 x 12000 PNG of ~18 KB: 432 MB once decoded to RGB."""
    return png(Image.new("1", (12000, 12000)))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_12000px_png_is_refused_before_decode_with_bounded_memory(
    edge_world: EdgeWorld, tmp_path: Path, bomb: bytes
) -> None:
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
    cfg = rollout(tmp_path, edge_world, "1", None)
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
        assert post_frame(base, edge_world.images[0], "cam-a").status_code == 200
    assert app.state.service.metrics.counts["refused_limits"] == 1


def test_bodies_formats_and_ids_over_the_limits_get_clear_4xx(edge_world: EdgeWorld, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, edge_world, "1", None, limits={"max_body_bytes": 1 << 20, "feedback_per_minute": 3})
    small = Image.open(io.BytesIO(edge_world.images[0])).convert("RGB")
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
        for fmt in ("GIF", "WEBP", "ICO", "BMP"):  # TIFF is served: training reads a camera archive's TIFFs too
            r = post_frame(base, png(small, fmt), "cam-a")
            error = r.json()["error"]
            assert r.status_code == 415 and "send PNG/JPEG/TIFF, or add the format to limits.formats" in error, fmt
        assert post_frame(base, png(small, "JPEG"), "cam-a").status_code == 200
        huge_id = "f" * (900 << 10)  # under the body limit, over the id limit
        for cam, fid in (("cam-a", huge_id), ("cam a", "x"), ("cam-a", "../../etc"), ("c" * 129, "x")):
            r = post_frame(base, edge_world.images[0], cam, fid)
            assert r.status_code == 422 and len(r.text) < 400, (cam[:10], fid[:10])
        assert post_frame(base, edge_world.images[0], "cam-a", "f" * (3 << 20)).status_code == 413
        served = post_frame(base, edge_world.images[0], "cam-a", "ok-1").json()["frame_id"]
        fb = {"frame_id": served, "label": "ok"}
        for _ in range(3):
            assert HTTP.post(f"{base}/feedback", json=fb, headers=AS["panel"]).status_code == 200
        r = HTTP.post(f"{base}/feedback", json=fb, headers=AS["panel"])
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert HTTP.post(f"{base}/feedback", json=fb, headers=AS["alice"]).status_code == 200  # per client
    preds = read_jsonl(tmp_path / "logs" / "predictions.jsonl")[0]
    assert len(preds) == 2 and max(len(json.dumps(p)) for p in preds) < 1000  # no refused input reached a log


# ------------------------------------------------------------------------------------- 5. feedback ↔ frames
def test_colliding_frame_ids_cannot_join_across_cameras(edge_world: EdgeWorld, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, edge_world, "1", "2", cameras={"pinned": {"cam-a": "champion", "cam-b": "challenger"}})
    with serve(create_app(cfg, STORE)) as base:
        a = post_frame(base, edge_world.images[5], "cam-a", "17").json()
        b = post_frame(base, edge_world.images[9], "cam-b", "17").json()  # the same client id on another camera
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
def test_a_challenger_missing_at_start_is_retried_not_dropped(edge_world: EdgeWorld, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, edge_world, "1", "2", challenger_retry_s=30)
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


def test_healthz_has_the_rollout_state_and_docs_load_no_cdn(edge_world: EdgeWorld, tmp_path: Path) -> None:
    cfg = rollout(tmp_path, edge_world, "1", "2")
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
