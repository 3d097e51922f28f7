"""The line engineer's journey of tests/test_journey.py (slow) in seconds, for the default suite: the same steps, with
the pieces that cost minutes replaced by the cheapest real thing.

    Mono12 folder (16-bit PNG + TIFF, imbalanced) -> `sensitune init --from` (git, DVC, import) -> prepare
    -> champion v1: the statistic model (benchmarks/stat_model.py) least-squares fitted to the prepared train split,
       instead of dvc repro's tuned ViT; a fake MLflow REST server (tests/support/registry.py) instead of a real one
    -> a box with tokens (camera, operator, admin) starts from the registry alone and serves v1
    -> operators label new frames with the Review page's form -> the box's sync uploads them -> ingest into data/raw
       -> prepare: they are training images -> v2 fitted to them, instead of the nightly flow's training
    -> v2 registered without an alias: the box does not serve it; the hand-over gate passes it -> alias -> the box
       serves it as challenger and the Models page shows it; a v3 the gate refuses never reaches the box.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support.artifacts import N_FEATURES, build_artifact, fit_linear, reference_logits, variant
from support.boxes import AS, TOKENS
from support.images import line_frames, mono12_line
from support.registry import FakeRegistry

from deploy.edge.auth import TokenStore, token_digest
from deploy.edge.service import create_app
from pipelines import incoming, stages
from pipelines.cli import main
from pipelines.config import load_params
from pipelines.gate import HANDOVER, NOT_PROMOTED, handover_gate
from spt_core.portable.preprocess import Preprocess

NAME, SIZE = "sensitune-line7", 32
LINE = {"good": 24, "scratch": 8, "dent": 8, "stain": 8}
NEW = {"good": 3, "scratch": 3, "dent": 3, "stain": 3}  # the frames the operators label: 12
PRE = Preprocess(size=(SIZE, SIZE), bit_depth=12)  # the camera's 12 bits, as prepare measured them


def _split(data: Path, split: str, classes: list[str]) -> tuple[list[Image.Image], list[int]]:
    files = sorted(p for p in (data / split).glob("*/*") if p.is_file())
    return [Image.open(p).convert("RGB") for p in files], [classes.index(p.parent.name) for p in files]


def _fit(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest real training: least squares on the prepared train split (real, imperfect verdicts)."""
    return fit_linear(*_split(data, "train", _classes(data)), PRE)


def _accuracy(data: Path, wb: tuple[np.ndarray, np.ndarray]) -> float:
    """Held-out (test split) accuracy, computed as the box computes the logits (`reference_logits`)."""
    images, labels = _split(data, "test", _classes(data))
    return float(np.mean(reference_logits(images, PRE, *wb).argmax(1) == np.array(labels)))


def _artifact(data: Path, out: Path, version: str, wb: tuple[np.ndarray, np.ndarray]) -> Path:
    extra = {"class_names": _classes(data), "ok_class": "good", "preprocess": PRE.to_dict(), "model_name": NAME}
    return build_artifact(out, version, *wb, SIZE, extra)


def _classes(data: Path) -> list[str]:
    return json.loads((data / "dataset.json").read_text())["class_names"]


