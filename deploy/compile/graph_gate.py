"""The parity gate of the graph variant (``export.graph_preprocess``): ship an OpenVINO artifact's in-graph
preprocessing (`deploy.edge.inferencer.graph_input`) only where it answers as the host's preprocessing does.

For each OpenVINO artifact, on export verification's own images (the test split), the same IR is run twice: fed
`spt_core.portable.preprocess` (the host variant, what training and `deploy.compile.verify` use) and fed the decoded
frame through its graph. The gate compares the two: top-1 agreement (%) at least ``graph_parity_min_agreement`` and
the largest |P(ok_class) difference| (every class's, without an ok_class) at most ``graph_parity_max_dp``. INT8
amplifies the graph's sub-level rounding differences most, so it is the precision that fails first.

A model with a bit depth (Mono10..16 cameras) is also measured on 16-bit frames: the prepared split stores 8-bit
images, so each verification image's grey is lifted back to the manifest's bit depth with sub-level noise (values
the host turns back into exactly that grey), which exercises the graph's scaling and rounding on camera-like values.

``auto`` ships the graph variant where the gate passes and host preprocessing elsewhere; ``on`` does the same but a
failed gate fails the export (`export_all`'s report ``passed``); ``off`` ships host preprocessing without measuring.
ONNX artifacts always ship host preprocessing: ONNX Runtime has no PrePostProcessor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from deploy.compile.build import ExportError
from deploy.edge.graph_spec import GRAPH, GRAPH_MODES, HOST, MONO16, RGB8, GraphSpec
from deploy.edge.inferencer import OpenVINOInferencer
from deploy.edge.inferencer.graph_input import FrameInferencer, frame_input, frame_kind
from deploy.edge.precision import PRECISIONS
from spt_core.portable.metrics import softmax
from spt_core.portable.preprocess import Preprocess, open_image, preprocess_image, to_8bit


def check_graph_options(graph_preprocess: str, min_agreement: float, max_dp: float) -> None:
    """Fail before any export work on a bad ``export.graph_*`` value."""
    if graph_preprocess not in GRAPH_MODES:
        raise ExportError(f"graph_preprocess={graph_preprocess!r}: use one of {', '.join(GRAPH_MODES)} "
                          "(export.graph_preprocess)")  # fmt: skip
    if not 0.0 <= min_agreement <= 100.0 or not 0.0 <= max_dp <= 1.0:
        raise ExportError(f"graph_parity_min_agreement={min_agreement}, graph_parity_max_dp={max_dp}: give a "
                          "percentage (0..100) and a probability (0..1) (export.graph_parity_*)")  # fmt: skip


def graph_gate(
    artifacts: Mapping[str, Path],
    images: Sequence[Any],
    pre: Preprocess,
    class_names: Sequence[str],
    ok_class: str | None,
    threshold: float | None = None,
    *,
    split: str,
    graph_preprocess: str,
    graph_parity_min_agreement: float,
    graph_parity_max_dp: float,
    resize: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Measure and decide each artifact's input variant.

    Args:
        artifacts: Precision name -> its model file (before sealing), as `deploy.compile.verify.verify` takes them.
        images: Export verification's images (paths, PIL images or HxW[x3] arrays), decoded as a camera's frames.
        pre: The preprocessing of every artifact.
        class_names: One name per logit.
        ok_class: The good class whose probability the gate bounds; None: every class's.
        threshold: The reject threshold on P(ok_class), if any: the decisions that flip are counted (recorded only).
        split: Which split `images` are, recorded with the parity (``test``).
        graph_preprocess: ``auto``, ``on`` or ``off`` (module docstring).
        graph_parity_min_agreement: Top-1 agreement (%) with host preprocessing the graph variant must reach.
        graph_parity_max_dp: Largest |P(ok_class) difference| it may show.
        resize: The graph's resize filter; None: the one closest to ``pre.interpolation`` (`GraphSpec.for_preprocess`).

    Returns:
        Per precision, the manifest keys: ``input_variant`` and, where the gate ran, ``graph_preprocess`` (the spec
        and its ``parity``: split, n_images, agreement, max_dp, decision_flips, by_kind, the thresholds, passed).
    """
    check_graph_options(graph_preprocess, graph_parity_min_agreement, graph_parity_max_dp)
    out: dict[str, dict[str, Any]] = {name: {"input_variant": HOST} for name in artifacts}
    gated = [name for name in artifacts if PRECISIONS[name].format == "openvino"]
    if graph_preprocess == "off" or not gated or not images:
        return out
    spec = GraphSpec.for_preprocess(pre, resize)
    runners = {}  # precision -> (host, graph), compiled as the box compiles them
    for name in gated:
        xml, config = Path(artifacts[name]).with_suffix(".xml"), dict(PRECISIONS[name].runtime_config)
        runners[name] = OpenVINOInferencer(xml, config), FrameInferencer(xml, config, pre=pre, spec=spec)
    probs: dict[tuple[str, str], list[np.ndarray]] = {}  # (precision, kind) -> [(2, classes): host, graph]
    for i, image in enumerate(images):  # one frame at a time: a test split of large frames is never all in memory
        frame = _frame(image)
        kinds = {RGB8: frame} | ({MONO16: _lift(frame, pre.bit_depth, seed=i)} if MONO16 in spec.kinds else {})
        for kind, f in kinds.items():
            x_host, routed = preprocess_image(f, pre)[None], frame_kind(f, pre, spec)
            x_graph = frame_input(f, pre, routed)
            for name, (host, graph) in runners.items():
                runner = graph.wide if routed == MONO16 else graph
                pair = np.concatenate([host.infer(x_host), runner.infer(x_graph)])  # (2, classes)
                probs.setdefault((name, kind), []).append(np.stack([softmax(z.astype(np.float64)) for z in pair]))
    ok = class_names.index(ok_class) if ok_class is not None else None
    limits = {"min_agreement": graph_parity_min_agreement, "max_dp_allowed": graph_parity_max_dp}
    for name in gated:
        by_kind = {}
        for (each, kind), pairs in probs.items():
            if each == name:
                p = np.stack(pairs)  # (N, 2, classes)
                by_kind[kind] = _compare(p[:, 0], p[:, 1], ok, threshold)
        parity = {
            "split": split,
            "n_images": len(images),
            "agreement": min(k["agreement"] for k in by_kind.values()),
            "max_dp": max(k["max_dp"] for k in by_kind.values()),
            "decision_flips": None if threshold is None or ok is None else sum(k["flips"] for k in by_kind.values()),
            "by_kind": by_kind,
            **limits,
        }
        parity["passed"] = parity["agreement"] >= graph_parity_min_agreement and parity["max_dp"] <= graph_parity_max_dp
        out[name] = {
            "input_variant": GRAPH if parity["passed"] else HOST,
            "graph_preprocess": {**spec.to_dict(), "mode": graph_preprocess, "parity": parity},
        }
    return out


