"""Image files on disk for the data tests: random PNGs, and a VTAB-1k task in its list-file layout."""

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
