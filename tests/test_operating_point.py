"""The operating point: one reject rule, one count of escapes and overkill, one serialisation; and every reader of
a line's decision (evaluate/assess, the hand-over gate, the edge's rollout statistics, the operator pages) getting
the same answers from it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from spt_core.portable.errors import SensituneError
from spt_core.portable.metrics import softmax, wilson_interval
from spt_core.portable.operating_point import ACCEPT, REJECT, OperatingPoint

NAMES = ["dent", "ok", "scratch"]


# ------------------------------------------------------------------------------------------------ the rule
def test_a_part_exactly_at_the_threshold_passes_and_one_float_below_is_rejected():
    op = OperatingPoint("ok", 0.5)
    below = float(np.nextafter(0.5, 0.0))
    assert op.decide(0.5) == ACCEPT and op.decide(below) == REJECT and op.decide(1.0) == ACCEPT
    # an array in, one decision per part out: a rule written `p > t` would reject the first part
    assert op.decide(np.array([0.5, below, 0.0])).tolist() == [ACCEPT, REJECT, REJECT]
    probs = np.array([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]])
    assert op.decisions(probs, NAMES).tolist() == [ACCEPT, REJECT]
    assert op.answer(probs[0], NAMES) == {"p_good": 0.5, "decision": ACCEPT}


def test_without_a_threshold_the_top_class_decides_and_without_a_good_class_the_class_is_the_answer():
    probs = np.array([[0.2, 0.45, 0.35], [0.5, 0.4, 0.1]])
    assert OperatingPoint("ok").decisions(probs, NAMES).tolist() == [ACCEPT, REJECT]
    assert OperatingPoint("ok", 0.5).decisions(probs, NAMES).tolist() == [REJECT, REJECT]  # 0.45 < 0.5
    assert OperatingPoint().answer(probs[1], NAMES) == {"p_good": None, "decision": "dent"}
    with pytest.raises(SensituneError, match="no threshold"):
        OperatingPoint("ok").decide(0.9)


def test_a_served_answer_keeps_its_own_decision_and_an_old_record_is_judged_by_its_class():
    op = OperatingPoint("ok", 0.6)
    assert op.decision_of({"class": "ok", "decision": REJECT}) == REJECT  # ok by class, rejected at the threshold
    assert op.decision_of({"class": "ok"}) == ACCEPT and op.decision_of({"class": "dent"}) == REJECT
    assert op.decision_of({"class": "ok", "decision": "ok"}) == ACCEPT
    assert OperatingPoint().decision_of({"class": "ok", "decision": "ok"}) is None  # no good class: no decision


def test_p_good_from_probabilities_or_logits_in_float64():
    logits = np.array([[1000.0, 1001.0, 999.0], [0.0, 0.0, 0.0]])  # large: a naive exp overflows
    p = softmax(logits)
    assert p.dtype == np.float64 and np.isfinite(p).all() and np.allclose(p.sum(1), 1.0)
    e = np.exp([-1.0, 0.0, -2.0])
    assert p[0].tolist() == pytest.approx((e / e.sum()).tolist(), abs=1e-15)
    op = OperatingPoint("ok")
    assert op.p_good(logits, NAMES, logits=True).tolist() == p[:, 1].tolist()
    assert op.p_good(np.float32([0.2, 0.7, 0.1]), NAMES) == float(np.float32(0.7))  # one vector -> one float
    with pytest.raises(SensituneError, match="ok_class='good' is not one of the model's classes"):
        OperatingPoint("good").p_good(p, NAMES)


# ------------------------------------------------------------------------------------------------ the rates
def test_escape_counts_defects_only_and_overkill_good_parts_only():
    labels = ["dent", "dent", "scratch", "scratch", "ok", "ok", "ok", "ok", "ok"]
    decisions = [ACCEPT, REJECT, REJECT, REJECT, REJECT, ACCEPT, ACCEPT, ACCEPT, ACCEPT]
    r = OperatingPoint("ok", 0.5).rates(labels, decisions)
    # 1 of the 4 defects passed (over all 9 parts it would read 1/9), 1 of the 5 good parts rejected (not 1/9)
    assert r["escape_rate"] == {"value": 0.25, "k": 1, "n": 4, "ci95": wilson_interval(1, 4)}
    assert r["overkill"] == {"value": 0.2, "k": 1, "n": 5, "ci95": wilson_interval(1, 5)}
    # labels as indices into the class names count the same
    idx = [NAMES.index(c) for c in labels]
    assert OperatingPoint("ok", 0.5).rates(idx, decisions, NAMES) == r
    with pytest.raises(SensituneError, match="decisions for"):
        OperatingPoint("ok", 0.5).rates(labels, decisions[:-1])


def test_the_threshold_is_the_lowest_that_meets_the_escape_ceiling_exactly():
    # defects' P(good): 0.9, 0.6, 0.3; good parts': 0.95, 0.8, 0.7, 0.5
    p_good = np.array([0.9, 0.6, 0.3, 0.95, 0.8, 0.7, 0.5])
    labels = ["dent", "scratch", "dent", "ok", "ok", "ok", "ok"]
    probs = np.c_[(1 - p_good) / 2, p_good, (1 - p_good) / 2]
    # one escape allowed of 3: reject up from the 2nd highest defect (0.6), midway to the next P(good) above (0.7)
    op = OperatingPoint.choose(labels, probs, NAMES, "ok", 1 / 3)
    assert (op.ok_class, op.threshold, op.max_escape_rate) == ("ok", pytest.approx(0.65), 1 / 3)
    r = op.rates(labels, op.decide(op.p_good(probs, NAMES)))
    assert (r["escape_rate"]["k"], r["escape_rate"]["n"], r["overkill"]["k"], r["overkill"]["n"]) == (1, 3, 1, 4)
    # no escape allowed: above the highest defect (0.9), midway to 0.95
    assert OperatingPoint.choose(labels, probs, NAMES, "ok", 0.0).threshold == pytest.approx(0.925)
    # every defect may pass: reject nothing; no good class: no threshold
    assert OperatingPoint.choose(labels, probs, NAMES, "ok", 1.0).threshold == 0.0
    assert OperatingPoint.choose(labels, probs, NAMES, None, 0.1) == OperatingPoint(None, None, 0.1)
    # a defect with P(good) == 1.0 and no ceiling: the threshold is the float above 1.0 and rejects it
    top = OperatingPoint.choose(["dent", "ok"], np.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]), NAMES, "ok", 0.0)
    assert top.threshold == float(np.nextafter(1.0, 2.0)) and top.decide(1.0) == REJECT


# ------------------------------------------------------------------------------------------------ (de)serialise
def test_to_dict_and_from_dict_round_trip_through_a_manifest():
    op = OperatingPoint("ok", 0.4375, 0.005)
    assert op.to_dict() == {"ok_class": "ok", "threshold": 0.4375, "max_escape_rate": 0.005}
    manifest = {"format": "openvino", "class_names": NAMES, **op.to_dict()}
    assert OperatingPoint.from_dict(json.loads(json.dumps(manifest))) == op
    assert OperatingPoint.from_dict({"class_names": NAMES}) == OperatingPoint()  # keys absent: None
    assert OperatingPoint.from_dict({"ok_class": "ok", "threshold": 1, "max_escape_rate": 0}).threshold == 1.0


@pytest.mark.parametrize(
    "values, key",
    [
        ({"ok_class": "ok", "threshold": "0.5"}, "threshold='0.5'"),
        ({"ok_class": "ok", "threshold": True}, "threshold=True"),
        ({"ok_class": "ok", "threshold": 1.5}, "threshold=1.5"),
        ({"ok_class": "ok", "threshold": math.nan}, "threshold=nan"),
        ({"threshold": 0.5}, "without an ok_class"),
        ({"ok_class": 3}, "ok_class=3"),
        ({"ok_class": ""}, "ok_class=''"),
        ({"ok_class": "ok", "max_escape_rate": -0.1}, "max_escape_rate=-0.1"),
    ],
)
def test_from_dict_refuses_bad_values_in_one_line_naming_the_file(values, key):
    with pytest.raises(SensituneError) as e:
        OperatingPoint.from_dict(values, where="run/metrics.json")
    msg = str(e.value)
    assert msg.startswith("run/metrics.json: ") and key in msg and "\n" not in msg
    with pytest.raises(SensituneError, match="expected a mapping"):
        OperatingPoint.from_dict([0.5], where="x")  # type: ignore[arg-type]


def test_an_artifact_with_a_bad_operating_point_is_refused_when_read(tmp_path):
    from deploy.edge.artifact import ArtifactError, read_manifest
    from spt_core.portable.preprocess import Preprocess

    manifest = {"format": "onnx", "precision": "fp32", "model_version": "1", "class_names": NAMES,
                "preprocess": Preprocess(size=(8, 8)).to_dict(), "files": {"model.onnx": "0" * 64}}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "ok_class": "ok", "threshold": 2.0}))
    with pytest.raises(ArtifactError, match=r"manifest.json: threshold=2.0 is not a number in \[0, 1\]"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "ok_class": "ok", "threshold": 0.25}))
    assert OperatingPoint.from_dict(read_manifest(tmp_path)) == OperatingPoint("ok", 0.25)


# ------------------------------------------------------------------------------------------------ one answer
def test_assess_the_gate_the_rollout_statistics_and_the_ui_count_the_same_frames_the_same(tmp_path: Path):
    """The issue's must-show: the same frames' probabilities and labels through evaluate/assess, the hand-over
    gate, the edge (served decisions, its rollout statistics) and the operator pages' counting give identical
    decisions, escape rate and overkill, all from the one operating point."""
    from support.artifacts import CLASSES, build_artifact, demo_set, fit_linear, reference_logits

    from deploy.edge.artifact import load_artifact
    from deploy.edge.auth import LOCAL
    from deploy.edge.rollout.decision import escape_worse
    from deploy.edge.schemas import FeedbackIn
    from deploy.edge.service import EdgeService
    from deploy.edge.ui.recent import RecentFrames
    from deploy.edge.ui.router import LineUI
    from deploy.edge.ui.views import arm_rates, operating_point
    from pipelines.assess import choose_operating_point, held_out_scores
    from spt_core.portable.preprocess import Preprocess

    items, images, y = demo_set(tmp_path / "frames", n_per_class=10, size=32)
    pre = Preprocess(size=(16, 16))
    w, b = fit_linear(images, y, pre)  # a weak but real classifier: it escapes and overkills
    probs, labels = softmax(reference_logits(images, pre, w, b)), [CLASSES[i] for i in y]

    # evaluate/assess: the operating point chosen on these frames and the metrics at it
    op, measured = choose_operating_point((np.array(y), probs), (np.array(y), probs), CLASSES, "ok", 0.05)
    decisions = op.decisions(probs, CLASSES).tolist()
    assert decisions != OperatingPoint("ok").decisions(probs, CLASSES).tolist()  # the threshold matters here
    assert np.abs(op.p_good(probs, CLASSES) - op.threshold).min() > 1e-4  # far from float32 noise of the IR
    at = measured["test"]["at_threshold"]
    want = (at["escape_rate"]["k"], at["escape_rate"]["n"], at["overkill"]["k"], at["overkill"]["n"])
    assert want[0] > 0 and want[2] > 0 and measured["escape_rate"] == want[0] / want[1]

    # the hand-over gate: the held-out scores at the operating point its model metadata carries
    gate = held_out_scores(probs, labels, CLASSES, OperatingPoint.from_dict({"class_names": CLASSES, **op.to_dict()}))
    assert (gate["escaped"], gate["defects"], gate["overkilled"], gate["goods"]) == want

    # the edge: the artifact carries the operating point; its served decisions and its rollout statistics
    build_artifact(tmp_path / "v1", "1", w, b, 16, extra={k: v for k, v in op.to_dict().items() if v is not None})
    assert load_artifact(tmp_path / "v1").operating_point == op
    cfg = tmp_path / "rollout.yaml"
    cfg.write_text(yaml.safe_dump({"line": "l", "champion": {"version": "1", "path": "v1"}, "log_dir": "logs"}))
    service = EdgeService(cfg)
    try:
        ring = LineUI(service).recent = RecentFrames(per_camera=len(items))  # the operator pages' ring
        bodies = []
        for (path, _), label in zip(items, labels):
            status, body = service.predict(path.read_bytes(), "cam-1", None)  # the pages record it (service.pages)
            assert status == 200, body
            bodies.append(body)
            assert service.feedback(FeedbackIn(frame_id=body["frame_id"], label=label), LOCAL, "op")[0] == 200
        assert operating_point(service) == op  # the pages' one place reads the champion's operating point
        arm = service.report()["overall"]["champion"]
    finally:
        service.close()
    assert [body["decision"] for body in bodies] == decisions
    assert (arm["escaped"], arm["defects"], arm["overkilled"], arm["goods"]) == want
    assert arm["escape_rate"] == gate["escape_rate"] == measured["escape_rate"]
    assert arm["overkill"] == gate["overkill"] == measured["overkill"]
    assert escape_worse(gate, arm) is None and escape_worse(arm, gate) is None  # the gate and the line agree

    # the operator pages: parts rejected and the rollout page's rates, from the same decisions
    shots, _, rejected = ring.cameras()["cam-1"]
    assert rejected == decisions.count(REJECT) and [s.rejected for s in reversed(shots)] == [
        d == REJECT for d in decisions
    ]
    rates = arm_rates(arm)
    assert (rates["escape"]["k"], rates["escape"]["n"], rates["overkill"]["k"], rates["overkill"]["n"]) == want


def test_the_confusion_png_shows_the_decision_at_the_threshold_beside_the_argmax(tmp_path: Path) -> None:
    from PIL import Image

    from pipelines.assess import decision_counts, plot_confusion

    names = ["ok", "scratch", "spot"]
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    # every part's top class is right, but two good parts sit under the threshold: the line rejects them
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.55, 0.4, 0.05], [0.95, 0.03, 0.02],
                      [0.1, 0.8, 0.1], [0.45, 0.5, 0.05], [0.2, 0.1, 0.7], [0.05, 0.05, 0.9]])  # fmt: skip
    m = OperatingPoint("ok", 0.7).metrics(labels, probs, names)
    assert np.trace(np.asarray(m["confusion"])) == 8  # the argmax matrix: all right
    assert decision_counts(m["at_threshold"]) == [[2, 2], [0, 4]]  # rows good/defect, columns accepted/rejected
    one = plot_confusion(m["confusion"], names, tmp_path / "argmax.png")
    both = plot_confusion(m["confusion"], names, tmp_path / "confusion.png", "test", m["at_threshold"])
    assert Image.open(both).width > Image.open(one).width  # a second panel beside the first
