"""A table's data: the `prepare` source of a task, and the k-fold splits of `compare.py --kfold`.

Every split is prepared once under the work directory (seed 0) and reused by each run and each resume.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from benchmarks.heldout_tasks import HELD_OUT_TASKS, heldout_source
from spt_core.portable.errors import SensituneError
from spt_core.portable.io import write_json


def task_source(task: str, work_dir: Path, n_images: int) -> str:
    """`prepare`'s source for a task. The builtin demo set has 100 images a class; for the 1k protocol (800 + 200 +
    a test set) generate as many as the splits need, with the generator's defaults otherwise (96 px, seed 0). A
    held-out task (`benchmarks.heldout_tasks`) is its package's images, written once as an ImageFolder."""
    if task in HELD_OUT_TASKS:
        return heldout_source(task, work_dir)
    if task != "demo-defects":
        return task
    from spt_core.api import DEMO_CLASSES, generate_demo_defects

    per_class = -(-n_images // len(DEMO_CLASSES))
    src = work_dir / "data" / f"demo-defects-source_{per_class}"
    if not (src / ".complete").is_file():  # a half-written folder from an interrupted run is completed in place
        generate_demo_defects(src, n_per_class=per_class, counts=None)
        (src / ".complete").touch()
    return str(src)


def kfold_dirs(data_dir: Path, k: int) -> tuple[list[Path], Path]:
    """K stratified folds of train+val and the refit split, prepared beside `data_dir` (seed 0, idempotent).

    Fold i trains on the other folds and validates on fold i; the refit trains on all of train+val (its val split
    is the original val, which the k-fold rule never reads). Every one keeps the original test split.

    Raises:
        SensituneError: the folds were made from another version of `data_dir` (its data hash changed).
    """
    from spt_core.api import load_dataset_info, prepare, scan_split

    root = data_dir.parent / f"{data_dir.name}_kfold{k}"
    outs = [root / f"fold{i}" for i in range(k)] + [root / "refit"]
    info = load_dataset_info(data_dir)
    stamp = root / "source.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("data_hash") != info.data_hash:
        raise SensituneError(f"{root}: folds of another version of {data_dir}; delete {root} and run again")
    if all((d / "dataset.json").is_file() for d in outs):
        return outs[:-1], outs[-1]
    names = info.class_names
    pool = [(f"{split}_{p.name}", p, y) for split in ("train", "val") for p, y in scan_split(data_dir / split, names)]
    fold_of: dict[tuple[int, str], int] = {}  # (label, file): names are unique within a class only
    for label in range(len(names)):  # stratified: each class dealt round-robin after a seeded shuffle
        mine = sorted(n for n, _, y in pool if y == label)
        random.Random(f"{label}").shuffle(mine)
        fold_of |= {(label, n): (j + label) % k for j, n in enumerate(mine)}  # spare images spread over folds
    test = scan_split(data_dir / "test", names)
    for i, out in enumerate(outs):
        src = root / "src" / out.name
        for name, path, y in pool:
            split = "train" if i == k or fold_of[y, name] != i else "val"
            _link(src / split / names[y] / name, path)
        for path, y in scan_split(data_dir / "val", names) if i == k else []:
            _link(src / "val" / names[y] / f"val_{path.name}", path)
        for path, y in test:
            _link(src / "test" / names[y] / path.name, path)
        prepare(str(src), out, n_train=None, n_val=None, n_test=None, seed=0, split=None, ok_class=None)
    write_json(stamp, {"data_hash": info.data_hash, "k": k})
    return outs[:-1], outs[-1]


def _link(dst: Path, target: Path) -> None:
    """A fold's file is a link to the prepared image: K + 1 splits cost no copies."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.is_symlink():
        dst.symlink_to(target.resolve())
