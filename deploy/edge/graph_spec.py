"""Which input an OpenVINO artifact is served with, as its manifest records it: the host variant (the box runs
`spt_core.portable.preprocess` and feeds (1, 3, H, W) float32) or the graph variant (the box feeds the decoded frame,
(1, H, W, C) u8/u16, and the compiled model resizes, scales and normalises it: `deploy.edge.inferencer.graph_input`).

Manifest keys (written by `deploy.compile.graph_gate`; an artifact without them is a host artifact)::

    input_variant      "host" | "graph"
    graph_preprocess   {"version": 1, "resize": "bicubic_pillow", "kinds": ["rgb8", "mono16"],
                        "parity": {...what the export measured...}}

The graph variant is built on the box from the verified host IR by this spec, not shipped as a second IR: the same
weights, one download, and the export's parity gate measured exactly what the box builds. Torch-free, stdlib only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spt_core.portable.preprocess import Preprocess

HOST, GRAPH = "host", "graph"
VARIANTS = (HOST, GRAPH)
GRAPH_MODES = ("auto", "on", "off")  # export.graph_preprocess (`deploy.compile.graph_gate`)
SPEC_VERSION = 1  # what this box knows how to build; an artifact asking for another is refused
# The graph's frame kinds: 8-bit RGB (u8, 3 channels) for every 8-bit camera; Mono10..16 in a 16-bit container
# (u16, 1 channel, scaled by the manifest's bit_depth) for the models trained on such frames.
RGB8, MONO16 = "rgb8", "mono16"
KINDS = (RGB8, MONO16)
# Interpolate-11 modes the graph may resize with; the pillow ones are Pillow's antialiased filters, as the host runs.
RESIZES = ("bicubic_pillow", "bilinear_pillow", "cubic", "linear", "nearest")
_CLOSEST = {"bicubic": "bicubic_pillow", "bilinear": "bilinear_pillow"}  # Preprocess.interpolation -> its twin


@dataclass(frozen=True)
class GraphSpec:
    """How the box builds the graph variant of an IR.

    Attributes:
        resize: The Interpolate-11 mode (`RESIZES`); `for_preprocess` picks the host filter's twin.
        kinds: The frame kinds it compiles (`KINDS`); ``mono16`` only for a preprocess with a ``bit_depth`` <= 16.
        version: The spec's version (`SPEC_VERSION`).
    """

    resize: str
    kinds: tuple[str, ...] = (RGB8,)
    version: int = SPEC_VERSION

    @classmethod
    def for_preprocess(cls, pre: Preprocess, resize: str | None = None) -> GraphSpec:
        """The spec closest to `pre`: its filter's Pillow twin (or `resize`), and ``mono16`` when it has a bit depth
        a 16-bit container holds."""
        wide = pre.bit_depth is not None and pre.bit_depth <= 16
        return cls(resize or _CLOSEST[pre.interpolation], (RGB8, MONO16) if wide else (RGB8,))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "resize": self.resize, "kinds": list(self.kinds)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], pre: Preprocess, where: str) -> GraphSpec:
        """Read and check a manifest's ``graph_preprocess``.

        Raises:
            ValueError: Another version, an unknown resize or kind, or ``mono16`` without a bit depth; the message
                names `where`.
        """
        if not isinstance(d, Mapping) or d.get("version") != SPEC_VERSION:
            got = d.get("version") if isinstance(d, Mapping) else d
            raise ValueError(f"{where}: graph_preprocess version {got!r}, this box builds {SPEC_VERSION}")
        resize, kinds = d.get("resize"), d.get("kinds")
        if resize not in RESIZES or not isinstance(kinds, list) or not kinds or not set(kinds) <= set(KINDS):
            raise ValueError(f"{where}: graph_preprocess resize={resize!r} kinds={kinds!r}; use {RESIZES} and {KINDS}")
        if MONO16 in kinds and not (pre.bit_depth and pre.bit_depth <= 16):
            raise ValueError(f"{where}: graph_preprocess kind mono16 needs preprocess.bit_depth <= 16")
        return cls(resize, tuple(kinds))


def input_variant(manifest: Mapping[str, Any], where: str) -> str:
    """The variant a manifest ships: ``input_variant``, ``host`` when absent (artifacts from before the graph variant).

    Raises:
        ValueError: A value not in `VARIANTS`, or ``graph`` on a format other than openvino or without a spec this
            box can build.
    """
    variant = manifest.get("input_variant", HOST)
    if variant not in VARIANTS:
        raise ValueError(f"{where}: input_variant={variant!r}; use one of {VARIANTS}")
    if variant == GRAPH:
        if manifest.get("format") != "openvino":
            raise ValueError(f"{where}: input_variant graph on a {manifest.get('format')} artifact (openvino only)")
        GraphSpec.from_dict(manifest.get("graph_preprocess"), Preprocess.from_dict(manifest["preprocess"]), where)
    return variant
