"""The rollout's rules without a server: the manifest's validation, the sticky camera split, the JSONL logs, the
statistics (Wilson, McNemar) and the promote / rollback / wait decision, each on known values.

The same rules on a live line (real uvicorn, cameras, feedback): tests/test_deploy.py.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
from support.rollout import bucket

from deploy.edge import rollout
from deploy.edge.rollout import (
    DecisionRule,
    JsonlLog,
    RolloutError,
    assign_arm,
    decide,
    load_config,
    mcnemar,
    parse_config,
    read_jsonl,
    wilson_interval,
)


def test_manifest_validation_reports_every_problem_in_one_line(tmp_path: Path) -> None:
    cfg = parse_config({"line": "l1", "champion": {"version": 3, "path": "a"}}, tmp_path)
    assert cfg.champion.version == "3" and cfg.challenger is None and cfg.decision == DecisionRule()
    assert parse_config(cfg.to_dict(), tmp_path) == cfg  # the rewrite round-trips
    bad = {"line": "", "champion": {"version": "1"}, "challenger_share": 1.5, "colour": 1, "decision": {"x": 1}}
    bad |= {"openvino": ["THROUGHPUT"], "cameras": {"pinned": {"cam-1": "canary"}}}
    with pytest.raises(RolloutError) as e:
        parse_config(bad, tmp_path, source="r.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("r.yaml: ")
    for key in ("line=", "champion:", "challenger_share=1.5", "'colour'", "decision=", "openvino=", "'canary'"):
        assert key in msg
    (tmp_path / "broken.yaml").write_text("line: [unclosed\n")
    with pytest.raises(RolloutError, match=r"broken.yaml: not valid YAML at line 2"):
        load_config(tmp_path / "broken.yaml")


def test_sticky_assignment_and_split() -> None:
    base = parse_config({"line": "l", "champion": {"version": "1", "path": "a"}}, Path("."))
    cfg = replace(base, challenger=rollout.ModelRef("2", "b"), challenger_share=0.25)
    cams = [f"cam-{i}" for i in range(2000)]
    arms = [assign_arm(c, cfg) for c in cams]
    assert arms == [assign_arm(c, cfg) for c in cams]  # sticky
    assert arms == ["challenger" if bucket(c, "2") < 0.25 else "champion" for c in cams]
    assert 0.22 < arms.count("challenger") / len(cams) < 0.28
    other = replace(cfg, challenger=rollout.ModelRef("3", "b"))
    assert [assign_arm(c, other) for c in cams] != arms  # a new challenger reshuffles the cameras
    first_ch = cams[arms.index("challenger")]
    pinned = replace(cfg, pinned={"cam-x": "challenger", first_ch: "champion"})
    assert assign_arm("cam-x", pinned) == "challenger" and assign_arm(first_ch, pinned) == "champion"
    assert assign_arm("cam-x", replace(pinned, challenger=None)) == "champion"  # no challenger: pins fall back


def test_jsonl_tolerates_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    log = JsonlLog(path, fsync_every=2)
    for i in range(3):
        log.append({"i": i})
    log.close()
    with open(path, "ab") as f:
        f.write(b'{"i": 3, "cla')  # crash mid-write
    assert read_jsonl(path) == ([{"i": 0}, {"i": 1}, {"i": 2}], 1)
    log = JsonlLog(path)  # reopening ends the torn line, so the next record stays readable
    log.append({"i": 4})
    log.close()
    assert read_jsonl(path) == ([{"i": 0}, {"i": 1}, {"i": 2}, {"i": 4}], 1)


def test_wilson_and_mcnemar_known_values() -> None:
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4901625, abs=1e-6) and hi == pytest.approx(0.9433178, abs=1e-6)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775328, abs=1e-6)) and wilson_interval(0, 0) is None
    assert wilson_interval(0, 3)[0] == 0.0 and wilson_interval(3, 3)[1] == 1.0  # exact ends, no rounding residue
    assert mcnemar(0, 6)["p_value"] == 2 / 2**6 and mcnemar(3, 3)["p_value"] == 1.0
    assert mcnemar(2, 9)["p_value"] == pytest.approx(2 * (1 + 11 + 55) / 2**11)
    big = mcnemar(600, 500)
    assert big["method"] == "chi2-cc" and big["statistic"] == pytest.approx(99**2 / 1100)
    assert big["p_value"] == pytest.approx(math.erfc(math.sqrt(99**2 / 1100 / 2)))


def _report(ch: tuple[int, int, float, int, int], cp: tuple[int, int, float]) -> dict:
    def arm(labelled: int, correct: int, p50: float, errors: int = 0, requests: int | None = None) -> dict:
        acc = correct / labelled if labelled else None
        return {"labelled": labelled, "accuracy": acc, "accuracy_ci95": wilson_interval(correct, labelled),
                "defect_recall": None, "latency_ms": {"p50": p50, "p99": p50}, "errors": errors,
                "requests": requests if requests is not None else labelled + errors}  # fmt: skip

    return {"versions": {"champion": "1", "challenger": "2"}, "overall": {"challenger": arm(*ch), "champion": arm(*cp)}}


def test_decide_rule() -> None:
    rule = DecisionRule(min_samples=100, min_gain=0.01, max_latency_increase=0.2, max_error_rate=0.05)
    assert decide(_report((99, 99, 1.0, 0, 99), (500, 400, 1.0)), rule).action == "wait"
    assert decide(_report((100, 95, 1.0, 0, 100), (99, 80, 1.0)), rule).action == "wait"  # champion short too
    d = decide(_report((100, 95, 1.1, 0, 100), (500, 400, 1.0)), rule)
    assert d.action == "promote" and d.evidence["accuracy_gain"] == pytest.approx(0.15)
    assert decide(_report((100, 95, 1.3, 0, 100), (500, 400, 1.0)), rule).action == "rollback"  # +30 % p50
    assert decide(_report((100, 80, 1.0, 0, 100), (500, 400, 1.0)), rule).action == "rollback"  # gain 0 < 0.01
    d = decide(_report((10, 10, 1.0, 3, 13), (500, 400, 1.0)), rule)  # 3/13 errors: lower bound 0.08 > 0.05
    assert d.action == "rollback" and "errors 3/13" in d.reasons[0]
    assert decide(_report((10, 10, 1.0, 1, 60), (500, 400, 1.0)), rule).action == "wait"  # 1/60 may be luck


def _pred(frame: int, role: str, cls: str, **extra) -> str:
    rec = {"frame_id": f"f{frame}", "camera_id": "cam1", "role": role, "model_version": "1" if role == "champion"
           else "2", "class": cls, "latency_ms": 5.0 + frame % 7, "served": role == "champion", **extra}  # fmt: skip
    return json.dumps(rec) + "\n"


def test_compare_folds_a_long_log_in_bounded_memory_and_pairs_within_the_window(tmp_path: Path, monkeypatch) -> None:
    """A box's predictions log grows for as long as it serves: the report reads it one record at a time."""
    from deploy.edge.rollout import fold, latency, stats

    preds, feedback = tmp_path / "predictions.jsonl", tmp_path / "feedback.jsonl"
    n = 30_000  # champion served + challenger shadow on every frame; the challenger wrong on every 10th
    with open(preds, "w") as f:
        for i in range(n):
            f.write(_pred(i, "champion", "ok"))
            f.write(_pred(i, "challenger", "scratch" if i % 10 == 0 else "ok", shadow=True))
    feedback.write_text("".join(json.dumps({"camera_id": "cam1", "frame_id": f"f{i}", "label": "ok"}) + "\n"
                                for i in range(0, n, 100)))  # fmt: skip
    tracemalloc.start()
    rep = stats.compare(preds, feedback, champion_version="1", challenger_version="2")
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert peak < 20, f"{peak:.0f} MB"  # the 60,000 records held as dicts: ~65 MB
    ch, cp = rep["overall"]["challenger"], rep["overall"]["champion"]
    counts = (cp["requests"], cp["served"], ch["shadow"], ch["labelled"], ch["correct"])
    assert counts == (n, n, n, n // 100, 0)  # labelled: f0, f100, ...: the challenger wrong on each
    assert rep["paired"]["frames"] == n and rep["paired"]["agreement"] == 0.9
    assert (rep["paired"]["b"], rep["paired"]["c"], rep["log"]["predictions"]) == (n // 100, 0, 2 * n)
    assert cp["latency_ms"]["p50"] == 8.0  # exact below EXACT_LATENCIES: 5 + frame % 7
    monkeypatch.setattr(latency, "EXACT_LATENCIES", 1000)  # past it, 1 % bins: within 0.5 %
    binned = stats.compare(preds, feedback, champion_version="1", challenger_version="2")["overall"]["champion"]
    assert all(abs(binned["latency_ms"][q] / cp["latency_ms"][q] - 1) < 0.005 for q in ("p50", "p90", "p99"))

    # a shadow answer further from its frame than the window is not paired (the window bounds the waiting frames)
    late = tmp_path / "late.jsonl"
    champion = "".join(_pred(i, "champion", "ok") for i in range(6))
    late.write_text(champion + _pred(0, "challenger", "ok", shadow=True) + _pred(5, "challenger", "ok", shadow=True))
    monkeypatch.setattr(fold, "PAIR_WINDOW", 4)
    assert stats.compare(late, feedback)["paired"]["frames"] == 1  # frame 5 only; frame 0 waited 5 frames
    monkeypatch.setattr(fold, "PAIR_WINDOW", 16)
    assert stats.compare(late, feedback)["paired"]["frames"] == 2
