"""Issue 30, the edge box as a multi-camera appliance: the performance hint follows the camera count, the rollout
manifest's device reaches OpenVINO's compile_model (an unknown or absent one is refused in one line), many cameras
at once get the answers one camera at a time gets and keep their arms (with and without micro-batching), a JPEG is
decoded at the smallest scale its models allow within the stated tolerance, and ONNX Runtime answers many threads as
it answers one.

The edge world (tests/support/edge.py): v1 calls every part "ok" at 32 px, v2 is a fitted statistic model at 40 px,
so the two arms give different answers and a frame answered by the wrong model shows.
"""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from support.edge import EdgeWorld, png, rollout
from support.rollout import bucket

from deploy.edge.decoding import DRAFT_MARGIN, draft
from deploy.edge.inferencer import OnnxRuntimeInferencer, OpenVINOInferencer, open_inferencer
from deploy.edge.inferencer import openvino_inferencer as ovi
from deploy.edge.inferencer.batching import MicroBatcher, window_ms
from deploy.edge.limits import Limits, open_header
from deploy.edge.rollout.manifest import CHALLENGER, CHAMPION, PRED_LOG, RolloutError, load_config, parse_config
from deploy.edge.rollout.stats import report_for
from deploy.edge.service import EdgeService
from deploy.edge.serving import Batching, Serving
from spt_core.portable.preprocess import Preprocess, model_image

CAMERAS = [f"cam-{i}" for i in range(8)]


class RecordingCore:
    """A real OpenVINO core that records each compile's device and properties and compiles on the CPU, and that
    claims a GPU and an NPU: this box has only a CPU, the plumbing up to compile_model is what is tested."""

    def __init__(self, real: Any) -> None:
        self.real, self.compiled = real, []
        self.available_devices = ["CPU", "GPU.0", "NPU"]

    def read_model(self, *args: Any) -> Any:
        return self.real.read_model(*args)

    def compile_model(self, model: Any, device: str, config: dict[str, Any]) -> Any:
        self.compiled.append((device, dict(config)))
        return self.real.compile_model(model, "CPU", config)


