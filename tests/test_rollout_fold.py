"""deploy.edge.rollout.fold: a kept fold reads only what the logs gained, and reports what a fold from the first
line reports (`compare(keep=False)`), whatever order answers and labels come in."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from deploy.edge.rollout import fold, stats
from spt_core.portable.operating_point import OperatingPoint

OP = OperatingPoint(ok_class="ok")
CLASSES = ("ok", "ok", "ok", "scratch", "spot")


def _line(**rec) -> str:
    return json.dumps(rec) + "\n"


def _events(rng: random.Random, frames: int, late: float) -> list[tuple[str, str]]:
    """(log, line) in the order a box writes them: each frame's served answer, its shadow answer a few frames later,
    now and then an error or another version's answer; labels for a third of the frames, most within a few frames,
    a share `late` long after (and then a few for frames never served), some changed."""
    out: list[tuple[int, str, str]] = []  # (time, log, line)
    for i in range(frames):
        cam, fid = f"cam{i % 3}", f"f{i:05d}"
        base = {"camera_id": cam, "frame_id": fid, "latency_ms": 5.0 + rng.random() * 20}
        role, version = ("challenger", "2") if rng.random() < 0.2 else ("champion", "1")  # canary cameras
        if rng.random() < 0.05:
            version = "0"  # an older model's answer: not in this report
        if rng.random() < 0.03:
            out.append((3 * i, "p", _line(**base, role=role, model_version=version, error="boom", served=False)))
            continue
        out.append((3 * i, "p", _line(**base, role=role, model_version=version, served=True,
                                       **{"class": rng.choice(CLASSES), "decision": rng.choice(("ok", "reject"))})))
        if role == "champion" and rng.random() < 0.7:  # the challenger in shadow, answered after the frame
            out.append((3 * i + rng.randint(1, 12), "p", _line(**base, role="challenger", model_version="2",
                                                                served=False, shadow=True,
                                                                **{"class": rng.choice(CLASSES)})))  # fmt: skip
        if rng.random() < 0.35:
            delay = rng.randint(300, 3000) if rng.random() < late else rng.randint(1, 30)
            label = rng.choice(CLASSES[2:])
            out.append((3 * i + delay, "f", _line(camera_id=cam, frame_id=fid, label=label)))
            if rng.random() < 0.1:  # the operator changes their mind: the last label counts
                out.append((3 * i + delay + 5, "f", _line(camera_id=cam, frame_id=fid, label=rng.choice(CLASSES))))
        if late and rng.random() < 0.01:  # the box refuses these; a log written elsewhere may hold them
            out.append((3 * i, "f", _line(camera_id=cam, frame_id=f"never{i}", label="ok")))
    return [(log, line) for _, log, line in sorted(out, key=lambda e: e[0])]


def _both(preds: Path, feedback: Path) -> tuple[dict, dict]:
    kw = {"champion_version": "1", "challenger_version": "2", "operating_point": OP}
    return stats.compare(preds, feedback, keep=True, **kw), stats.compare(preds, feedback, **kw)


def _kept(preds: Path, feedback: Path) -> fold.LogFold:
    return next(f for k, f in stats._FOLDS.items() if k[0] == str(preds.resolve()))


@pytest.mark.parametrize(("late", "seed"), [(0.0, 0), (0.0, 1), (0.2, 2)])
def test_a_kept_fold_reports_what_a_fold_from_the_first_line_does(tmp_path: Path, monkeypatch, late, seed):
    monkeypatch.setattr(fold, "LABEL_WINDOW", 64)  # frames; a label 300+ frames late has left it
    rng = random.Random(seed)
    preds, feedback = tmp_path / "predictions.jsonl", tmp_path / "feedback.jsonl"
    events = _events(rng, 1500, late)
    with open(preds, "a") as p, open(feedback, "a") as f:
        at = 0
        while at < len(events):
            step = rng.randint(1, 120)
            for log, line in events[at : at + step]:
                (p if log == "p" else f).write(line)
            p.flush(), f.flush()
            at += step
            kept, fresh = _both(preds, feedback)
            assert kept == fresh
    restarts = _kept(preds, feedback).restarts
    assert fresh["overall"]["champion"]["labelled"] > 100 and fresh["paired"]["labelled"] > 50
    if late:  # a label the window no longer holds: read again from the first line, and still the same report
        assert restarts > 0
    else:  # every label joined an answer the fold still held: nothing was read twice
        assert restarts == 0


def test_a_line_being_written_waits_and_a_replaced_log_is_read_again(tmp_path: Path):
    preds, feedback = tmp_path / "predictions.jsonl", tmp_path / "feedback.jsonl"
    one = _line(camera_id="c", frame_id="a", role="champion", model_version="1", served=True, latency_ms=3.0,
                **{"class": "ok", "decision": "ok"})  # fmt: skip
    preds.write_text(one + one[:20])  # the second record is half written
    kept, fresh = _both(preds, feedback)
    assert kept["log"] == {"predictions": 1, "feedback": 0, "skipped_lines": 0}
    assert fresh["log"]["skipped_lines"] == 1  # read once, the torn tail is counted as a box restart leaves it
    with open(preds, "a") as f:
        f.write(one[20:])
    feedback.write_text(_line(camera_id="c", frame_id="a", label="scratch"))
    kept, fresh = _both(preds, feedback)
    assert kept == fresh and kept["overall"]["champion"]["requests"] == 2 and kept["overall"]["champion"]["labelled"] == 2
    first = _kept(preds, feedback)
    # logrotate: copytruncate (shorter), then a new file in its place (same length, other bytes)
    preds.write_text(one)
    assert _both(preds, feedback)[0]["overall"]["champion"]["requests"] == 1 and first.restarts == 1
    preds.unlink()
    preds.write_text(one.replace('"c"', '"d"'))
    kept, fresh = _both(preds, feedback)
    assert kept == fresh and list(kept["per_camera"]) == ["d"] and first.restarts == 2


def test_a_kept_fold_holds_at_most_its_window_of_unlabelled_frames(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(fold, "LABEL_WINDOW", 100)
    preds, feedback = tmp_path / "predictions.jsonl", tmp_path / "feedback.jsonl"
    preds.write_text("".join(_line(camera_id="c", frame_id=f"f{i}", role="champion", model_version="1", served=True,
                                   **{"class": "ok"}) for i in range(1000)))  # fmt: skip
    stats.compare(preds, feedback, champion_version="1", keep=True)
    kept = _kept(preds, feedback)
    assert len(kept.unlabelled) == 100 and kept.forgot
