"""Every operator label becomes training data: 20 frames that the box's frame store did not keep at serve time,
labelled on the Review page and through POST /feedback (confirmations and corrections, frames still in the
store's recent buffer and frames long gone from it that the label brings along), are uploaded by the box's sync
and ingested into ``paths.raw`` by the training side (`pipelines.incoming.ingest_incoming`): 20 new images.

The registry's artifact store is a dict here (`Files`): tests/test_sync.py and tests/test_flywheel.py (slow) run
the same upload and ingest against a real `mlflow server`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from support.servers import free_port
from support.ui import TOKENS, Line, build_line, label_of

from benchmarks.stat_model import CLASSES
from deploy.edge.auth import TokenStore, token_digest
from deploy.edge.service import create_app
from pipelines import incoming

AS = {role: {"Authorization": f"Bearer {t}"} for t, (_, role) in TOKENS.items()}
RECENT = 8  # frames the store holds in memory for a late label; the first 12 of 20 fall out of it


class Files:
    """The registry's artifact proxy as the sync and the ingest use it: put, get, list one level."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def put_file(self, path: str, data: bytes) -> None:
        self.files[path] = data

    def get_file(self, path: str) -> bytes:
        return self.files[path]

    def list_files(self, path: str) -> list[dict]:
        children = {p[len(path) + 1 :].split("/")[0]: p.count("/") > path.count("/") + 1
                    for p in self.files if p.startswith(path + "/")}  # fmt: skip
        return [{"path": f"{path}/{name}", "is_dir": is_dir} for name, is_dir in sorted(children.items())]


@pytest.fixture
def line(tmp_path: Path) -> Line:
    return build_line(tmp_path, n_per_class=5)  # 4 classes x 5 = 20 different frames


def _client(line: Line) -> tuple[TestClient, object]:
    frames = {"dir": "frames", "random_rate": 0.0, "low_margin": 0.0, "disagreement": False, "recent": RECENT}
    box = {"box": "box-a", "line": "line-7", "store": "store", "frames": frames,
           "registry": {"url": f"http://127.0.0.1:{free_port()}", "model_name": "m", "timeout_s": 1},
           "sync": {"interval_s": 3600}}  # fmt: skip
    (line.root / "box.yaml").write_text(yaml.safe_dump(box))
    tokens = TokenStore([(name, role, token_digest(t)) for t, (name, role) in TOKENS.items()], "tests")
    app = create_app(line.manifest, tokens, line.root / "box.yaml")
    return TestClient(app, base_url="http://127.0.0.1"), app.state.service


def test_twenty_labels_on_unkept_frames_become_twenty_training_images(
    line: Line, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, service = _client(line)
    served = []
    for i in range(20):
        r = client.post("/predict", files={"file": line.images[i]}, data={"camera_id": f"cam-{i % 4}"},
                        headers=AS["camera"])  # fmt: skip
        assert r.status_code == 200, r.text
        served.append(r.json())
    assert service.frame_store.stats()["frames"] == 0  # the rule kept none of them at serve time
    # the operators' labels: mostly the true class (the demo models get these right: confirmations), every third
    # frame another class (a correction)
    truth = [label_of(line, i) if i % 3 else next(c for c in CLASSES if c != served[i]["class"]) for i in range(20)]
    assert {s["class"] == t for s, t in zip(served, truth)} == {True, False}

    # a frame the buffer forgot: a label alone is counted but cannot keep it; wrong bytes are refused
    old = {"frame_id": served[0]["frame_id"], "label": truth[0]}
    r = client.post("/feedback", json=old, headers=AS["operator"])
    assert r.status_code == 200 and r.json()["frame_kept"] is False
    other = base64.b64encode(line.images[1]).decode()
    r = client.post("/feedback", json=old | {"image": other}, headers=AS["operator"])
    assert r.status_code == 422 and "not the bytes /predict received" in r.json()["error"]
    assert client.post("/feedback", json=old | {"image": "%%%"}, headers=AS["operator"]).status_code == 422

    for i, s in enumerate(served):
        if i < 20 - RECENT:  # gone from the buffer: the API brings the frame along
            body = {"frame_id": s["frame_id"], "label": truth[i], "image": base64.b64encode(line.images[i]).decode()}
            r = client.post("/feedback", json=body, headers=AS["operator"])
        elif i % 2:  # still held: the Review page's buttons
            r = client.post("/ui/review/label", data={"frame_id": s["frame_id"], "label": truth[i]},
                            headers=AS["operator"])  # fmt: skip
            assert r.status_code == 200 and "not kept" not in r.text
            continue
        else:
            r = client.post("/feedback", json={"frame_id": s["frame_id"], "label": truth[i]}, headers=AS["operator"])
        assert r.status_code == 200 and r.json()["frame_kept"] is True, (i, r.text)
    labelled = service.frame_store.labelled_since(0, not_uploaded=True)
    assert len(labelled) == 20 and {f.label for f in labelled} == set(truth)
    assert {tuple(f.reasons) for f in labelled} == {("confirmed",), ("corrected",)}

    # the box uploads them; the training side ingests them into paths.raw, once
    files = Files()
    service.sync.reg = files
    assert service.sync._upload_frames() == 20
    monkeypatch.setattr(incoming, "RestRegistry", lambda url, name: files)
    raw, ledger = tmp_path / "raw", tmp_path / "ingested.jsonl"
    for c in CLASSES:
        (raw / c).mkdir(parents=True)
    out = incoming.ingest_incoming("http://registry", raw, ledger)
    assert out["added"] == 20 and not out["skipped"], out
    images = sorted(raw.rglob("fb-*.png"))
    assert len(images) == 20 and sorted(p.read_bytes() for p in images) == sorted(line.images[:20])
    assert {p.parent.name for p in images} == set(truth)
    rows = [json.loads(x) for x in ledger.read_text().splitlines()]
    assert {r["labelled_by"] for r in rows} == {"olga"} and all(r["camera_id"] for r in rows)
    assert incoming.ingest_incoming("http://registry", raw, ledger)["added"] == 0  # ingested once
