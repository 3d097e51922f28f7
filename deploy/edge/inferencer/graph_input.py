"""The graph variant of an OpenVINO artifact: the compiled model takes the camera's decoded frame and does the
preprocessing itself (OpenVINO's PrePostProcessor), so the box only decodes.

What the graph computes is `spt_core.portable.preprocess.model_image` + `preprocess_image`, step for step:

    rgb8   (1, H, W, 3) u8 ─┐
    mono16 (1, H, W, 1) u16 ─ x * 255 / (2**bit_depth - 1), rounded half to even, clipped to 0..255, u8 (`to_8bit`)
        -> resize along W, then along H, each pass in u8 (Pillow resamples 8-bit images one axis at a time,
           rounding and clipping in between; one 2-D pass in float differs by up to 4 levels on real frames where
           bicubic overshoots, by tens on noise)
        -> grey to 3 equal channels (mono16; after the resize, as the host does) -> f32 -> (x - 255 mean) / (255 std)
        -> NCHW, the IR's own input.

With the Pillow filters (``bicubic_pillow``, ``bilinear_pillow``) an 8-bit frame lands within 1 level of the host's
model image at any frame size: bicubic on ~0.03% of its pixels (Pillow's fixed-point coefficients), bilinear on up
to a few % when upscaling (ties at exact halves). The host still does what is cheap or rare: frames of other modes
(8-bit grey, palette, RGBA, float, 16-bit ones for a model without a bit depth) are made 8-bit as the host variant
makes them before it resizes (`to_8bit`) and fed as rgb8; a tall strip that Pillow resizes vertically first
(`pillow_vertical_first`) is resized on the host. A model-sized 8-bit RGB image (those, and the large-frame lane's
and the shadow run's input) goes through a resize to its own size, which is the identity.

`FrameInferencer` is an `OpenVINOInferencer` compiled on that graph; `open_variant` opens an artifact's host or graph
variant (side by side for the benchmarks). OpenVINO is imported on first use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from deploy.edge.artifact import INPUT_NAME, MANIFEST, OUTPUT_NAME, Artifact, ArtifactError
from deploy.edge.graph_spec import GRAPH, HOST, MONO16, RGB8, GraphSpec
from deploy.edge.inferencer.base import Inferencer, ModelCard, check_input
from deploy.edge.inferencer.openvino_inferencer import OpenVINOInferencer
from spt_core.portable.errors import one_line
from spt_core.portable.preprocess import Preprocess, model_image, to_8bit

_SIXTEEN = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's modes of 16-bit frames ("I": many 16-bit PNGs)


def is_wide(image: Image.Image) -> bool:
    """A 16-bit integer frame (Mono10..16 in a 16-bit container), which a ``mono16`` graph takes as it is."""
    return image.mode in _SIXTEEN


def pillow_vertical_first(frame_size: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether Pillow resizes a (width, height) frame to (height, width) `size` vertically first: when the height
    loses more than twice the rows the width loses columns (Pillow 13's ``ImagingResampleInner``; tall strips). The
    graph resizes horizontally first, so the host resizes such a frame itself (`frame_input`)."""
    (w0, h0), (h, w) = frame_size, size
    return h0 - h > 0 and h0 - h > 2 * (w0 - w)


def frame_kind(image: Image.Image, pre: Preprocess, spec: GraphSpec) -> str:
    """The graph a decoded frame goes to: ``mono16`` for a 16-bit frame when the spec has it (and Pillow would not
    resize it vertically first), else ``rgb8``."""
    wide = MONO16 in spec.kinds and is_wide(image) and not pillow_vertical_first(image.size, pre.size)
    return MONO16 if wide else RGB8


def frame_input(image: Image.Image, pre: Preprocess, kind: str = RGB8) -> np.ndarray:
    """A decoded frame -> the graph's input of `kind`: (1, H, W, 3) u8 for rgb8, (1, H, W, 1) u16 for mono16.

    rgb8: an RGB frame as it is; any other mode made 8-bit by `to_8bit` (what the host does before its resize), grey
    repeated to three channels; a frame Pillow resizes vertically first (`pillow_vertical_first`) resized here, by
    `model_image` (the graph's resize of a model-sized frame is the identity). mono16: a 16-bit frame's values,
    clipped to 0..65535 (for ``bit_depth`` <= 16 the host clips those to 0 or 255 anyway).
    """
    if kind == MONO16:
        a = np.asarray(image)  # (H, W): u16, big-endian u16 (I;16B) or int32 (I)
        if a.dtype != np.uint16:
            a = np.clip(a, 0, 65535).astype(np.uint16)
        return a[None, :, :, None]
    if pillow_vertical_first(image.size, pre.size):
        image = model_image(image, pre)
    a = np.asarray(to_8bit(image, pre.bit_depth))  # (H, W, 3) or (H, W) u8, full size
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)  # grey -> 3 equal channels (a copy; each channel resizes alone)
    return a[None]


