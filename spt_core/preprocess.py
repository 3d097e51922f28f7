"""The one preprocessing definition, shared by training, export and the edge runtime.

Torch-free on purpose (numpy + Pillow only): the edge box imports this module without torch. Training builds
the equivalent timm transform from the same `Preprocess` (`spt_core.data.eval_transform`), and a test checks
that both give the same numbers on real images.

Pipeline (what the manifest's ``preprocess`` block records):
    RGB PIL image -> resize to (height, width) with PIL bicubic (antialiased, aspect ratio not kept,
    the VTAB-1k "direct resize") -> float32 in [0, 1] -> (x - mean) / std -> CHW.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input. Plain data; stored in every artifact manifest."""

    size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    antialias: bool = True  # PIL resizes with antialiasing; recorded so other runtimes can match it
    color: str = "RGB"
    layout: str = "NCHW"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"preprocess.interpolation={self.interpolation!r}: use one of {sorted(_RESAMPLE)}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"preprocess.size={self.size!r}: give (height, width) with positive integers")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        known = {k: d[k] for k in ("interpolation", "antialias", "color", "layout", "extra") if k in d}
        return cls(size=tuple(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]), **known)


def load_rgb(path_or_image: Any) -> Image.Image:
    """Open an image file (or take a PIL image / HxW[xC] uint8 array) as RGB."""
    if isinstance(path_or_image, Image.Image):
        img = path_or_image
    elif isinstance(path_or_image, np.ndarray):
        img = Image.fromarray(path_or_image)
    else:
        with Image.open(path_or_image) as f:
            f.load()
            img = f.copy()
    return img.convert("RGB")


def preprocess_image(image: Any, pre: Preprocess) -> np.ndarray:
    """One image -> float32 array (3, H, W), normalised exactly as in training."""
    img = load_rgb(image)
    h, w = pre.size
    if img.size != (w, h):
        img = img.resize((w, h), resample=_RESAMPLE[pre.interpolation])
    x = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(images: list[Any], pre: Preprocess) -> np.ndarray:
    """Images -> float32 array (N, 3, H, W)."""
    return np.stack([preprocess_image(im, pre) for im in images])