def test_the_hint_follows_the_camera_count_and_the_manifest_round_trips(tmp_path: Path) -> None:
    base = {"line": "l", "champion": {"version": "1", "path": "a"}}
    one = parse_config(base, tmp_path).serving
    eight = parse_config(base | {"cameras": {"count": 8}, "device": "GPU.1"}, tmp_path).serving
    batched = Serving(cameras=8, batching=Batching(max_batch=4))
    assert one.compile_properties({}) == {"PERFORMANCE_HINT": "LATENCY"}
    assert Serving(cameras=1).compile_properties({}) == {"PERFORMANCE_HINT": "LATENCY"}
    assert eight.compile_properties({}) == {"PERFORMANCE_HINT": "THROUGHPUT", "PERFORMANCE_HINT_NUM_REQUESTS": 8}
    assert batched.compile_properties({})["PERFORMANCE_HINT_NUM_REQUESTS"] == 2  # one request per batch of 4
    assert eight.compile_properties({"PERFORMANCE_HINT": "LATENCY"})["PERFORMANCE_HINT"] == "LATENCY"  # theirs wins
    # what a decision or a sync writes back reads the same
    full = base | {"cameras": {"count": 8, "pinned": {"c": CHALLENGER}}, "device": "NPU", "batching": {"max_batch": 4}}
    cfg = parse_config(full | {"preprocess": "graph"}, tmp_path)
    again = parse_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict())), tmp_path)
    assert again.serving == cfg.serving == Serving("NPU", 8, Batching(max_batch=4), preprocess="graph")
    assert again.pinned == {"c": CHALLENGER}
    bad = base | {"device": "TPU", "cameras": {"count": 0}, "batching": {"max_batch": 0, "rate": 1}}
    with pytest.raises(RolloutError) as e:
        parse_config(bad, tmp_path, "rollout.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("rollout.yaml: ")
    assert "device='TPU': use one of CPU, GPU, NPU, AUTO" in msg
    assert "cameras.count=0" in msg and "batching=" in msg


def test_the_device_reaches_compile_model_and_one_the_box_lacks_is_refused(
    edge_world: EdgeWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ovi._ov_core()
    core = RecordingCore(real)
    monkeypatch.setattr(ovi, "_core", core)
    cfg = rollout(tmp_path, edge_world, "1", "2", device="GPU", cameras={"count": 4})
    service = EdgeService(cfg)
    try:
        assert service.runtime.champion.device == service.runtime.challenger.device == "GPU"
        assert {d for d, _ in core.compiled} == {"GPU"} and len(core.compiled) == 2  # champion and challenger
        hints = {(c["PERFORMANCE_HINT"], c["PERFORMANCE_HINT_NUM_REQUESTS"]) for _, c in core.compiled}
        assert hints == {("THROUGHPUT", 4)}
        assert service.predict(edge_world.images[0], "cam-1", None)[0] == 200
    finally:
        service.close()
    (tmp_path / "npu").mkdir()  # the NPU compiles static shapes: batch 1, so no micro-batching either
    service = EdgeService(rollout(tmp_path / "npu", edge_world, "1", None, device="NPU", batching={"max_batch": 4}))
    try:
        champion = service.runtime.champion
        assert core.compiled[-1][0] == "NPU" and champion.batcher is None
        assert list(champion.compiled.input(0).get_partial_shape().to_shape()) == [1, 3, 32, 32]
        assert service.predict(edge_world.images[0], "cam-1", None)[0] == 200
    finally:
        service.close()
    monkeypatch.setattr(ovi, "_core", real)  # this box: a CPU only
    (tmp_path / "real").mkdir()
    service = EdgeService(rollout(tmp_path / "real", edge_world, "1", None, device="NPU"))
    try:
        error = service.runtime.champion_error
        assert service.runtime.champion is None and "\n" not in error
        assert "device=NPU: this box's OpenVINO sees only ['CPU']; install the NPU driver" in error
    finally:
        service.close()


def _predict_all(service: EdgeService, frames: list[bytes], concurrent: bool) -> dict[tuple[str, int], dict]:
    """Every camera posts every frame, one after another or all cameras at once (a thread each)."""
    out: dict[tuple[str, int], dict] = {}

    def camera(cam: str) -> None:
        for i, frame in enumerate(frames):
            status, body = service.predict(frame, cam, f"f{i}")
            assert status == 200, body
            out[(cam, i)] = body

    threads = [threading.Thread(target=camera, args=(c,)) for c in CAMERAS]
    for t in threads:
        t.start()
        if not concurrent:
            t.join()
    for t in threads:
        t.join()
    return out


@pytest.mark.parametrize("batching", [None, {"max_batch": 4, "window_ms": 20.0, "p99_target_ms": 1000.0}])
def test_eight_cameras_at_once_get_the_answers_one_at_a_time_gets_on_their_arms(
    edge_world: EdgeWorld, tmp_path: Path, batching: dict | None
) -> None:
    extra = {"batching": batching} if batching else {}
    cfg = rollout(tmp_path, edge_world, "1", "2", shadow=True, cameras={"count": 8}, **extra)
    service = EdgeService(cfg)
    frames = edge_world.images[:3]
    try:
        rt = service.runtime
        assert str(rt.champion.compiled.get_property("PERFORMANCE_HINT")) == "THROUGHPUT"
        alone = _predict_all(service, frames, concurrent=False)
        together = _predict_all(service, frames, concurrent=True)
    finally:
        service.close()
    arms = {cam: CHALLENGER if bucket(cam, "2") < 0.5 else CHAMPION for cam in CAMERAS}
    assert set(arms.values()) == {CHAMPION, CHALLENGER}  # both arms are exercised
    for key, a in alone.items():
        b = together[key]
        assert a["role"] == b["role"] == arms[key[0]], key  # each camera stays on its arm
        assert a["model_version"] == b["model_version"] == ("2" if arms[key[0]] == CHALLENGER else "1")
        assert (a["class"], a["decision"]) == (b["class"], b["decision"]) and abs(a["score"] - b["score"]) < 1e-6
    assert {a["class"] for k, a in alone.items() if arms[k[0]] == CHAMPION} == {"ok"}  # v1 calls everything ok
    assert {a["class"] for k, a in alone.items() if arms[k[0]] == CHALLENGER} != {"ok"}  # v2 does not
    records = [json.loads(line) for line in (load_config(cfg).logs / PRED_LOG).read_text().splitlines()]
    served_champion = sum(r["served"] and r["role"] == CHAMPION for r in records)
    assert sum(bool(r.get("shadow")) for r in records) == served_champion  # a shadow run per champion frame
    assert report_for(load_config(cfg))["paired"]["frames"] == served_champion  # the statistics pair them
    if batching:
        assert max(rt.champion.batcher.batches) > 1, rt.champion.batcher.batches  # frames did share inferences


def test_the_batch_window_leaves_room_for_the_p99_target() -> None:
    b = Batching(max_batch=4, window_ms=5.0, p99_target_ms=50.0)
    assert window_ms(b, 10.0) == 5.0 and window_ms(b, 47.0) == 3.0 and window_ms(b, 60.0) == 0.0
    assert window_ms(b, None) == 0.0  # nothing measured yet: nobody waits


def test_queued_frames_share_one_inference_and_each_gets_its_own_rows() -> None:
    release, sizes = threading.Event(), []

    def infer(x: np.ndarray) -> np.ndarray:  # (B, 2, 1, 1) -> (B, 2): row i answers frame i
        sizes.append(len(x))
        release.wait(5)
        return x.reshape(len(x), -1) * 10

    batcher = MicroBatcher(infer, Batching(max_batch=3, window_ms=0.0), workers=1)
    xs = [np.full((1, 2, 1, 1), i, np.float32) for i in range(5)]
    first = batcher.submit(xs[0])
    time.sleep(0.2)  # the worker is inside the first inference: the next frames queue up
    odd = batcher.submit(np.zeros((1, 3, 1, 1), np.float32))  # another shape: never stacked with the others
    rest = [batcher.submit(x) for x in xs[1:]]
    release.set()
    assert [f.result(5)[0, 0] for f in [first, *rest]] == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert odd.result(5).shape == (1, 3) and sizes == [1, 1, 3, 1]  # 1, the odd one, then 3 of 4 (max), then 1


def test_a_jpeg_decodes_at_the_smallest_scale_that_keeps_twice_the_model_input() -> None:
    big = png(Image.new("RGB", (640, 480), (90, 120, 150)), "JPEG")
    specs = [Preprocess(size=(40, 40)), Preprocess(size=(32, 32))]
    # 640 x 480 for 2 x 40 px: 1/4 (160 x 120) keeps >= 80 both ways, 1/8 (80 x 60) would not
    assert DRAFT_MARGIN == 2 and draft(open_header(big, Limits()), specs).size == (160, 120)
    assert draft(open_header(big, Limits()), [Preprocess(size=(200, 200))]).size == (640, 480)  # too small to shrink
    same = png(Image.new("RGB", (640, 480), (90, 120, 150)))
    assert draft(open_header(same, Limits()), specs).size == (640, 480)  # a PNG is decoded in full


def test_drafted_jpegs_answer_as_the_full_decode_within_the_tolerance(edge_world: EdgeWorld, tmp_path: Path) -> None:
    """The tolerance of `deploy.edge.decoding`: each model input within a mean of 1 grey level of the full decode's,
    P(good) within 0.05, and the same class (so the same decision) wherever the full decode's top two classes are
    more than 0.05 apart (v2 is a weak model: some of its frames are near ties, which any change may flip)."""
    service = EdgeService(rollout(tmp_path, edge_world, "2", None))
    model = service.runtime.champion
    pre, clear = model.artifact.preprocess, 0
    try:
        for i, data in enumerate(edge_world.images):
            frame = Image.open(io.BytesIO(data)).convert("RGB").resize((640, 480), Image.Resampling.BICUBIC)
            jpeg = png(frame, "JPEG")
            drafted = draft(open_header(jpeg, Limits()), [pre])
            assert drafted.size == (160, 120)
            a, b = (np.asarray(model_image(im, pre), np.float64) for im in (Image.open(io.BytesIO(jpeg)), drafted))
            assert np.abs(a - b).mean() <= 1.0, i
            status, served = service.predict(jpeg, "cam-1", None)
            reference = model.predict(Image.open(io.BytesIO(jpeg)))  # decoded in full
            assert status == 200 and abs(served["p_good"] - reference["p_good"]) <= 0.05, i
            if reference["margin"] > 0.05:
                clear += 1
                assert (served["class"], served["decision"]) == (reference["class"], reference["decision"]), i
    finally:
        service.close()
    assert clear >= len(edge_world.images) // 2  # the class check covered most frames


def test_a_failed_inference_does_not_stop_the_model(edge_world: EdgeWorld) -> None:
    model = open_inferencer(edge_world.art["2"])
    x = np.zeros((1, 3, 40, 40), np.float32)
    before = model.infer(x)
    with pytest.raises(ValueError, match=r"input of shape \(1, 3, 64, 64\) does not fit the model's"):
        model.infer(np.zeros((1, 3, 64, 64), np.float32))  # refused before it reaches the queue
    with model._queue_lock:  # one that gets in anyway fails inside OpenVINO, which poisons the queue it ran on
        model._queue.start_async({model._input: np.zeros((1, 3, 64, 64), np.float32)}, Future())
    time.sleep(0.2)
    for _ in range(2 * model.n_requests + 1):  # every request of the queue comes round again
        assert np.array_equal(model.infer(x), before)
    assert isinstance(model, OpenVINOInferencer) and len(model._retired) == 1


def _onnx_model(path: Path) -> Path:
    """A tiny ONNX classifier: logits = mean over H, W of (N, 3, H, W) @ W + b (4 classes), built by hand."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 7 - 0.5, "w")
    b = numpy_helper.from_array(np.array([0.1, -0.2, 0.3, 0.0], np.float32), "b")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [helper.make_node("ReduceMean", ["input", "axes"], ["m"], keepdims=0),
             helper.make_node("Gemm", ["m", "w", "b"], ["logits"])]  # fmt: skip
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [w, b, axes],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_onnx_runtime_answers_eight_threads_as_it_answers_one(tmp_path: Path) -> None:
    model = OnnxRuntimeInferencer(_onnx_model(tmp_path / "model.onnx"), {"intra_op_num_threads": 1})
    xs = [np.random.default_rng(i).standard_normal((2, 3, 8, 8)).astype(np.float32) for i in range(8)]
    alone = [model.infer(x) for x in xs]
    together: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: together.update({i: model.infer(xs[i])})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(together[i], alone[i]) for i in range(8))
    w, b = np.arange(12).reshape(3, 4) / 7 - 0.5, [0.1, -0.2, 0.3, 0.0]
    assert np.allclose(alone[0], xs[0].mean(axis=(2, 3)) @ w + b, atol=1e-6)  # the model it was built as
