"""Datasets: sources -> a prepared split directory -> loaders.

`prepare` turns any source into one file layout, and everything downstream reads only that layout::

    out_dir/train/<class>/<id>.png   out_dir/val/<class>/<id>.png   out_dir/test/<class>/<id>.png
    out_dir/dataset.json             class names (label order), counts, source, seed, data_hash

Sources: an ImageFolder directory (``root/<class>/*.png`` or already split ``root/{train,val,test}/<class>/``),
a ``.csv`` / ``.jsonl`` manifest (``path,label[,split]``, paths relative to the manifest), a VTAB-1k directory
(``train800.txt val200.txt test.txt``), or a builtin: ``digits``, ``fashion-mnist`` (Debian package
``dataset-fashion-mnist``), ``demo-defects`` (`generate_demo_defects` with its defaults).

Few-shot subsets are class-balanced (``n // K`` per class, the remainder going to the first classes) and drawn
from a seeded per-class permutation of the files sorted by id, so (source, seed, n_*) fixes the data exactly.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from spt_core.demo import DEMO_CLASSES, generate_demo_defects
from spt_core.errors import DataError
from spt_core.io import write_bytes
from spt_core.preprocess import Preprocess, load_rgb

__all__ = [
    "BUILTINS",
    "DEMO_CLASSES",
    "FASHION_MNIST_CLASSES",
    "DatasetInfo",
    "ImageDataset",
    "SeededSampler",
    "data_hash",
    "eval_transform",
    "generate_demo_defects",
    "load_dataset_info",
    "make_loaders",
    "prepare",
    "scan_split",
    "sensitivity_loader",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SPLITS = ("train", "val", "test")
BUILTINS = ("digits", "fashion-mnist", "demo-defects")
VTAB_LISTS = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian: apt-get install dataset-fashion-mnist
# Official label order; "T-shirt/top" loses its slash because class names are directory names.
FASHION_MNIST_CLASSES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_SKIP_HINT = "remove or replace it, or pass skip_bad=True (--skip-bad) to skip bad files"


@dataclass
class DatasetInfo:
    """What `prepare` wrote (``dataset.json``). ``class_names[i]`` is label ``i``."""

    class_names: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    source: str
    seed: int
    data_hash: str  # sha256 over sorted relative paths + file sha256s
    n_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # the first skipped files, for the log
    params: dict[str, Any] = field(default_factory=dict)  # n_train, n_val, n_test, image_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        return cls(**d)

    def save(self, path: Path) -> None:
        """Write JSON atomically (temp file in the same directory + rename)."""
        write_bytes(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: Path) -> DatasetInfo:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise DataError(f"{path}: not a readable dataset.json ({e}); re-run `sensitune prepare`") from e


def load_dataset_info(data_dir: Path) -> DatasetInfo:
    """Read ``data_dir/dataset.json`` written by `prepare`."""
    path = Path(data_dir) / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path} not found; prepare the data first (`sensitune prepare SOURCE --out {data_dir}`)")
    return DatasetInfo.load(path)


# ---------------------------------------------------------------------------------------------------- sources
@dataclass
class _Item:
    uid: str  # output file stem, unique within its class
    label: int
    split: str | None = None  # a split the source itself defines
    path: Path | None = None  # file sources ...
    array: np.ndarray | None = None  # ... or in-memory builtins, (H, W, 3) uint8
    where: str = ""  # for messages, e.g. "labels.csv:12"


@dataclass
class _Source:
    class_names: list[str]
    items: list[_Item]
    desc: str


def _read_source(source: str, tmp: Path, classes: Sequence[str] | None, skip_bad: bool, bad: list[str]) -> _Source:
    if source == "digits":
        return _read_digits()
    if source == "fashion-mnist":
        return _read_fashion_mnist(Path(os.environ.get("SENSITUNE_FASHION_MNIST_DIR", FASHION_MNIST_DIR)))
    if source == "demo-defects":
        src = _read_folder(generate_demo_defects(tmp / ".source"), classes or DEMO_CLASSES, skip_bad, bad)
        return _Source(src.class_names, src.items, "demo-defects")
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


def _read_digits() -> _Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), values 0..16 -> 0..255
    rgb = np.repeat(grey[..., None], 3, axis=-1)  # (N, 8, 8, 3)
    items = [_Item(f"digits_{i:04d}", int(y), array=im) for i, (im, y) in enumerate(zip(rgb, d.target))]
    return _Source([str(i) for i in range(10)], items, "digits")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format), gzip or raw: magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3] if len(data) >= 4 else 0
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if data[:3] != b"\x00\x00\x08" or len(data) != 4 + 4 * ndim + int(np.prod(dims)):
        raise DataError(f"{path}: not a valid uint8 IDX file; reinstall it (apt-get install --reinstall ...)")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _read_fashion_mnist(root: Path) -> _Source:
    items: list[_Item] = []
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
        items += [_Item(f"{split}_{i:05d}", int(y), split, array=im) for i, (im, y) in enumerate(zip(rgb, labels))]
    return _Source(list(FASHION_MNIST_CLASSES), items, "fashion-mnist")


def _read_folder(root: Path, classes: Sequence[str] | None, skip_bad: bool, bad: list[str]) -> _Source:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    presplit = bool(subdirs) and {p.name for p in subdirs} <= set(SPLITS) and (root / "train").is_dir()
    if presplit:  # root/{train,val,test}/<class>/, e.g. an earlier prepare output
        class_dirs = [(s.name, c) for s in subdirs for c in sorted(s.iterdir()) if c.is_dir()]
    else:
        class_dirs = [(None, c) for c in subdirs]
    names = list(classes) if classes else sorted({c.name for _, c in class_dirs})
    _check_classes(names, str(root))
    items: list[_Item] = []
    for split, cdir in class_dirs:
        if cdir.name not in names:
            raise DataError(f"{cdir}: class {cdir.name!r} is not in the class list {names}; add it or remove the dir")
        n_before = len(items)
        for f in sorted(p for p in cdir.rglob("*") if p.is_file() and not p.name.startswith(".")):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                reason = f"not an image (suffix {f.suffix or 'none'!r}, expected {'/'.join(IMAGE_SUFFIXES)})"
                _bad(f, reason, skip_bad, bad)
                continue
            items.append(_Item(_stem_id(f.relative_to(cdir)), names.index(cdir.name), split, f, where=str(f)))
        if len(items) == n_before and not (presplit and split != "train"):
            raise DataError(f"class dir {cdir} has no images ({'/'.join(IMAGE_SUFFIXES)}); add images or remove it")
    return _Source(names, items, str(root))


def _read_manifest(path: Path, classes: Sequence[str] | None, skip_bad: bool, bad: list[str]) -> _Source:
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
    items: list[_Item] = []
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
            _bad(f, f"not an image (suffix {f.suffix or 'none'!r})", skip_bad, bad)
            continue
        items.append(_Item(_stem_id(Path(str(r["path"]))), names.index(label), split, f, where=where))
    return _Source(names, items, str(path))


def _read_vtab(root: Path) -> _Source:
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
    items = [_Item(_stem_id(p.relative_to(root)), labels.index(y), s, p, where=w) for s, w, p, y in rows]
    return _Source([str(y) for y in labels], items, str(root))


def _check_classes(names: list[str], where: str) -> None:
    if len(names) < 2:
        raise DataError(f"{where}: found {len(names)} class(es) {names}; a classifier needs at least 2 classes")
    for n in names:
        if n in ("", ".", "..") or "/" in n or "\\" in n or n != n.strip():
            raise DataError(f"{where}: class name {n!r} cannot be a directory name; rename the class")


def _stem_id(rel: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(rel.with_suffix("").parts))


def _bad(path: Path, reason: str, skip_bad: bool, bad: list[str]) -> None:
    if not skip_bad:
        raise DataError(f"{path}: {reason}; {_SKIP_HINT}")
    bad.append(str(path))


# ---------------------------------------------------------------------------------------------------- prepare
def prepare(
    source: str,
    out_dir: Path,
    *,
    n_train: int | None = 800,
    n_val: int | None = 200,
    n_test: int | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    image_size: int | None = None,
    classes: Sequence[str] | None = None,
) -> DatasetInfo:
    """Materialise ``out_dir/{train,val,test}/<class>/<id>.png`` and ``out_dir/dataset.json`` from a source.

    Args:
        source: ImageFolder dir, ``.csv``/``.jsonl`` manifest, VTAB-1k dir, or a builtin name (`BUILTINS`).
        out_dir: Output directory; replaced atomically, and only if it is empty or a previous `prepare` output.
        n_train: Train images over all classes, class-balanced. None = all available. For a source split whose
            size equals n (e.g. VTAB train800 with 800) the split is kept as is, balanced or not.
        n_val: Val images; drawn disjointly from train when the source has no val split. None = the source's
            val split, or no val images when it has none.
        n_test: Test images; None = the source's test split, or all images left after train and val.
        seed: Seed of the subset draws.
        skip_bad: Skip (and count) unreadable or non-image files instead of raising.
        image_size: Resize every image to this square size (bicubic) when writing; None keeps the source size.
        classes: Class list in label order; default sorted class names (dirs / manifest labels).

    Returns:
        The `DatasetInfo` also saved as ``out_dir/dataset.json``.

    Raises:
        DataError: Any problem with the source, one line naming the file and the fix.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    src_path = Path(source).expanduser().resolve()
    if source not in BUILTINS and (src_path == out_dir or out_dir in src_path.parents):
        raise DataError(f"out_dir {out_dir} contains the source {source}; write the prepared data somewhere else")
    if source not in BUILTINS and src_path.is_dir() and src_path in out_dir.parents:
        raise DataError(f"out_dir {out_dir} is inside the source dir {source}; write it outside the source")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "dataset.json").is_file():
        raise DataError(f"out_dir {out_dir} exists and is not a prepared dataset; pick a new or empty directory")
    for flag, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if n is not None and n < 0:
            raise DataError(f"{flag}={n}: give a count >= 0 or None for all")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); the renamed dataset should be readable like any dir
    try:
        bad: list[str] = []
        src = _read_source(source, tmp, classes, skip_bad, bad)
        items = _stage(src.items, tmp / ".staging", image_size, skip_bad, bad)
        splits = _assign_splits(items, src, n_train, n_val, n_test, seed)
        counts = _write_splits(splits, src.class_names, tmp, image_size)
        for scratch in (".staging", ".source"):
            shutil.rmtree(tmp / scratch, ignore_errors=True)
        if bad:
            warnings.warn(f"skipped {len(bad)} bad file(s) in {source}, e.g. {bad[0]}", stacklevel=2)
        params = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size}
        info = DatasetInfo(src.class_names, counts, src.desc, seed, data_hash(tmp), len(bad), bad[:20], params)
        info.save(tmp / "dataset.json")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _stage(items: list[_Item], staging: Path, image_size: int | None, skip_bad: bool, bad: list[str]) -> list[_Item]:
    """Decode every file once (so bad files are found before the split draws) into staged PNGs."""
    staging.mkdir(parents=True, exist_ok=True)
    kept = []
    for k, it in enumerate(items):
        if it.path is None:
            kept.append(it)
            continue
        try:
            with Image.open(it.path) as f:
                f.load()  # decodes fully: truncated files fail here, not in the middle of training
                img = f.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            _bad(it.path, f"cannot read image ({' '.join(str(e).split())})", skip_bad, bad)
            continue
        staged = staging / f"{k}.png"
        _save_png(img, staged, image_size)
        kept.append(_Item(it.uid, it.label, it.split, staged, where=it.where))
    return kept


