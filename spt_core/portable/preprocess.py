"""The one preprocessing definition, shared by training, export and the edge runtime.

Torch-free on purpose (numpy + Pillow only): the edge box imports this module without torch. Training builds
the equivalent timm transform from the same `Preprocess` (`spt_core.data.eval_transform`), and a test checks
that both give the same numbers on real images.

Pipeline (what the manifest's ``preprocess`` block records):
    any PIL image -> 8-bit RGB (`to_rgb`: 16/32-bit and float frames scaled by ``bit_depth``)
    -> resize to (height, width) with PIL bicubic (antialiased, aspect ratio not kept,
    the VTAB-1k "direct resize") -> float32 in [0, 1] -> (x - mean) / std -> CHW.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from spt_core.portable.errors import DataError

# The largest image accepted (pixels): Pillow's own decompression-bomb limit. A larger file is refused before it is
# decoded, with this one-line error (docs: README "Image formats"): "<file>: image is WxH = N pixels, over the
# limit of MAX_PIXELS; resize it (the model sees <size> px anyway)".
MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # Pillow's modes of 16-bit, 32-bit and float frames
_AUTO_DEPTH = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "I": 16}  # "I": how Pillow opens many 16-bit files
_STRIP_VALUES = 1 << 20  # values per strip in `_wide_to_grey`: 8 MB of float64
# GenICam's Mono10/12/14/16: the depths a camera writes into a 16-bit container, the candidates `infer_bit_depth` picks
CAMERA_DEPTHS = (10, 12, 14, 16)
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
    # Bits per pixel of 16/32-bit and float frames (Mono10/12 in a 16-bit container: 10/12); None = auto from the
    # file's mode (16 for I;16 and I, 1.0 = white for F). 8-bit files describe themselves and ignore it.
    bit_depth: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"preprocess.interpolation={self.interpolation!r}: use one of {sorted(_RESAMPLE)}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"preprocess.size={self.size!r}: give (height, width) with positive integers")
        if self.bit_depth is not None and not 1 <= self.bit_depth <= 32:
            raise ValueError(f"preprocess.bit_depth={self.bit_depth!r}: give the camera's bits (8..16, 32) or None")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        known = {k: d[k] for k in ("interpolation", "antialias", "color", "layout", "bit_depth", "extra") if k in d}
        return cls(size=tuple(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]), **known)


def open_image(path: Any) -> Image.Image:
    """Open and fully decode an image file (or file object) in its own mode; refuse one over `MAX_PIXELS`.

    Raises:
        DataError: too many pixels (checked before decoding), or not a readable image.
    """
    try:
        with Image.open(path) as f:
            w, h = f.size
            if w * h > MAX_PIXELS:
                raise DataError(
                    f"{_name(path)}: image is {w}x{h} = {w * h} pixels, over the limit of {MAX_PIXELS}; resize it "
                    "(the model sees a few hundred pixels anyway)"
                )
            f.load()  # decodes fully: a truncated file fails here
            return f.copy()
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"{_name(path)}: {' '.join(str(e).split())}; resize it") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{_name(path)}: not a readable image ({' '.join(str(e).split())})") from None


def _name(path: Any) -> str:
    return str(getattr(path, "name", None) or path) if not hasattr(path, "read") else "uploaded file"


def to_8bit(img: Image.Image, bit_depth: int | None = None) -> Image.Image:
    """Any PIL image -> 8-bit ``L`` (grey and 16/32-bit/float frames) or ``RGB`` (everything else), as `to_rgb` scales
    it. Grey stays one channel so that a caller can resize before making three: at 25 MP that is 25 MB instead of
    100 MB (Pillow keeps RGB in 4 bytes a pixel), and the resized pixels are the same (each channel is resampled
    alone)."""
    if img.mode in _WIDE:
        return _wide_to_grey(img, bit_depth)
    return img if img.mode in ("L", "RGB") else img.convert("RGB")


def _wide_to_grey(img: Image.Image, bit_depth: int | None) -> Image.Image:
    """A 16/32-bit or float frame -> 8-bit grey, ``rint(x * 255 / (2**depth - 1))`` clipped to 0..255, computed in
    float64 one strip of rows at a time: the float copies cost ~8 MB whatever the frame's size (a whole 25 MP frame
    in float64 took 200 MB per copy, and there were three). The same numbers as one whole-frame pass."""
    depth = bit_depth or _AUTO_DEPTH.get(img.mode)
    top = float(2**depth - 1) if depth else 1.0
    w, h = img.size
    grey = np.empty((h, w), np.uint8)
    rows = max(1, _STRIP_VALUES // max(1, w))
    for y in range(0, h, rows):
        x = np.asarray(img.crop((0, y, w, min(h, y + rows))), dtype=np.float64)  # (rows, W)
        x *= 255.0 / top
        np.rint(x, out=x)
        np.clip(x, 0, 255, out=x)
        grey[y : y + rows] = x
    return Image.fromarray(grey)


def needs_depth(img: Image.Image) -> bool:
    """True for the frames ``bit_depth`` scales (16/32-bit integer and float); 8-bit files describe themselves."""
    return img.mode in _WIDE


def frame_max(img: Image.Image) -> int | None:
    """The largest value of a 16/32-bit integer frame, read a strip of rows at a time (bounded memory, as in
    `_wide_to_grey`); None for 8-bit and float frames, which carry no bit depth to measure."""
    if img.mode not in _AUTO_DEPTH:
        return None
    w, h = img.size
    rows = max(1, _STRIP_VALUES // max(1, w))
    strips = (np.asarray(img.crop((0, y, w, min(h, y + rows)))) for y in range(0, h, rows))
    return max((int(s.max()) for s in strips if s.size), default=0)


def infer_bit_depth(top: int) -> int:
    """The fewest bits of a camera format (`CAMERA_DEPTHS`) that hold `top`, the frames' largest value; beyond 16
    bits, the bits `top` needs. Mono12 frames (at most 4095) give 12, so they fill 0..255 instead of 0..15."""
    return next((d for d in CAMERA_DEPTHS if top < 2**d), top.bit_length())


def choose_bit_depth(declared: int | None, top: int | None, where: str = "") -> int | None:
    """The bit depth that scales 16/32-bit frames whose largest value is `top` (None: there are no integer ones):
    measured (`infer_bit_depth`) when not ``declared``, else the declared one if the values fit it.

    Raises:
        DataError: the declared depth does not fit the frames (`depth_mismatch`); `where` names the file.
    """
    if top is None or declared is None:
        return declared if top is None else infer_bit_depth(top)
    why = depth_mismatch(declared, top)
    if why:
        raise DataError(f"data.bit_depth={declared}: {why} (largest value {top} {where}); set data.bit_depth: "
                        f"{infer_bit_depth(top)} to match the frames, or null to infer it")  # fmt: skip
    return declared


def depth_mismatch(declared: int, top: int) -> str | None:
    """Why frames whose largest value is `top` are not ``declared``-bit frames, or None when they fit. Values over
    the range would be clipped to white; values all under 1/16 of it would become a dark 0..15 of 255 (a Mono12
    camera declared 16). All-black frames (`top` 0) fit any depth."""
    if top >= 2**declared:
        return f"values up to {top} do not fit {declared} bits (0..{2**declared - 1}) and would be clipped to white"
    if 0 < top < 2 ** (declared - 4):
        dark = round(top * 255 / (2**declared - 1))
        return f"every value is under {2 ** (declared - 4)}, so the frames would be prepared as 0..{dark} of 255"
    return None


def to_rgb(img: Image.Image, bit_depth: int | None = None) -> Image.Image:
    """Any PIL image -> 8-bit RGB. 16/32-bit integer frames are scaled by ``2**bit_depth - 1`` (auto: 16 for
    ``I;16*`` and ``I``), float frames (``F``) by the same or, with no depth, taken as 0..1; never clipped to white
    as ``Image.convert("RGB")`` does."""
    if img.mode not in _WIDE:
        return img.convert("RGB")
    return _wide_to_grey(img, bit_depth).convert("RGB")  # grey (L) -> 3 equal channels


def _as_image(path_or_image: Any) -> Image.Image:
    """A PIL image as given, an HxW[xC] array as an image, or a file opened with `open_image`."""
    if isinstance(path_or_image, Image.Image):
        return path_or_image
    if isinstance(path_or_image, np.ndarray):
        return Image.fromarray(path_or_image)
    return open_image(path_or_image)


def load_rgb(path_or_image: Any, bit_depth: int | None = None) -> Image.Image:
    """Open an image file (or take a PIL image / HxW[xC] array) as 8-bit RGB (`open_image` + `to_rgb`)."""
    return to_rgb(_as_image(path_or_image), bit_depth)


def model_image(image: Any, pre: Preprocess) -> Image.Image:
    """The image as the model sees it before normalising: 8-bit RGB at ``pre.size``. `preprocess_image` of the
    result equals `preprocess_image` of `image`, so a caller can drop a full-size frame early and keep this."""
    img = to_8bit(_as_image(image), pre.bit_depth)  # L or RGB, full size
    h, w = pre.size
    if img.size != (w, h):
        img = img.resize((w, h), resample=_RESAMPLE[pre.interpolation])
    return img.convert("RGB") if img.mode != "RGB" else img  # grey -> 3 equal channels, after the resize


def preprocess_image(image: Any, pre: Preprocess) -> np.ndarray:
    """One image -> float32 array (3, H, W), normalised exactly as in training."""
    x = np.asarray(model_image(image, pre), dtype=np.float32) / 255.0  # (H, W, 3)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_batch(images: list[Any], pre: Preprocess) -> np.ndarray:
    """Images -> float32 array (N, 3, H, W)."""
    return np.stack([preprocess_image(im, pre) for im in images])