def graph_model(model: Any, pre: Preprocess, spec: GraphSpec, kind: str, input_name: str | None = INPUT_NAME) -> Any:
    """Add the preprocessing of `kind` (module docstring) in front of an IR that takes (N, 3, H, W) float32.

    Args:
        model: An ``openvino.Model`` (changed in place and returned).
        pre: The manifest's preprocessing: size, mean, std, bit_depth.
        spec: The resize filter (`GraphSpec.resize`).
        kind: ``rgb8`` or ``mono16``.
        input_name: The IR's input tensor (None: its only input).
    """
    import openvino as ov
    import openvino.opset13 as op
    from openvino.preprocess import PrePostProcessor

    channels = 1 if kind == MONO16 else 3

    def to_model_image(x: Any) -> Any:  # (N, h0, w0, C) frame -> (N, h, w, C) u8, as `model_image` makes it
        if kind == MONO16:  # `to_8bit`: rint(x * 255 / top), clipped
            x = op.multiply(op.convert(x, "f32"), op.constant(np.float32(255.0 / (2**pre.bit_depth - 1))))
            x = op.convert(op.clamp(op.round(x, "half_to_even"), 0.0, 255.0), "u8")
        return _pillow_resize(x, pre.size, spec.resize)

    ppp = PrePostProcessor(model)
    port = ppp.input(input_name) if input_name else ppp.input()
    port.tensor().set_element_type(ov.Type.u16 if kind == MONO16 else ov.Type.u8).set_layout(ov.Layout("NHWC"))
    port.tensor().set_shape(ov.PartialShape([-1, -1, -1, channels]))
    port.model().set_layout(ov.Layout("NCHW"))
    steps = port.preprocess().custom(to_model_image).convert_element_type(ov.Type.f32)
    if channels == 1:
        steps.custom(lambda x: op.concat([x, x, x], 3).output(0))  # grey -> 3 equal channels, model-sized
    steps.mean([255.0 * m for m in pre.mean]).scale([255.0 * s for s in pre.std])
    return ppp.build()


def _pillow_resize(x: Any, size: tuple[int, int], mode: str) -> Any:
    """(N, h0, w0, C) u8 -> (N, h, w, C) u8 as Pillow resizes horizontally first: along W, then along H, each pass
    rounding and clipping to u8 as Pillow's 8-bit passes do. The second pass names both axes (W already at size):
    a pass along H alone comes out wrong for the pillow modes (OpenVINO 2026.4). No ``If`` for Pillow's other order:
    a graph with one returned garbage on its first inference (OpenVINO 2026.4); `frame_input` covers that order."""
    import openvino.opset11 as op11
    import openvino.opset13 as op

    h, w = size
    i64 = lambda v: op.constant(np.array(v, np.int64))  # noqa: E731
    y = op11.interpolate(x, i64([w]), mode, "sizes", axes=i64([2]))
    return op11.interpolate(y, i64([h, w]), mode, "sizes", axes=i64([1, 2])).output(0)