def _quota(n: int, k: int) -> list[int]:
    return [n // k + (1 if c < n % k else 0) for c in range(k)]


def _assign_splits(
    items: list[_Item], src: _Source, n_train: int | None, n_val: int | None, n_test: int | None, seed: int
) -> dict[str, list[_Item]]:
    k = len(src.class_names)
    by_split: dict[str | None, list[_Item]] = {}
    for it in items:
        by_split.setdefault(it.split, []).append(it)
    if None in by_split and len(by_split) > 1:  # e.g. a manifest whose split column is partly empty
        raise DataError(f"{src.desc}: some entries have a split and some do not; give every row a split or none")
    if by_split.keys() - {None} and "train" not in by_split:
        raise DataError(f"{src.desc}: the source defines splits but no train split; add train images")

    def draw(pool: list[_Item], wants: dict[str, int | None], pool_id: int) -> dict[str, list[_Item]]:
        """Class-balanced, seeded slices of one pool; the single None entry (if any) takes the rest."""
        per_class = [sorted((it for it in pool if it.label == c), key=lambda it: it.uid) for c in range(k)]
        out: dict[str, list[_Item]] = {s: [] for s in wants}
        for c, cls_items in enumerate(per_class):
            rng = np.random.default_rng([seed, pool_id, c])
            order = [cls_items[i] for i in rng.permutation(len(cls_items))]
            need = {s: _quota(n, k)[c] for s, n in wants.items() if n is not None}
            if sum(need.values()) > len(order):
                asked = ", ".join(f"n_{s}={wants[s]}" for s in SPLITS if wants.get(s) is not None)
                raise DataError(
                    f"{src.desc}: class {src.class_names[c]!r} has {len(order)} images but {asked} need "
                    f"{sum(need.values())} of them; lower the counts or add images"
                )
            start = 0
            for s in wants:  # fixed-count splits first, in wants order; the open one last
                if wants[s] is not None:
                    out[s] += order[start : start + need[s]]
                    start += need[s]
            out.update({s: out[s] + order[start:] for s, n in wants.items() if n is None})
        return out

    def whole_or_draw(split: str, n: int | None, pool_id: int) -> list[_Item]:
        pool = pools[split]
        return pool if n is None or n == len(pool) else draw(pool, {split: n}, pool_id)[split]

    pools = {"train": by_split.pop(None)} if None in by_split else by_split  # no splits: all of it is the pool
    out = {s: whole_or_draw(s, n, i) for i, (s, n) in enumerate((("val", n_val), ("test", n_test)), 1) if s in pools}
    # Per class the draw takes val, then a counted test, then train; so val stays fixed when n_train changes and a
    # smaller train set is a subset of a larger one. An uncounted split (None) gets what is left.
    wants: dict[str, int | None] = {"val": n_val or 0} if "val" not in pools else {}
    if "test" not in pools and n_test is not None:
        wants["test"] = n_test
    wants["train"] = n_train
    if "test" not in pools and n_test is None:
        if n_train is None:
            raise DataError(f"{src.desc} has no test split: give n_train or n_test (both None leave test undefined)")
        wants["test"] = None
    if len(wants) == 1:
        return out | {"train": whole_or_draw("train", n_train, 0)}
    return out | draw(pools["train"], wants, 0)


def _write_splits(splits: dict[str, list[_Item]], names: list[str], root: Path, image_size: int | None) -> dict:
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        used: dict[tuple[int, str], int] = {}
        for c in names:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for it in sorted(splits.get(split, []), key=lambda it: (it.label, it.uid)):
            uid = it.uid
            if (it.label, uid) in used:  # distinct sources can sanitise to one id: keep both, suffixed
                uid = f"{uid}-{hashlib.sha1(it.where.encode()).hexdigest()[:8]}"
            used[(it.label, uid)] = 1
            dest = root / split / names[it.label] / f"{uid}.png"
            if it.array is not None:
                _save_png(Image.fromarray(it.array), dest, image_size)
            else:
                os.replace(it.path, dest)  # staged PNG, already converted and resized
        counts[split] = {c: sum(1 for _ in (root / split / c).glob("*.png")) for c in names}
    return counts


def _save_png(img: Image.Image, path: Path, image_size: int | None) -> None:
    img = img.convert("RGB")
    if image_size is not None and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    img.save(path, format="PNG")  # no metadata, fixed zlib settings: same pixels -> same bytes


def data_hash(root: Path) -> str:
    """sha256 over the sorted relative paths and sha256s of every image under ``root/{train,val,test}``."""
    h = hashlib.sha256()
    files = sorted(p for s in SPLITS for p in (Path(root) / s).rglob("*") if p.is_file())
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Swap the finished temp dir in; an old out_dir is moved aside first and deleted only after the swap."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "data")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- loaders
def scan_split(split_dir: Path, class_names: Sequence[str]) -> list[tuple[Path, int]]:
    """(path, label) for every image of one split directory, in file order (class order, then name)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"split dir {split_dir} does not exist; prepare the data first (`sensitune prepare`)")
    records = []
    for label, name in enumerate(class_names):
        if (split_dir / name).is_dir():  # a class may be absent from a split (e.g. a small test set)
            files = sorted((split_dir / name).iterdir())
            records += [(p, label) for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return records


class ImageDataset(Dataset):
    """(path, label) records -> (transformed image tensor, label)."""

    def __init__(self, records: Sequence[tuple[Path, int]], transform: Any) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.records[i]
        try:
            return self.transform(load_rgb(path)), label
        except OSError as e:
            raise DataError(f"{path}: cannot read image ({e}); re-run prepare") from e


def eval_transform(pre: Preprocess) -> Any:
    """The timm transform equal to `spt_core.preprocess.preprocess_image`: direct resize to (H, W), normalise.

    ``crop_mode="squash"`` with ``crop_pct=1.0`` resizes both edges straight to the target and crops nothing.
    Training uses it too (no augmentation, as in the VTAB-1k recipe).
    """
    import timm.data

    return timm.data.create_transform(
        input_size=(3, *pre.size),
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        crop_pct=1.0,
        crop_mode="squash",
        is_training=False,
    )


class SeededSampler(Sampler[int]):
    """Random order fixed by ``seed + epoch``; call `set_epoch` before each epoch so a resumed run replays it."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_loaders(
    data_dir: Path, pre: Preprocess, *, batch_size: int = 32, seed: int = 0, num_workers: int = 0
) -> dict[str, DataLoader]:
    """Loaders ``train`` (shuffled by a `SeededSampler`, ``loader.sampler.set_epoch(e)``), ``val``, ``test``."""
    info = load_dataset_info(data_dir)
    tf = eval_transform(pre)
    loaders = {}
    for split in SPLITS:
        ds = ImageDataset(scan_split(Path(data_dir) / split, info.class_names), tf)
        sampler = SeededSampler(len(ds), seed) if split == "train" else None
        loaders[split] = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    return loaders


def sensitivity_loader(data_dir: Path, pre: Preprocess, batch_size: int = 32) -> DataLoader:
    """Train images in file order, unshuffled (as the official SPT code measures sensitivity)."""
    info = load_dataset_info(data_dir)
    ds = ImageDataset(scan_split(Path(data_dir) / "train", info.class_names), eval_transform(pre))
    return DataLoader(ds, batch_size=batch_size, shuffle=False)
