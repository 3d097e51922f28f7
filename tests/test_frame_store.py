"""deploy.edge.frame_store: which frames are kept, labels, the review queue, the upload cursor, the disk quota."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.edge.frame_store import FrameError, FrameRule, FrameStore, margin_of
from deploy.edge.metrics import Metrics


def png(seed: int, size: int = 16) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def rec(i: int, cls: str = "ok", probs: list[float] | None = None, **kw) -> dict:
    return {"frame_id": f"f{i}", "camera_id": "cam-1", "line": "line-1", "model_version": "3", "role": "champion",
            "class": cls, "score": 0.9, "probs": probs or [0.9, 0.05, 0.03, 0.02], **kw}  # fmt: skip


NO_RANDOM = FrameRule(random_rate=0.0, low_margin=0.2)


def test_selection_reasons(tmp_path: Path) -> None:
    s = FrameStore(tmp_path, NO_RANDOM)
    assert s.offer(rec(1), png(1)) == []  # confident, no disagreement: not kept
    assert s.offer(rec(2, probs=[0.5, 0.4, 0.05, 0.05]), png(2)) == ["low_margin"]
    assert s.offer(rec(3, other="scratch"), png(3)) == ["disagreement"]
    assert s.offer(rec(4, label="spot"), png(4)) == ["corrected"]
    assert margin_of([0.5, 0.4, 0.1]) == pytest.approx(0.1)
    always = FrameStore(tmp_path / "r", FrameRule(random_rate=1.0, low_margin=0.0, disagreement=False))
    assert always.offer(rec(5), png(5)) == ["random"]
    off = FrameStore(tmp_path / "off", FrameRule(random_rate=0.0, low_margin=0.0, disagreement=False, corrected=False))
    assert off.offer(rec(6, label="spot", other="crack", probs=[0.5, 0.5]), png(6)) == []
    with pytest.raises(FrameError):
        FrameRule.from_dict({"low_margn": 0.1})


def test_label_get_queue_and_cursor(tmp_path: Path) -> None:
    s = FrameStore(tmp_path, NO_RANDOM)
    s.offer(rec(1, probs=[0.45, 0.44, 0.1, 0.01]), png(1))
    s.offer(rec(2, probs=[0.5, 0.35, 0.1, 0.05]), png(2))
    assert [f.frame_id for f in s.review_queue()] == ["f1", "f2"]  # most doubtful first
    frame, data = s.get("f2")
    assert data == png(2) and frame.sha256 in s.image_path(frame).name and frame.reasons == ["low_margin"]
    assert s.labelled_since(0) == []
    f = s.label("f2", "scratch", who="alice")
    assert (f.label, f.labelled_by, f.reasons) == ("scratch", "alice", ["low_margin", "corrected"])
    assert [x.frame_id for x in s.review_queue()] == ["f1"]
    got = s.labelled_since(0)
    assert [x.frame_id for x in got] == ["f2"] and s.labelled_since(got[-1].seq) == []
    # confident frames the operator labels later are kept from the recent buffer, corrected or confirmed alike
    assert s.offer(rec(3), png(3)) == [] and s.offer(rec(4), png(4)) == []
    assert s.label("f3", "crack", who="bob").reasons == ["corrected"]
    f4 = s.label("f4", "ok", who="bob")
    assert (f4.reasons, f4.label, f4.predicted) == (["confirmed"], "ok", "ok") and s.get("f4")[1] == png(4)
    assert s.label("nope", "ok") is None  # its bytes are nowhere: nothing to keep
    s.mark_uploaded(["f2", "f3"])
    assert [x.frame_id for x in s.labelled_since(0, not_uploaded=True)] == ["f4"]
    s.close()
    again = FrameStore(tmp_path, NO_RANDOM)  # the index survives a restart
    assert again.get("f3")[0].label == "crack" and again.stats()["labelled"] == 3


def test_a_label_keeps_a_frame_the_buffer_forgot_when_the_caller_holds_its_bytes(tmp_path: Path) -> None:
    s = FrameStore(tmp_path, FrameRule(random_rate=0.0, low_margin=0.0, recent=2))
    for i in range(1, 5):
        assert s.offer(rec(i, cls="spot"), png(i)) == []  # f1, f2 fall out of the 2-frame buffer
    assert s.label("f1", "spot") is None and s.get("f1") is None
    f = s.label("f1", "spot", who="ann", served=({"camera_id": "cam-1", "class": "spot"}, png(1)))
    assert (f.frame_id, f.reasons, f.labelled_by) == ("f1", ["confirmed"], "ann") and s.get("f1")[1] == png(1)
    assert s.label("f4", "crack").reasons == ["corrected"]  # still in the buffer: no bytes needed


def test_same_bytes_one_file(tmp_path: Path) -> None:
    s = FrameStore(tmp_path, NO_RANDOM)
    s.offer(rec(1, label="spot"), png(1))
    s.offer(rec(2, label="spot"), png(1))
    assert len(list((tmp_path / "images").rglob("*.png"))) == 1 and s.stats()["frames"] == 2


def test_quota_evicts_unlabelled_then_uploaded_never_pending(tmp_path: Path) -> None:
    size = len(png(1))
    s = FrameStore(tmp_path, NO_RANDOM, quota_mb=3.5 * size / 1e6)  # room for 3 frames
    s.offer(rec(1, label="spot"), png(1))  # labelled, not uploaded: kept whatever happens
    s.offer(rec(2, other="crack"), png(2))
    s.offer(rec(3, other="crack"), png(3))
    s.offer(rec(4, other="crack"), png(4))  # evicts f2 (oldest unlabelled)
    assert s.get("f2") is None and s.get("f4") is not None and s.get("f1") is not None
    assert len(list((tmp_path / "images").rglob("*.png"))) == 3
    s.label("f3", "crack")
    s.label("f4", "crack")  # now all three are labelled and pending upload: nothing may go
    assert s.offer(rec(5, other="crack"), png(5)) == [] and s.stats()["refused"] == 1
    s.mark_uploaded(["f3"])
    assert s.offer(rec(6, other="crack"), png(6)) == ["disagreement"] and s.get("f3") is None


def test_one_noisy_camera_cannot_flood_the_review_queue(tmp_path: Path) -> None:
    """The incident: one camera sent 60 low-margin noise frames in 6 s. The default rule keeps about 20 of them (a
    bucket of 20 a minute); the rest are counted (Prometheus too), and stay labelable from the recent buffer."""
    now, metrics = [0.0], Metrics()
    s = FrameStore(tmp_path, FrameRule(random_rate=0.0, low_margin=0.2), count=metrics.count, clock=lambda: now[0])
    doubtful = [0.5, 0.4, 0.05, 0.05]
    kept = 0
    for i in range(60):
        now[0] = i * 0.1
        kept += bool(s.offer(rec(i, probs=doubtful), png(i)))
    assert kept == 21  # 20 at once, +1 refilled over 6 s at 20 a minute
    assert len(s.review_queue(limit=100, camera_id="cam-1")) == 21 and s.stats()["over_camera_quota"] == 39
    assert "sensitune_frames_over_camera_quota_total 39.0" in metrics.prometheus().decode()
    assert s.offer(rec(100, probs=doubtful, camera_id="cam-2"), png(100)) == ["low_margin"]  # other cameras keep theirs
    assert s.offer(rec(101, label="spot"), png(101)) == ["corrected"]  # a label is never held back
    assert s.label("f59", "scratch", who="ann").reasons == ["corrected"]  # held back, still labelable
    now[0] += 60.0  # the camera's bucket refills
    assert s.offer(rec(102, probs=doubtful), png(102)) == ["low_margin"]
    off = FrameStore(tmp_path / "off", FrameRule(random_rate=0.0, low_margin=0.2, camera_frames=0))
    assert all(off.offer(rec(i, probs=doubtful), png(i)) for i in range(30))
    with pytest.raises(FrameError, match="camera_window_s"):
        FrameRule.from_dict({"camera_window_s": 0})
