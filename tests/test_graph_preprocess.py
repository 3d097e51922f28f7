"""Issue 30: the graph variant of an OpenVINO artifact (preprocessing inside the compiled model), its parity gate at
export, its manifest contract, and the box serving it: decoded frames in, the host variant's answers out. The export
allows the graph variant, the box chooses (the rollout manifest's ``preprocess`` and ``device``).
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as op
import pytest
from PIL import Image
from support.artifacts import variant
from support.edge import EdgeWorld, png, rollout

from deploy.compile.graph_gate import graph_failures, graph_gate
from deploy.edge.artifact import ArtifactError, load_artifact
from deploy.edge.graph_spec import GRAPH, HOST, MONO16, RGB8, GraphSpec, input_variant
from deploy.edge.inferencer import OpenVINOInferencer, open_artifact
from deploy.edge.inferencer.graph_input import FrameInferencer, frame_input
from deploy.edge.rollout.manifest import RolloutError, parse_config
from deploy.edge.schemas import HealthOut
from deploy.edge.service import EdgeService
from deploy.edge.serving import Serving
from spt_core.portable.preprocess import Preprocess, model_image, preprocess_image

F32 = {"INFERENCE_PRECISION_HINT": "f32"}
RNG = np.random.default_rng(0)


def _identity_ir(tmp: Path, pre: Preprocess) -> Path:
    """An IR whose output is its (N, 3, H, W) input: what it returns is the model image the graph made."""
    x = op.parameter([-1, 3, *pre.size], ov.Type.f32)
    x.output(0).get_tensor().set_names({"input"})
    y = op.multiply(x, op.constant(np.float32(1.0)))
    y.output(0).get_tensor().set_names({"logits"})
    ov.save_model(ov.Model([y], [x]), tmp / "model.xml")
    return tmp / "model.xml"


def _levels(a: np.ndarray, b: np.ndarray, pre: Preprocess) -> np.ndarray:
    """|a - b| of two normalised (3, H, W) images in 8-bit levels."""
    return np.abs(a - b) * 255.0 * np.asarray(pre.std, np.float32)[:, None, None]


def _noise(h: int, w: int, mode: str = "RGB") -> Image.Image:
    """Uniform noise: bicubic overshoots on nearly every pixel, so clipping and the two-pass rounding show."""
    img = Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.convert(mode)


@pytest.mark.parametrize(("interpolation", "share"), [("bicubic", 0.005), ("bilinear", 0.05)])
def test_the_graph_makes_the_host_model_image_within_one_level(tmp_path: Path, interpolation: str, share) -> None:
    """Down, up, non-square, tall, grey, palette and RGBA frames: within 1 level (Pillow's fixed-point rounding; on
    bilinear upscaling also its ties at exact halves), on few pixels; a model-sized frame exactly. One float 2-D
    pass would differ by tens of levels on this noise, the two passes in the other order by up to ~10."""
    pre = Preprocess(size=(32, 40), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), interpolation=interpolation)
    graph = FrameInferencer(_identity_ir(tmp_path, pre), F32, pre=pre, spec=GraphSpec.for_preprocess(pre))
    frames = [_noise(150, 200), _noise(13, 21), _noise(90, 70, "L"), _noise(60, 50, "P"), _noise(45, 64, "RGBA")]
    for frame in [*frames, _noise(300, 41)]:  # 60x50 and 300x41: Pillow resizes those vertically first
        d = _levels(graph.infer(graph.model_input(frame))[0], preprocess_image(frame, pre), pre)
        assert d.max() <= 1.0 + 1e-3 and np.mean(d > 1e-3) < share, (frame.mode, frame.size, d.max())
    same = _noise(32, 40)
    assert _levels(graph.infer(graph.model_input(same))[0], preprocess_image(same, pre), pre).max() < 1e-3


def test_a_mono12_frame_through_the_graph_matches_the_host(tmp_path: Path) -> None:
    """16-bit frames of 12-bit values: the mono16 graph scales by the manifest's 12 bits (not 16), rounds as
    `to_8bit` does, resizes, and repeats grey to three channels: within 1 level of the host's model image."""
    pre = Preprocess(size=(24, 24), bit_depth=12)
    spec = GraphSpec.for_preprocess(pre)
    graph = FrameInferencer(_identity_ir(tmp_path, pre), F32, pre=pre, spec=spec)
    assert spec.kinds == (RGB8, MONO16) and graph.wide is not None and graph.wide.kind == MONO16
    values = RNG.integers(0, 4096, (70, 50))
    for frame in [Image.fromarray(values.astype(np.uint16)), Image.fromarray(values.astype(np.int32), "I")]:
        x = frame_input(frame, pre, MONO16)
        assert x.dtype == np.uint16 and x.shape == (1, 70, 50, 1)
        host = preprocess_image(frame, pre)
        d = _levels(graph.wide.infer(x)[0], host, pre)
        assert d.max() <= 1.0 + 1e-3 and np.mean(d > 1e-3) < 0.005
    assert np.asarray(model_image(frame, pre)).max() > 150  # 12-bit values fill 0..255 (by 65535: 0..16, dark)


