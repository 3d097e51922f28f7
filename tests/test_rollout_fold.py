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
    champion = kept["overall"]["champion"]
    assert kept == fresh and champion["requests"] == 2 and champion["labelled"] == 2
    first = _kept(preds, feedback)
    # logrotate: copytruncate (shorter), then a new file in its place (same length, other bytes)
    preds.write_text(one)
    assert _both(preds, feedback)[0]["overall"]["champion"]["requests"] == 1 and first.restarts == 1
    preds.unlink()
    preds.write_text(one.replace('"c"', '"d"'))
    kept, fresh = _both(preds, feedback)
    assert kept == fresh and list(kept["per_camera"]) == ["d"] and first.restarts == 2
    # rewritten in place past its first 4 kB, same length: the bytes where the last read stopped differ
    pad = _line(camera_id="d", frame_id="pad", role="other", model_version="9") * 100
    preds.write_text(pad + one.replace('"c"', '"d"'))
    _both(preds, feedback)
    preds.write_text(pad + one.replace('"c"', '"e"'))
    kept, fresh = _both(preds, feedback)
    assert kept == fresh and list(kept["per_camera"]) == ["e"] and first.restarts == 4


def test_a_kept_fold_holds_at_most_its_window_of_unlabelled_frames_and_a_few_answers_each(tmp_path: Path,
                                                                                           monkeypatch):  # fmt: skip
    monkeypatch.setattr(fold, "LABEL_WINDOW", 100)
    preds, feedback = tmp_path / "predictions.jsonl", tmp_path / "feedback.jsonl"
    preds.write_text("".join(_line(camera_id="c", frame_id=f"f{i}", role="champion", model_version="1", served=True,
                                   **{"class": "ok"}) for i in range(1000)))  # fmt: skip
    with open(preds, "a") as f:  # records without a frame id share one key: held as "not all held", not one by one
        f.write(_line(camera_id="c", role="champion", model_version="1", **{"class": "ok"}) * 500)
    stats.compare(preds, feedback, champion_version="1", keep=True)
    kept = _kept(preds, feedback)
    assert len(kept.unlabelled) == 100 and kept.forgot
    assert max(len(v) for v in kept.unlabelled.values()) <= fold.PER_FRAME


def _p(fid: str, role: str = "champion", version: str = "1", cls: str = "ok", **extra) -> str:
    return _line(camera_id="c", frame_id=fid, role=role, model_version=version, served=role == "champion",
                 latency_ms=5.0, **{"class": cls}, **extra)  # fmt: skip


@pytest.mark.parametrize("case", ["late shadow, label later", "late shadow and label together", "other version"])
def test_a_frame_answered_again_after_it_left_the_window_is_read_again(tmp_path: Path, monkeypatch, case: str):
    # frame f0 is answered, 5 other frames push it out of a window of 4, then f0 is answered again and labelled: the
    # label must count both answers, which only a fold from the first line still has
    monkeypatch.setattr(fold, "LABEL_WINDOW", 4)
    preds, feedback = tmp_path / "predictions.jsonl", tmp_path / "feedback.jsonl"
    others = "".join(_p(f"g{i}") + _p(f"g{i}", "challenger", "2", shadow=True) for i in range(5))
    again = _p("f0", "challenger", "2", "scratch", shadow=True) if case != "other version" else _p("f0", version="0")
    label = _line(camera_id="c", frame_id="f0", label="ok")
    steps = {"late shadow, label later": [(_p("f0") + others + again, ""), ("", label)],
             "late shadow and label together": [(_p("f0") + others, ""), (again, label)],
             "other version": [(_p("f0") + others + again, ""), ("", label)]}[case]  # fmt: skip
    for pred_lines, labels in steps:
        with open(preds, "a") as p, open(feedback, "a") as f:
            p.write(pred_lines), f.write(labels)
        kept, fresh = _both(preds, feedback)
        assert kept == fresh
    assert fresh["overall"]["champion"]["labelled"] == 1 and _kept(preds, feedback).restarts == 1


@pytest.mark.parametrize("seed", range(24))
def test_small_random_logs_with_a_tiny_window_report_the_same(tmp_path: Path, monkeypatch, seed: int):
    """Repeated frame ids, records without one, errors, other versions and roles, labels without a frame, in chunks
    of 1-6 lines, with windows of 1-3 frames: every report of the kept fold is the fresh fold's."""
    rng = random.Random(seed)
    monkeypatch.setattr(fold, "LABEL_WINDOW", rng.randint(1, 3))
    monkeypatch.setattr(fold, "PAIR_WINDOW", rng.randint(1, 3))
    preds, feedback = tmp_path / "predictions.jsonl", tmp_path / "feedback.jsonl"
    preds.touch(), feedback.touch()
    fids = [f"f{i}" for i in range(rng.randint(2, 8))]
    for _ in range(rng.randint(3, 10)):
        with open(preds, "a") as p, open(feedback, "a") as f:
            for _ in range(rng.randint(1, 6)):
                rec: dict = {"camera_id": rng.choice("ab"), "frame_id": rng.choice(fids)}
                if rng.random() < 0.1:
                    del rec["frame_id"]
                if rng.random() < 0.35:
                    f.write(_line(**rec, label=rng.choice(("ok", "s"))))
                    continue
                rec |= {"role": rng.choice(("champion", "challenger", "champion", "other")), "latency_ms": 1.0,
                        "model_version": rng.choice(("1", "2", "0"))}  # fmt: skip
                if rng.random() < 0.1:
                    rec |= {"error": "boom", "served": False}
                else:
                    rec |= {"class": rng.choice(("ok", "s")), "decision": rng.choice(("ok", "reject", None))}
                    if rec["role"] == "challenger" and rng.random() < 0.6:
                        rec |= {"shadow": True, "served": False}
                p.write(_line(**rec))
        kept, fresh = _both(preds, feedback)
        assert kept == fresh
