"""The demo defect set: real surface photos with procedurally drawn scratches, spots and cracks.

No real defect dataset ships offline, so the embedded demo draws defects onto patches of scikit-image's bundled
texture photos (brick, gravel, grass, moon). `generate_demo_defects` writes an ImageFolder that `spt_core.data.prepare`
reads like any other (the builtin source ``demo-defects`` is this generator with its defaults).
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from spt_core.portable.errors import DataError
from spt_core.portable.io import write_bytes

__all__ = ["DEMO_CLASSES", "generate_demo_defects"]

DEMO_CLASSES = ("ok", "scratch", "spot", "crack")
_TEXTURES = ("brick", "gravel", "grass", "moon")  # real surface photos bundled with scikit-image (no download)
_SS = 4  # defects are drawn 4x supersampled and box-downsampled: antialiased, sub-pixel widths
# Defect contrast in units of the patch's texture std (floor 20 grey levels), mostly saturating to near black/white.
# Tuned so a linear probe is ~80%, not 100%: 5-fold logistic regression on frozen embedded-Lite0 features at 224 px,
# 100 images/class gives 0.80 (strength 4: 0.67, 2.5: 0.49); small local defects barely move pooled features.
_STRENGTH = 6.0


@functools.lru_cache(maxsize=1)
def _textures() -> tuple[np.ndarray, ...]:
    import skimage.data

    return tuple(np.ascontiguousarray(getattr(skimage.data, n)()) for n in _TEXTURES)  # (512, 512) uint8 each


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random patch of a random texture at a random scale/orientation, tinted: (size, size, 3) float32 0..255."""
    tex = _textures()[rng.integers(len(_TEXTURES))]
    crop = int(min(*tex.shape, size * rng.uniform(0.75, 3.0)))
    y, x = rng.integers(0, tex.shape[0] - crop + 1), rng.integers(0, tex.shape[1] - crop + 1)
    patch = np.rot90(tex[y : y + crop, x : x + crop], int(rng.integers(4)))
    patch = patch[:, ::-1] if rng.random() < 0.5 else patch
    g = np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((size, size), Image.Resampling.BICUBIC))
    g = g.astype(np.float32)
    g = (g - g.mean()) * rng.uniform(0.6, 1.1) + rng.uniform(90.0, 170.0)  # contrast / exposure jitter
    return g[..., None] * rng.uniform(0.92, 1.08, size=3).astype(np.float32)  # colour cast of the light


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, steps: int, size: int) -> list[tuple]:
    pts, p = [tuple(start * _SS)], start.copy()
    for _ in range(steps):
        heading += rng.normal(0.0, 0.45)
        p = p + rng.uniform(2.5, 5.0) * np.array([np.cos(heading), np.sin(heading)])
        pts.append(tuple(np.clip(p, 0, size) * _SS))
    return pts