@pytest.fixture(scope="module")
def gated(edge_world: EdgeWorld) -> dict:
    """The gate on the edge world's fitted model (v2, 40 px) and its demo frames (48 px), the right resize and a
    deliberately wrong one (nearest). The statistic model reads single pixels (max |gradient|), so the graph's
    1-level differences move its P(ok) by up to ~0.03 (a CNN's by ~0.003: the main job's FP32): its gate allows 0.05."""
    xml = edge_world.art["2"] / "model.xml"
    frames = [Image.open(io.BytesIO(data)) for data in edge_world.images]
    pre = load_artifact(edge_world.art["2"]).preprocess
    kw = dict(split="test", graph_parity_min_agreement=99.0, graph_parity_max_dp=0.05)
    right = graph_gate({"fp32": xml}, frames, pre, ["ok", "scratch", "spot", "crack"], "ok", 0.5,
                       graph_preprocess="auto", **kw)["fp32"]  # fmt: skip
    wrong = graph_gate({"fp32": xml}, frames, pre, ["ok", "scratch", "spot", "crack"], "ok", 0.5,
                       graph_preprocess="auto", resize="nearest", **kw)  # fmt: skip
    return {"frames": frames, "pre": pre, "right": right, "wrong": wrong}


def test_the_gate_ships_the_graph_variant_with_the_same_top1_on_the_demo_set(gated: dict, edge_world) -> None:
    parity = gated["right"]["graph_preprocess"]["parity"]
    assert gated["right"]["input_variant"] == GRAPH and parity["passed"]
    assert (parity["split"], parity["n_images"], parity["agreement"]) == ("test", 16, 100.0)
    host = OpenVINOInferencer(edge_world.art["2"] / "model.xml", F32)
    graph = FrameInferencer(edge_world.art["2"] / "model.xml", F32, pre=gated["pre"], spec=GraphSpec("bicubic_pillow"))
    for frame in gated["frames"]:  # the very top-1 the gate counted
        top_host = host.infer(preprocess_image(frame, gated["pre"])[None]).argmax()
        assert graph.infer(frame_input(frame, gated["pre"])).argmax() == top_host


def test_a_mismatched_resize_trips_the_gate_and_ships_host_preprocessing(gated: dict) -> None:
    wrong = gated["wrong"]["fp32"]
    parity = wrong["graph_preprocess"]["parity"]
    assert wrong["input_variant"] == HOST and not parity["passed"] and wrong["graph_preprocess"]["resize"] == "nearest"
    assert parity["max_dp"] > 0.05 > gated["right"]["graph_preprocess"]["parity"]["max_dp"]
    assert graph_failures(gated["wrong"], "auto") == []  # auto falls back quietly, on fails the export
    assert graph_failures(gated["wrong"], "on") == [
        f"fp32: agreement {parity['agreement']:.1f}% (min 99.0), max |dP| {parity['max_dp']:.4f} (max 0.05)"
    ]