def test_labels_become_training_images_and_the_challenger_reaches_the_box_only_after_its_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1-2. the engineer's folder becomes a line project; prepare measures the camera's bit depth
    project = tmp_path / "line7"
    assert main(["init", str(project), "--from", str(mono12_line(tmp_path / "my_line", LINE, SIZE))]) == 0
    monkeypatch.chdir(project)
    params = load_params("params.yaml")
    assert params["data"]["ok_class"] == "good"
    info = stages.prepare_stage(params)
    assert (info["bit_depth"], info["bit_depth_inferred"]) == (12, True)
    n_before = sum(n for split in info["counts"].values() for n in split.values())
    assert n_before == sum(LINE.values())

    # 3-4. v1 becomes the champion; a box with tokens starts from the registry alone and serves it
    fake = FakeRegistry()
    try:
        wb1 = _fit(project / "data/prepared")
        fake.publish(_artifact(project / "data/prepared", tmp_path / "v1", "1", wb1), "1", "champion")
        box = tmp_path / "box"
        box.mkdir()
        (box / "box.yaml").write_text(json.dumps({
            "box": "box-7", "line": "line-7", "store": "store", "sync": {"interval_s": 3600},
            "registry": {"url": fake.url, "model_name": NAME, "timeout_s": 2},
            "frames": {"dir": "frames", "random_rate": 1.0, "quota_mb": 50}}))  # fmt: skip
        tokens = TokenStore([(n, role, token_digest(t)) for n, (role, t) in TOKENS.items()], "journey")
        app = create_app(box / "rollout.yaml", tokens, box / "box.yaml")
        client, service = TestClient(app, base_url="http://127.0.0.1"), app.state.service
        assert _serving(client) == ("1", None)

        # 5. new frames from the camera (16-bit PNG and TIFF); operators label each with the Review page's form
        frames = line_frames(mono12_line(tmp_path / "new", NEW, SIZE, batch=1))
        for i, (path, label) in enumerate(frames):
            cam = {"camera_id": f"cam-{i % 2}"}
            r = client.post("/predict", files={"file": (path.name, path.read_bytes())}, data=cam, headers=AS["camera"])
            assert r.status_code == 200 and r.json()["model_version"] == "1", r.text
            r = client.post("/ui/review/label", data={"frame_id": r.json()["frame_id"], "label": label},
                            headers=AS["operator"])  # fmt: skip
            assert r.status_code == 200 and "not kept" not in r.text, r.text
        assert client.post("/ui/review/label", data={"frame_id": "x", "label": "good"},
                           headers=AS["camera"]).status_code == 403  # fmt: skip

        # 6. the sync uploads them; the training side ingests them into data/raw; prepare splits them with the rest
        assert service.sync.run_once()["uploaded"] == len(frames)
        got = incoming.ingest_incoming(fake.url, "data/raw", "runs/retrain/ingested.jsonl", NAME)
        assert got["added"] == len(frames) and got["by_label"] == NEW, got
        fed = sorted(Path(f).read_bytes() for f in got["files"])
        assert fed == sorted(p.read_bytes() for p, _ in frames)  # the very bytes the camera sent, 16-bit as they were
        assert {Path(f).parent.name for f in got["files"]} == set(NEW)
        params["paths"]["data"] = "data/retrain"
        counts = stages.prepare_stage(params)["counts"]
        assert sum(n for split in counts.values() for n in split.values()) == n_before + len(frames)
        retrain = project / "data/retrain"
        wb2 = _fit(retrain)
        v2 = _artifact(retrain, tmp_path / "v2", "2", wb2)

        # 7. registered, not yet gated: no alias, and the box keeps serving v1 alone
        fake.publish(v2, "2", alias=None)
        service.sync.run_once()
        assert _serving(client) == ("1", None)
        acc1, acc2 = _accuracy(retrain, wb1), _accuracy(retrain, wb2)  # champion and challenger, the same held-out set
        decision, reason = handover_gate(acc2, acc1, -1.0, promotable=True)  # the flow's margin in test_flywheel
        assert decision == HANDOVER, reason
        fake.point("challenger", "2")  # the hand-over: the alias moves after the gate passed
        service.sync.run_once()
        assert _serving(client) == ("1", "2")

        # a v3 that calls every part good: the gate refuses it, no alias moves, the box never pulls it (registered with
        # v2's files: nothing downloads a version no alias points at)
        acc3 = _accuracy(retrain, (np.zeros((4, N_FEATURES)), np.eye(4)[_classes(retrain).index("good")]))
        fake.publish(variant(v2, tmp_path / "v3", "3"), "3", alias=None)
        decision, reason = handover_gate(acc3, acc1, 0.0, promotable=True)
        assert (decision, acc3 < acc1) == (NOT_PROMOTED, True), reason
        service.sync.run_once()
        assert _serving(client) == ("1", "2") and not (box / "store" / "3").exists()

        # 8. the Models page shows the challenger the box serves
        page = client.get("/ui/f/models", headers=AS["operator"]).text
        assert 'data-version="2" data-role="challenger"' in page and 'data-version="1" data-role="champion"' in page
    finally:
        fake.server.shutdown()


def _serving(client: TestClient) -> tuple[str, str | None]:
    s = client.get("/readyz").json()
    return s["champion"], s["challenger"]


def test_the_flow_registers_under_the_name_dvc_repro_publishes_to() -> None:
    """publish.model_name names the model for `dvc repro` (publish) and the nightly flow alike: the flow's retrain is
    then compared with, and handed over beside, the champion `dvc repro` published."""
    from pipelines.flows import model_name_for

    assert model_name_for(load_params(None, {"publish.model_name": NAME}), None) == NAME
    assert model_name_for(load_params(None), None) == "sensitune-tf_efficientnet_lite0"
    assert model_name_for(load_params(None, {"publish.model_name": NAME}), "given") == "given"