def _defect_mask(kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """(mask (size, size) in [0, 1], sign): where and in which direction (+ bright, - dark) a defect changes."""
    canvas = Image.new("L", (size * _SS, size * _SS), 0)
    draw = ImageDraw.Draw(canvas)
    sign, blur = float(rng.choice([-1.0, 1.0])), 0.0
    if kind == "scratch":  # one thin straight line
        ang, length = rng.uniform(0, np.pi), rng.uniform(0.35, 0.8) * size
        c = rng.uniform(0.25, 0.75, 2) * size
        d = 0.5 * length * np.array([np.cos(ang), np.sin(ang)])
        draw.line([tuple((c - d) * _SS), tuple((c + d) * _SS)], fill=255, width=int(_SS * rng.uniform(1.2, 2.5)))
    elif kind == "spot":  # one to three soft blobs
        for _ in range(int(rng.integers(1, 4))):
            c, r = rng.uniform(0.15, 0.85, 2) * size, rng.uniform(3.0, 8.0) * rng.uniform(0.7, 1.3, 2)
            draw.ellipse([tuple((c - r) * _SS), tuple((c + r) * _SS)], fill=255)
        blur = 1.0
    elif kind == "crack":  # a dark wandering polyline with one or two branches
        sign = -1.0
        width = int(_SS * rng.uniform(1.2, 2.2))
        main = _walk(rng, rng.uniform(0.2, 0.8, 2) * size, rng.uniform(0, 2 * np.pi), int(rng.integers(10, 20)), size)
        draw.line(main, fill=255, width=width, joint="curve")
        for _ in range(int(rng.integers(1, 3))):
            k = int(rng.integers(1, len(main)))
            head = rng.uniform(0, 2 * np.pi)
            draw.line(_walk(rng, np.array(main[k]) / _SS, head, int(rng.integers(4, 10)), size), fill=255, width=width)
        blur = 0.5
    else:
        raise DataError(f"demo defect class {kind!r} is unknown; use ok, scratch, spot or crack")
    m = canvas.resize((size, size), Image.Resampling.BOX)
    m = m.filter(ImageFilter.GaussianBlur(blur)) if blur else m
    return np.asarray(m, np.float32) / 255.0, sign


def generate_demo_defects(
    out_dir: Path,
    *,
    n_per_class: int = 100,
    seed: int = 0,
    batch: int = 0,
    size: int = 96,
    classes: Sequence[str] = DEMO_CLASSES,
    counts: Mapping[str, int] | None,
    bit_depth: int | None = None,
) -> Path:
    """Write a synthetic surface-inspection ImageFolder: ``out_dir/<class>/b{batch}_{i:04d}.png``.

    Patches are cut from real texture photos (scikit-image's brick, gravel, grass, moon); ``scratch``, ``spot``
    and ``crack`` add a procedurally drawn defect (a few pixels wide): small enough that a linear probe on frozen
    ImageNet features reaches only ~80% (see ``_STRENGTH``), so fine-tuning has something to learn.
    Each image has its own random stream keyed by (seed, batch, class, i): the same call is byte-identical,
    a new ``batch`` simulates newly arriving data and can be written into the same folder.

    Args:
        out_dir: ImageFolder root; created if needed, existing files of other batches are kept.
        n_per_class: Images per class.
        seed: Dataset seed.
        batch: Data batch number (file prefix ``b{batch}_``).
        size: Square image side in pixels.
        classes: Subset/order of ``ok``, ``scratch``, ``spot``, ``crack``.
        counts: Images per class (e.g. ``{"ok": 340, "scratch": 24, "spot": 16, "crack": 10}``, a line's
            imbalance); a class not named gets ``n_per_class``; None: ``n_per_class`` each. Required: the
            pipeline's default (``demo.counts``) is a line's imbalance, the builtin set's is balanced.
        bit_depth: None writes 8-bit RGB PNGs; 10, 12 or 16 writes single-channel 16-bit PNGs (mode ``I;16``) with
            values up to ``2**bit_depth - 1``, as a Mono10/12/16 line camera delivers (the grey of the RGB image).

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    if bit_depth is not None and not 8 <= bit_depth <= 16:
        raise DataError(f"demo bit_depth={bit_depth}: give 8..16 (Mono8..Mono16) or None for 8-bit RGB")
    unknown = sorted(set(counts or {}) - set(classes))
    if unknown:
        raise DataError(f"demo counts name unknown class(es) {unknown}; use {', '.join(classes)}")
    for cls in classes:
        if cls not in DEMO_CLASSES:
            raise DataError(f"demo defect class {cls!r} is unknown; use a subset of {', '.join(DEMO_CLASSES)}")
        key = int.from_bytes(hashlib.sha256(cls.encode()).digest()[:4], "big")  # stable per class, not per position
        (out_dir / cls).mkdir(parents=True, exist_ok=True)
        for i in range((counts or {}).get(cls, n_per_class)):
            rng = np.random.default_rng([seed, batch, key, i])
            img = _surface(rng, size)
            if cls != "ok":
                mask, sign = _defect_mask(cls, rng, size)
                amp = _STRENGTH * max(float(img.std()), 20.0) * rng.uniform(0.7, 1.3)
                img = img + sign * amp * mask[..., None]
            buf = io.BytesIO()
            if bit_depth is None:
                Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).save(buf, format="PNG")
            else:  # mono: the grey level, rescaled from 0..255 to 0..2**bit_depth - 1, in a 16-bit container
                grey = np.clip(img.mean(-1), 0, 255) * ((2**bit_depth - 1) / 255.0)
                Image.fromarray(np.rint(grey).astype(np.uint16)).save(buf, format="PNG")
            write_bytes(out_dir / cls / f"b{batch}_{i:04d}.png", buf.getvalue())
    return out_dir