def test_the_manifest_contract_accepts_both_variants_and_defaults_to_host(gated: dict, edge_world, tmp_path) -> None:
    old = load_artifact(edge_world.art["2"])  # written before the graph variant: no input_variant
    assert (old.input_variant, old.graph_spec) == (HOST, None)
    g = load_artifact(variant(edge_world.art["2"], tmp_path / "g", "2", **gated["right"]))
    assert (g.input_variant, g.graph_spec) == (GRAPH, GraphSpec("bicubic_pillow"))
    bad = [
        ({"input_variant": "fancy"}, r"input_variant='fancy'; use one of \('host', 'graph'\); re-export"),
        ({"input_variant": GRAPH, "graph_preprocess": {"version": 2}}, "graph_preprocess version 2, this box builds 1"),
    ]
    for k, (keys, why) in enumerate(bad):
        with pytest.raises(ArtifactError, match=why):
            load_artifact(variant(edge_world.art["2"], tmp_path / f"bad{k}", "2", **keys))
    m = {"format": "onnx", "input_variant": GRAPH, "preprocess": gated["pre"].to_dict()}
    with pytest.raises(ValueError, match="openvino only"):
        input_variant(m, "m.json")
    m |= {"format": "openvino", "graph_preprocess": {"version": 1, "resize": "cubic", "kinds": [RGB8, MONO16]}}
    with pytest.raises(ValueError, match="mono16 needs preprocess.bit_depth"):
        input_variant(m, "m.json")
    assert isinstance(open_artifact(g), OpenVINOInferencer) and not isinstance(open_artifact(g), FrameInferencer)
    assert isinstance(open_artifact(g, variant=None), FrameInferencer)  # the variant its manifest ships


def test_the_box_chooses_the_input_variant_by_its_preprocess_key_and_device(tmp_path: Path) -> None:
    """host: host always; graph: graph wherever the artifact ships it; auto: graph only where it ships it and the
    device is an accelerator (on a CPU Pillow measured faster; an NPU compiles static shapes)."""
    want = {  # (preprocess, device) -> what is served for an artifact that ships (host, graph)
        ("host", "CPU"): (HOST, HOST),
        ("host", "GPU"): (HOST, HOST),
        ("graph", "CPU"): (HOST, GRAPH),
        ("graph", "GPU"): (HOST, GRAPH),
        ("auto", "CPU"): (HOST, HOST),
        ("auto", "GPU"): (HOST, GRAPH),
    }
    for (pre, device), served in want.items():
        box = Serving(device=device, preprocess=pre)
        assert (box.variant_for(HOST), box.variant_for(GRAPH)) == served, (pre, device)
    assert [Serving(device=d).variant_for(GRAPH) for d in ("GPU.1", "AUTO", "NPU")] == [GRAPH, GRAPH, HOST]
    assert "ships host preprocessing only" in Serving(preprocess="graph").variant_choice(HOST)[1]
    base = {"line": "l", "champion": {"version": "1", "path": "a"}}
    assert parse_config(base, tmp_path).serving.preprocess == "auto"
    assert parse_config(base | {"preprocess": "graph"}, tmp_path).serving == Serving(preprocess="graph")
    with pytest.raises(RolloutError, match=r"^rollout.yaml: preprocess='gpu': use one of auto, host, graph \("):
        parse_config(base | {"preprocess": "gpu"}, tmp_path, "rollout.yaml")