class FrameInferencer(OpenVINOInferencer):
    """An IR compiled with its graph preprocessing: `predict` takes the decoded frame, `infer` the frame tensor
    (`frame_input`); the host's (1, 3, H, W) float32 does not fit it.

    A spec with ``mono16`` compiles a second graph for 16-bit frames (`wide`), which `predict` sends them to; every
    other frame goes to the rgb8 graph. Build it with `from_artifact`, or directly on a bare ``model.xml`` (the
    export's parity gate, before sealing).

    Args:
        xml_path, config, input_name, output_name, artifact, card: As `OpenVINOInferencer`.
        pre: The preprocessing the graph computes.
        spec: How (`GraphSpec`).
        kind: The frame kind this graph takes (``rgb8`` or ``mono16``).
        compile_kw: ``device`` and ``batching``, as `OpenVINOInferencer` takes them.
    """

    input_variant: ClassVar[str] = GRAPH

    def __init__(
        self,
        xml_path: str | Path,
        config: Mapping[str, Any] | None = None,
        *,
        pre: Preprocess,
        spec: GraphSpec,
        kind: str = RGB8,
        input_name: str | None = INPUT_NAME,
        output_name: str | None = OUTPUT_NAME,
        artifact: Artifact | None = None,
        card: ModelCard | None = None,
        **compile_kw: Any,
    ) -> None:
        self.pre, self.spec, self.kind, self._input_name = pre, spec, kind, input_name
        super().__init__(xml_path, config, input_name=input_name, output_name=output_name, artifact=artifact,
                         card=card, **compile_kw)  # fmt: skip
        self.wide: FrameInferencer | None = None
        if kind == RGB8 and MONO16 in spec.kinds:
            self.wide = FrameInferencer(xml_path, config, pre=pre, spec=spec, kind=MONO16, input_name=input_name,
                                        output_name=output_name, artifact=artifact, card=card,
                                        **compile_kw)  # fmt: skip

    def _prepare(self, model: Any) -> Any:
        return graph_model(model, self.pre, self.spec, self.kind, self._input_name)

    @classmethod
    def from_artifact(
        cls, artifact: Artifact, config: Mapping[str, Any] | None = None, spec: GraphSpec | None = None,
        **compile_kw: Any,
    ) -> FrameInferencer:  # fmt: skip
        """The graph variant of a verified OpenVINO artifact, compiled from its verified bytes with its
        ``runtime_config`` and `config` over it. `spec`: the manifest's, else the one closest to its preprocessing
        (`GraphSpec.for_preprocess`: for a measurement beside the host variant; only a manifest's was gated).

        Raises:
            ArtifactError: Not an OpenVINO artifact, a preprocessing other than RGB/NCHW, an IR that does not compile.
        """
        if artifact.format != "openvino":
            raise ArtifactError(f"{artifact.dir / MANIFEST}: format={artifact.format!r}; the graph variant is OpenVINO "
                                "only (ONNX artifacts take host preprocessing)")  # fmt: skip
        check_input(artifact)
        spec = spec or artifact.graph_spec or GraphSpec.for_preprocess(artifact.preprocess)
        m = artifact.manifest
        names = {"input_name": m.get("input_name"), "output_name": m.get("output_name")}
        merged = artifact.runtime_config | dict(config or {})
        inf = cls(artifact.model_path, merged, pre=artifact.preprocess, spec=spec, **names, artifact=artifact,
                  card=ModelCard.of(artifact), **compile_kw)  # fmt: skip
        for each in (inf, inf.wide):
            if each is not None:
                each.artifact = replace(artifact, data={})  # compiled: OpenVINO holds its own copy of the bytes
        return inf

    def model_input(self, image: Image.Image) -> np.ndarray:
        return frame_input(image, self.pre, self.kind)

    def smoke_test(self) -> None:
        """As `Inferencer.smoke_test`, and a mid-grey 16-bit frame through the mono16 graph when there is one."""
        super().smoke_test()
        if self.wide is not None:
            h, w = self.pre.size
            mid = Image.fromarray(np.full((h, w), 2 ** (self.pre.bit_depth - 1), np.uint16))  # I;16
            try:
                score = self.predict(mid)["score"]
            except Exception as e:
                raise ArtifactError(f"{self.source}: smoke test of a 16-bit frame failed ({one_line(e)}); re-export "
                                    "it") from None  # fmt: skip
            if not np.isfinite(score):
                raise ArtifactError(
                    f"{self.source}: smoke test of a 16-bit frame gave a non-finite score; re-export it"
                )

    def predict(self, image: Image.Image, gate: Any = None) -> dict[str, Any]:
        """As `Inferencer.predict`; a 16-bit frame goes to the mono16 graph when there is one (`frame_kind`)."""
        if self.wide is not None and frame_kind(image, self.pre, self.spec) == MONO16:
            return self.wide.predict(image, gate)
        return super().predict(image, gate)


def open_variant(
    artifact: Artifact, config: Mapping[str, Any] | None = None, variant: str | None = None, **compile_kw: Any
) -> Inferencer:
    """An OpenVINO artifact's `variant`: ``host`` (`OpenVINOInferencer`: host preprocessing), ``graph``
    (`FrameInferencer`), or None: the one its manifest ships (``input_variant``; host for older artifacts). Opening
    both of one artifact side by side is how a benchmark measures preprocessing + inference against inference alone.
    `compile_kw`: ``device`` and ``batching`` (`OpenVINOInferencer`).

    Raises:
        ArtifactError: An unknown variant, or the artifact does not open (`OpenVINOInferencer.from_artifact`).
    """
    variant = variant or artifact.input_variant
    if variant == GRAPH:
        return FrameInferencer.from_artifact(artifact, config, **compile_kw)
    if variant != HOST:
        raise ArtifactError(f"{artifact.dir}: input variant {variant!r}; use {HOST!r} or {GRAPH!r}")
    return OpenVINOInferencer.from_artifact(artifact, config, **compile_kw)
