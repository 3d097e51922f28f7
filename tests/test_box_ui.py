"""A box with tokens and a frame store (`--tokens` and `--box` together): the operator pages, the API and the
sync all see one frame store, and every label carries the token's name into what the sync uploads.

No registry server here (the box's registry address is a closed port): tests/test_sync.py runs the sync against a
real `mlflow server`, tests/test_flywheel.py the whole loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from support.artifacts import CLASSES
from support.servers import free_port
from support.ui import TOKENS, Line, build_line, label_of

import deploy.edge.ui.views as views
from deploy.edge.auth import TokenStore, token_digest
from deploy.edge.rollout.manifest import load_config, write_config
from deploy.edge.service import create_app

AS = {role: {"Authorization": f"Bearer {t}"} for t, (_, role) in TOKENS.items()}
NAME_OF = {role: name for _, (name, role) in TOKENS.items()}


@pytest.fixture
def line(tmp_path: Path) -> Line:
    return build_line(tmp_path, n_per_class=4)


def _box(root: Path, frames: dict | None) -> Path:
    d = {"box": "box-a", "line": "line-7", "store": "store",
         "registry": {"url": f"http://127.0.0.1:{free_port()}", "model_name": "m", "timeout_s": 1},
         "sync": {"interval_s": 3600, "stale_after_s": 1}}  # fmt: skip
    if frames is not None:
        d["frames"] = frames
    (root / "box.yaml").write_text(yaml.safe_dump(d))
    return root / "box.yaml"


def _client(line: Line, box: Path | None) -> tuple[TestClient, object]:
    tokens = TokenStore([(name, role, token_digest(t)) for t, (name, role) in TOKENS.items()], "tests")
    app = create_app(line.manifest, tokens, box)
    return TestClient(app, base_url="http://127.0.0.1"), app.state.service  # a name the box answers to


def _send(client: TestClient, line: Line, i: int) -> dict:
    r = client.post("/predict", files={"file": line.images[i]}, data={"camera_id": f"cam-{i}"}, headers=AS["camera"])
    assert r.status_code == 200, r.text
    return r.json()


def test_tokens_and_box_one_frame_store_and_labels_carry_the_token_name(line: Line) -> None:
    # the box keeps every frame (random_rate 1): the review queue must be exactly the served frames, which a second
    # store with the default rule (1 % random, low margin) would not give
    box = _box(line.root, {"dir": "frames", "random_rate": 1.0, "low_margin": 0.0, "quota_mb": 20})
    client, service = _client(line, box)
    served = [_send(client, line, i) for i in range(4)]
    assert sorted(f.frame_id for f in service.frame_store.review_queue()) == sorted(s["frame_id"] for s in served)

    page = client.get("/ui/f/review", headers=AS["operator"])
    assert page.status_code == 200
    queued = set(re.findall(r'data-frame="([0-9a-f]+)"', page.text))
    assert queued == {s["frame_id"] for s in served}
    assert not (line.root / "logs/frames").exists()  # no second store beside the box's
    assert (line.root / "frames").is_dir()

    # labels: from the page (operator token) and from the API; neither without a token, nor with the camera's
    fid0, fid1 = served[0]["frame_id"], served[1]["frame_id"]
    form = {"frame_id": fid0, "label": label_of(line, 0)}
    assert client.post("/ui/review/label", data=form).status_code == 401
    assert client.post("/ui/review/label", data=form, headers=AS["camera"]).status_code == 403
    assert client.post("/ui/review/label", data=form, headers=AS["operator"]).status_code == 200
    fb = {"frame_id": fid1, "label": label_of(line, 1)}
    assert client.post("/feedback", json=fb).status_code == 401
    assert client.post("/feedback", json=fb, headers=AS["camera"]).status_code == 403
    r = client.post("/feedback", json=fb, headers=AS["admin"])
    assert r.status_code == 200 and r.json()["frame_kept"] is True
    labelled = {f.frame_id: f for f in service.frame_store.labelled_since(0, not_uploaded=True)}
    assert set(labelled) == {fid0, fid1}
    assert (labelled[fid0].labelled_by, labelled[fid1].labelled_by) == (NAME_OF["operator"], NAME_OF["admin"])
    assert labelled[fid0].label == label_of(line, 0)
    # off the queue once labelled, in the page too
    page = client.get("/ui/f/review", headers=AS["operator"])
    assert fid0 not in set(re.findall(r'data-frame="([0-9a-f]+)"', page.text))

    # the sync (registry unreachable) keeps the labels for later and the box keeps serving, stale
    out = service.sync.run_once()
    assert "error" in out and out.get("uploaded", 0) == 0
    assert len(service.frame_store.labelled_since(0, not_uploaded=True)) == 2
    health = client.get("/healthz", headers=AS["operator"]).json()
    assert health["sync"]["error"] and health["sync"]["stale"] is True
    assert _send(client, line, 5)["model_version"] in ("1", "2")


def test_without_a_box_the_pages_store_is_the_services(line: Line) -> None:
    client, service = _client(line, None)
    s = _send(client, line, 2)
    corrected = next(c for c in CLASSES if c != s["class"])  # any label keeps its frame: here a correction
    r = client.post("/feedback", json={"frame_id": s["frame_id"], "label": corrected}, headers=AS["operator"])
    assert r.status_code == 200 and r.json()["frame_kept"] is True  # the API's label lands in the pages' store
    frame, data = service.frame_store.get(s["frame_id"])
    assert data == line.images[2] and frame.labelled_by == NAME_OF["operator"]
    assert (line.root / "logs/frames").is_dir()


def _set_manifests(line: Line, drop: tuple[str, ...] = (), **fields: object) -> None:
    """Rewrite both artifacts' manifests with ``fields`` and without ``drop``, before the service loads them."""
    for p in sorted((line.root / "artifacts").glob("v*/manifest.json")):
        m = {k: v for k, v in json.loads(p.read_text()).items() if k not in drop} | fields
        p.write_text(json.dumps(m))