def _served(tmp: Path, world: EdgeWorld, art: Path, frames: list[bytes], **kw: object) -> tuple[object, dict, list]:
    """The model a box whose champion is `art` serves (`kw`: more rollout manifest keys), what its /healthz says of
    the input variant, and its answer to each frame (bytes as a camera uploads them)."""
    service = EdgeService(rollout(tmp, dataclasses.replace(world, art={"2": art}), "2", None, **kw))
    try:
        replies = [service.predict(data, "cam-a", None) for data in frames]
        assert all(status == 200 for status, _ in replies), replies
        health = HealthOut.model_validate({"status": "alive", **service.runtime.state()})  # what /healthz lets out
        return service.runtime.champion, health.input_variant["champion"], [body for _, body in replies]
    finally:
        service.close()


def _host_answers(art: Path, frames: list[bytes]) -> list[dict]:
    host = open_artifact(load_artifact(art), variant=HOST)
    return [host.predict(Image.open(io.BytesIO(data))) for data in frames]


def test_the_box_serves_a_graph_artifact_with_the_host_variants_answers(gated: dict, edge_world, tmp_path) -> None:
    """With ``preprocess: graph`` the box decodes and feeds the frame, even on a CPU; each P(ok) within the parity
    the export measured on these very frames (the same pixels), and every class the same."""
    art = variant(edge_world.art["2"], tmp_path / "g", "2", **gated["right"])
    served, health, answers = _served(tmp_path / "box", edge_world, art, edge_world.images, preprocess="graph")
    assert type(served) is FrameInferencer and served.wide is None
    assert health == {"variant": GRAPH, "why": "preprocess: graph"}
    max_dp = gated["right"]["graph_preprocess"]["parity"]["max_dp"]
    for got, want in zip(answers, _host_answers(edge_world.art["2"], edge_world.images)):
        assert got["class"] == want["class"] and abs(got["p_good"] - want["p_good"]) <= max_dp + 1e-6


def test_the_box_serves_mono12_frames_through_the_graph_as_the_host_does(edge_world, tmp_path) -> None:
    """A 12-bit model (manifest bit_depth 12) whose graph takes 16-bit frames: Mono12 PNGs of another size than the
    model's get the host variant's class, P(ok) within 0.05 (this statistic model's 1-level sensitivity, above)."""
    pre = Preprocess(size=(40, 40), bit_depth=12)
    spec = GraphSpec.for_preprocess(pre).to_dict()
    host = variant(edge_world.art["2"], tmp_path / "h12", "2", preprocess=pre.to_dict())
    graph = variant(host, tmp_path / "g12", "2", input_variant=GRAPH, graph_preprocess=spec)
    frames = []
    for data in edge_world.images[:8]:
        grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float64)  # 48 px
        frames.append(png(Image.fromarray(np.rint(grey * 4095 / 255).astype(np.uint16))))  # as a Mono12 camera
    served, _, answers = _served(tmp_path / "box", edge_world, graph, frames, preprocess="graph")
    assert (
        isinstance(served, FrameInferencer)
        and served.wide is not None
        and json.loads((graph / "manifest.json").read_text())["input_variant"] == GRAPH
    )
    for got, want in zip(answers, _host_answers(host, frames)):
        assert got["class"] == want["class"] and abs(got["p_good"] - want["p_good"]) <= 0.05


def test_auto_on_a_cpu_serves_a_graph_artifact_with_host_preprocessing(gated: dict, edge_world, tmp_path) -> None:
    """``preprocess: auto`` (absent) on a CPU: the graph the export allowed is not served, the host variant is, with
    its very answers, and /healthz says which and why."""
    art = variant(edge_world.art["2"], tmp_path / "g", "2", **gated["right"])
    frames = edge_world.images[:4]
    served, health, answers = _served(tmp_path / "box", edge_world, art, frames)
    assert isinstance(served, OpenVINOInferencer) and not isinstance(served, FrameInferencer)
    assert health["variant"] == HOST and health["why"].startswith("preprocess: auto on CPU: Pillow")
    for got, want in zip(answers, _host_answers(art, frames)):
        assert got["class"] == want["class"] and abs(got["p_good"] - want["p_good"]) <= 1e-6
