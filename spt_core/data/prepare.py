"""Prepare: any source -> one split directory layout, which is all that training and export read::

    out_dir/train/<class>/<id>.png   out_dir/val/<class>/<id>.png   out_dir/test/<class>/<id>.png
    out_dir/dataset.json             class names (label order), counts, source, seed, data_hash

Two split modes, both drawn from a seeded per-class permutation of the files sorted by id, so the arguments fix
the data exactly:

- proportional (``split=(0.7, 0.15, 0.15)``, what a line's data needs): every image is used, each class is split
  in those proportions, and validation and test get at least ``min_per_class`` images of every class; a class too
  small for that is a one-line error naming it and its count;
- counts (``split=None``; the benchmark protocols such as VTAB-1k): class-balanced subsets of ``n_train``,
  ``n_val``, ``n_test`` images (``n // K`` per class, the remainder going to the first classes).

The declared good class (``ok_class``) is checked against the class names here, once, and recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spt_core.data.sources import BUILTINS, SPLITS, Item, Source, read_source, skip_or_raise
from spt_core.portable.errors import DataError, check_class_name, few
from spt_core.portable.io import write_bytes
from spt_core.portable.preprocess import choose_bit_depth, frame_max, load_rgb, needs_depth, open_image, to_rgb


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
    params: dict[str, Any] = field(default_factory=dict)  # split, n_train, n_val, n_test, image_size
    ok_class: str | None = None  # the declared good class (None: plain classification, no defect metrics)
    bit_depth: int | None = None  # the bit depth 16/32-bit frames were scaled by (None: none such, or float frames)
    bit_depth_inferred: bool = False  # True: measured from the frames (data.bit_depth null), not declared
    max_value: int | None = None  # the largest value of the 16/32-bit integer frames (None: there were none)

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


def prepare(
    source: str,
    out_dir: Path,
    *,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    image_size: int | None = None,
    classes: Sequence[str] | None = None,
    split: Sequence[float] | None,
    min_per_class: int = 2,
    ok_class: str | None,
    bit_depth: int | None = None,
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
        split: (train, val, test) fractions: the proportional mode, which ignores the ``n_*`` counts; None = counts.
            Required, as is `ok_class`: a line (``data.split``, ``data.ok_class``) and a benchmark protocol (counts,
            no good class) want different ones, so each caller says which it is.
        min_per_class: Proportional mode: the fewest images of a class in validation and in test.
        ok_class: The good class; must be one of the class names (None: no good class).
        bit_depth: Bits of 16/32-bit frames (Mono12 in 16-bit files: 12); None = from each file's mode.

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
    if split is not None and (len(split) != 3 or min(split) < 0 or split[0] <= 0 or abs(sum(split) - 1) > 1e-6):
        raise DataError(f"split={list(split)}: give [train, val, test] fractions that sum to 1, e.g. [0.7, 0.15, 0.15]")
    if min_per_class < 1:
        raise DataError(f"min_per_class={min_per_class}: give 1 or more validation and test images per class")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); the renamed dataset should be readable like any dir
    try:
        bad: list[str] = []
        src = read_source(source, tmp, classes, skip_bad, bad)
        for name in src.class_names:
            check_class_name(name, src.desc)
        if ok_class is not None and ok_class not in src.class_names:
            raise DataError(
                f"data.ok_class={ok_class!r} is not a class of {src.desc}; found {src.class_names}: declare the good "
                "class's name (data.ok_class) or null for plain classification"
            )
        items, depth, top = _stage(src.items, tmp / ".staging", image_size, skip_bad, bad, bit_depth)
        if split is not None:
            splits = _proportional(items, src, tuple(split), min_per_class, seed)
        else:
            splits = _assign_splits(items, src, n_train, n_val, n_test, seed)
        counts = _write_splits(splits, src.class_names, tmp, image_size)
        for scratch in (".staging", ".source"):
            shutil.rmtree(tmp / scratch, ignore_errors=True)
        if bad:
            warnings.warn(f"skipped {len(bad)} bad file(s) in {source}: {few(bad)}", stacklevel=2)
        params = {"split": list(split) if split is not None else None, "min_per_class": min_per_class,
                  "n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size}  # fmt: skip
        info = DatasetInfo(src.class_names, counts, src.desc, seed, data_hash(tmp), len(bad), bad[:20], params,
                           ok_class, depth, bit_depth is None and depth is not None, top)  # fmt: skip
        info.save(tmp / "dataset.json")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _stage(
    items: list[Item], staging: Path, image_size: int | None, skip_bad: bool, bad: list[str], bit_depth: int | None
) -> tuple[list[Item], int | None, int | None]:
    """Decode every file (so bad files are found before the split draws) into staged 8-bit RGB PNGs, through the
    edge's own conversion (`spt_core.portable.preprocess`). 16/32-bit frames are measured first and converted once
    the bit depth is known (`choose_bit_depth`), so they decode twice; 8-bit files once. Every unreadable file is
    named at once (`_bad_files`).

    Returns:
        The staged items, the bit depth used (None: no 16/32-bit frames and none declared), the largest value of the
        16/32-bit integer frames (None: none).
    """
    staging.mkdir(parents=True, exist_ok=True)
    kept: list[Item] = []
    wide: list[tuple[int, int]] = []  # (position in kept, staging name) of the frames that wait for the depth
    failed: list[tuple[Path, str]] = []
    top: tuple[int, Path] | None = None  # the largest value of the 16/32-bit integer frames, and its file
    for k, it in enumerate(items):
        if it.path is None:
            kept.append(it)
            continue
        try:
            img = open_image(it.path)  # decodes fully: truncated files fail here, not in training
        except DataError as e:
            reason = str(e).removeprefix(f"{it.path}: ")
            failed.append((it.path, reason if "pixels" in reason else f"cannot read image ({reason})"))
            continue
        if needs_depth(img):
            v = frame_max(img)
            if v is not None and (top is None or v > top[0]):
                top = (v, it.path)
            wide.append((len(kept), k))
            kept.append(it)
            continue
        kept.append(_staged(it, to_rgb(img), staging / f"{k}.png", image_size))
    _bad_files(failed, skip_bad, bad)
    depth = choose_bit_depth(bit_depth, top[0] if top else None, f"in {top[1]}" if top else "")
    for i, k in wide:
        kept[i] = _staged(kept[i], load_rgb(kept[i].path, depth), staging / f"{k}.png", image_size)
    return kept, depth, top[0] if top else None


def _staged(it: Item, img: Image.Image, staged: Path, image_size: int | None) -> Item:
    _save_png(img, staged, image_size)
    return Item(it.uid, it.label, it.split, staged, where=it.where)


def _bad_files(failed: list[tuple[Path, str]], skip_bad: bool, bad: list[str]) -> None:
    """Skip the unreadable files (``skip_bad``), or stop naming every one of them (a bounded list) in one line."""
    if len(failed) == 1 or skip_bad:
        for path, reason in failed:
            skip_or_raise(path, reason, skip_bad, bad)
    elif failed:
        named, first = few([str(path) for path, _ in failed]), failed[0][1][:120]
        raise DataError(f"{len(failed)} unreadable image files: {named} (the first: {first}); remove or replace "
                        "them, or pass skip_bad=True (--skip-bad) to skip bad files")  # fmt: skip


def _proportional(
    items: list[Item], src: Source, split: tuple[float, float, float], min_per_class: int, seed: int
) -> dict[str, list[Item]]:
    """Every image, each class split in proportion; val and test get at least `min_per_class` of each class."""
    if any(it.split is not None for it in items):
        raise DataError(
            f"{src.desc} defines its own train/val/test splits; set data.split: null to keep them (count mode)"
        )
    out: dict[str, list[Item]] = {s: [] for s in SPLITS}
    k = len(src.class_names)
    by_class = [sorted((it for it in items if it.label == c), key=lambda it: it.uid) for c in range(k)]
    check_class_sizes({name: len(b) for name, b in zip(src.class_names, by_class)}, split, min_per_class, src.desc)
    for c, cls_items in enumerate(by_class):
        n = len(cls_items)
        n_val, n_test = _held_out(n, split, min_per_class)
        order = [cls_items[i] for i in np.random.default_rng([seed, 0, c]).permutation(n)]
        out["val"] += order[:n_val]
        out["test"] += order[n_val : n_val + n_test]
        out["train"] += order[n_val + n_test :]
    return out


def _held_out(n: int, split: Sequence[float], min_per_class: int) -> tuple[int, int]:
    """Validation and test images of a class of `n`: its share of each, at least `min_per_class`."""
    n_val, n_test = (max(min_per_class, round(f * n)) for f in split[1:])
    return n_val, n_test


def check_class_sizes(counts: dict[str, int], split: Sequence[float], min_per_class: int, where: str) -> None:
    """Every class big enough for the proportional split (1 image left to train after `_held_out`), else one line
    naming each class too small. Prepare asks it, and import too, so that a class of 2 stops before it is versioned.
    """
    small = {c: n for c, n in counts.items() if n - sum(_held_out(n, split, min_per_class)) < 1}
    if small:
        named = ", ".join(f"class {c!r} has {n} image(s)" for c, n in small.items())
        raise DataError(
            f"{where}: {named}; the split needs at least {2 * min_per_class + 1} (1 to train and "
            f"data.min_per_class={min_per_class} each to validate and test): add images of "
            f"{', '.join(map(repr, small))}, lower data.min_per_class, or leave the class out"
        )


def _quota(n: int, k: int) -> list[int]:
    return [n // k + (1 if c < n % k else 0) for c in range(k)]


def _assign_splits(
    items: list[Item], src: Source, n_train: int | None, n_val: int | None, n_test: int | None, seed: int
) -> dict[str, list[Item]]:
    k = len(src.class_names)
    by_split: dict[str | None, list[Item]] = {}
    for it in items:
        by_split.setdefault(it.split, []).append(it)
    if None in by_split and len(by_split) > 1:  # e.g. a manifest whose split column is partly empty
        raise DataError(f"{src.desc}: some entries have a split and some do not; give every row a split or none")
    if by_split.keys() - {None} and "train" not in by_split:
        raise DataError(f"{src.desc}: the source defines splits but no train split; add train images")

    def draw(pool: list[Item], wants: dict[str, int | None], pool_id: int) -> dict[str, list[Item]]:
        """Class-balanced, seeded slices of one pool; the single None entry (if any) takes the rest."""
        per_class = [sorted((it for it in pool if it.label == c), key=lambda it: it.uid) for c in range(k)]
        out: dict[str, list[Item]] = {s: [] for s in wants}
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

    def whole_or_draw(split: str, n: int | None, pool_id: int) -> list[Item]:
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


def _write_splits(splits: dict[str, list[Item]], names: list[str], root: Path, image_size: int | None) -> dict:
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


def _remove_orphans(out_dir: Path) -> None:
    """Delete the temp and old folders a killed `prepare` of this out_dir left beside it (`<name>.tmp-*`,
    `<name>.old-*`). Two prepares of one out_dir at once are not supported anyway: the second would replace the first.
    """
    for pattern in (f"{out_dir.name}.tmp-*", f"{out_dir.name}.old-*"):
        for orphan in out_dir.parent.glob(pattern):
            if orphan.is_dir() and not orphan.is_symlink():
                shutil.rmtree(orphan, ignore_errors=True)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Swap the finished temp dir in; an old out_dir is moved aside first and deleted only after the swap."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "data")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