def test_the_pages_speak_to_an_operator(line: Line) -> None:
    _set_manifests(line, threshold=0.33984312725335286)
    client, service = _client(line, None)
    served = [_send(client, line, i) for i in range(6)]
    models = client.get("/ui/f/models", headers=AS["operator"]).text
    assert "reject when P(ok) &lt; 0.340" in models and "0.3398" not in models
    assert "None" not in models and re.search(r"created</dt><dd>2026-01-01 00:00:00 \(\d+ d ago\)", models)
    review = client.get("/ui/f/review", headers=AS["operator"]).text
    assert 'class="pg">P(good) ' in review and not re.search(r"\bscore \d", review)
    bad = next(s for s in served if s["class"] != "ok")  # a defect verdict bounds P(good) by 1 - its score
    assert views.p_good_text(None, bad["score"], bad["class"], "ok") == f"P(good) ≤ {1 - bad['score']:.2f}"
    assert views.p_good_text(None, 0.97, "ok", "ok") == "P(good) 0.97"
    state = {"last_ok": "2026-01-01T10:00:00+00:00", "last_ok_epoch": 1767261600.0, "error": None, "refused": {},
             "serving": {"champion": {"version": "3"}}}  # fmt: skip
    rows = dict(views.sync_rows(state, now=1767261690.0))
    assert rows == {"last ok": "2026-01-01 10:00:00 (90 s ago)", "error": "–", "refused": "none",
                    "serving": "champion: version: 3"}  # fmt: skip


def test_plain_classification_counts_by_top_class_and_rollout_yaml_never_says_null(line: Line) -> None:
    _set_manifests(line, drop=("ok_class",))  # an artifact from before ok_class was required: flagged, still served
    client, service = _client(line, None)
    for i in range(6):
        _send(client, line, i)
    models = client.get("/ui/f/models", headers=AS["operator"]).text
    assert "not recorded in the manifest: re-export with data.ok_class" in models
    _set_manifests(line, ok_class=None)  # recorded: a plain classifier, no good class
    client, service = _client(line, None)
    for i in range(6):
        _send(client, line, i)
    page = client.get("/ui/f/line", headers=AS["operator"]).text
    assert "no good class: counts by top class" in page and "rejected" not in page
    assert "plain classification" in client.get("/ui/f/models", headers=AS["operator"]).text

    cfg = load_config(line.manifest)  # what sync, hand-over and the decision rule write back
    write_config(cfg, line.manifest)
    assert "ok_class" not in yaml.safe_load(line.manifest.read_text())  # left out, never null
    write_config(replace(cfg, ok_class="ok"), line.manifest)
    write_config(load_config(line.manifest), line.manifest)
    assert yaml.safe_load(line.manifest.read_text())["ok_class"] == "ok"  # a known value survives a rewrite