def graph_failures(decided: Mapping[str, Mapping[str, Any]], graph_preprocess: str) -> list[str]:
    """With ``on``: the artifacts whose gate failed, one line each (empty with ``auto``/``off``: they fall back)."""
    if graph_preprocess != "on":
        return []
    bad = {n: d["graph_preprocess"]["parity"] for n, d in decided.items() if "graph_preprocess" in d}
    return [f"{n}: agreement {p['agreement']:.1f}% (min {p['min_agreement']}), max |dP| {p['max_dp']:.4f} "
            f"(max {p['max_dp_allowed']})" for n, p in bad.items() if not p["passed"]]  # fmt: skip


def _frame(image: Any) -> Image.Image:
    """An image as the box decodes it: in its own mode and size."""
    if isinstance(image, Image.Image):
        return image
    return Image.fromarray(image) if isinstance(image, np.ndarray) else open_image(image)


def _lift(frame: Image.Image, bit_depth: int, seed: int) -> Image.Image:
    """A 16-bit frame of `bit_depth` whose host conversion gives back the frame's 8-bit grey exactly: the grey g,
    plus noise under half a level, times (2**bit_depth - 1) / 255, rounded."""
    grey = np.asarray(to_8bit(frame).convert("L"), dtype=np.float64)  # (H, W)
    noise = np.random.default_rng(seed).uniform(-0.45, 0.45, grey.shape)
    top = 2**bit_depth - 1
    return Image.fromarray(np.clip(np.rint((grey + noise) * top / 255.0), 0, top).astype(np.uint16))  # I;16


def _compare(p_host: np.ndarray, p_graph: np.ndarray, ok: int | None, threshold: float | None) -> dict[str, Any]:
    """Top-1 agreement (%), the largest and mean |P(ok) difference| (every class's when ``ok`` is None) and, with a
    threshold, the reject decisions that differ."""
    dp = np.abs(p_host - p_graph) if ok is None else np.abs(p_host[:, ok] - p_graph[:, ok])
    agree = 100.0 * float(np.mean(p_host.argmax(1) == p_graph.argmax(1)))
    out = {"agreement": agree, "max_dp": float(dp.max()), "mean_dp": float(dp.mean())}
    if ok is not None and threshold is not None:
        out["flips"] = int(np.sum((p_host[:, ok] < threshold) != (p_graph[:, ok] < threshold)))
    return out
