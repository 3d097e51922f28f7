"""Image files on disk for the data tests: random PNGs, a VTAB-1k task in its list-file layout, and a Mono12 line's
ImageFolder (good/scratch/dent/stain, 16-bit PNG and TIFF) for the journey tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def png(path: Path, seed: int, size: int = 12) -> Path:
    """A random RGB PNG of `size` px at `path` (parents made); the same seed gives the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def vtab_lists(root: Path, n: dict[str, int]) -> Path:
    """A VTAB-1k task as its loader expects it: images/ plus train800.txt, val200.txt and test.txt ("path label"
    lines, labels cycling over 3 classes) with `n[split]` images each, and the (empty) train800val200.txt."""
    for split, count in n.items():
        lines = []
        for i in range(count):
            rel = f"images/{split}_{i}.jpg"
            png(root / rel, seed=i + 100 * len(split))  # JPEG suffix, PNG bytes: PIL reads by content
            lines.append(f"{rel} {i % 3}")
        (root / {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}[split]).write_text(
            "\n".join(lines) + "\n"
        )
    (root / "train800val200.txt").write_text("")
    return root


def photo_crops(n: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """n random square crops (96-200 px, uint8 RGB or grey) of each of 4 scikit-image photos; label = photo: real
    images with a real accuracy, for export parity and quantization tests."""
    import skimage.data

    rng = np.random.default_rng(seed)
    images, labels = [], []
    photos = [skimage.data.coffee(), skimage.data.astronaut(), skimage.data.brick(), skimage.data.chelsea()]
    for label, photo in enumerate(photos):
        h, w = photo.shape[:2]
        for _ in range(n):
            c = int(rng.integers(96, 200))
            y, x = int(rng.integers(0, h - c)), int(rng.integers(0, w - c))
            images.append(photo[y : y + c, x : x + c])
            labels.append(label)
    return images, labels


# a line's names for the demo's classes: its good class is "good", its defects scratch, dent and stain
LINE_CLASSES = {"ok": "good", "scratch": "scratch", "spot": "dent", "crack": "stain"}


def mono12_line(root: Path, counts: dict[str, int], size: int = 32, batch: int = 0, tiff_every: int = 3) -> Path:
    """A Mono12 camera's ImageFolder ``root/<class>/``: the demo defects (real textures, `spt_core.demo`) as 12-bit
    values in 16-bit PNGs, every `tiff_every`-th file of a class a 16-bit TIFF (an archive's format), with the
    classes and the imbalance of `counts` (keys: good, scratch, dent, stain). `batch` > 0 gives new frames."""
    import shutil

    from PIL import Image

    from spt_core.demo import generate_demo_defects  # torch-free: the tests that only need files stay light

    demo = {line: d for d, line in LINE_CLASSES.items()}
    tmp = root.with_name(root.name + ".demo")
    generate_demo_defects(tmp, size=size, batch=batch, classes=[demo[c] for c in counts], bit_depth=12,
                          counts={demo[c]: n for c, n in counts.items()})  # fmt: skip
    for cls in counts:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(sorted((tmp / demo[cls]).glob("*.png"))):
            if i % tiff_every == 0:
                with Image.open(f) as im:
                    im.save(root / cls / f"{f.stem}.tif")
            else:
                shutil.copy(f, root / cls / f.name)
    shutil.rmtree(tmp)
    return root


def line_frames(root: Path) -> list[tuple[Path, str]]:
    """Every image of an ImageFolder as (path, class), sorted."""
    return sorted((p, p.parent.name) for p in root.glob("*/*") if p.is_file())
