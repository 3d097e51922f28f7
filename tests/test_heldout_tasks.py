"""benchmarks/heldout_tasks.py: the held-out tasks' images come from their PyPI packages, labelled as declared.

The packages are `dev` dependencies (pyproject.toml): a missing one fails these tests, it does not skip them.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import heldout_tasks
from benchmarks.heldout_tasks import (
    ANIMAL_CLASSES,
    animal_shape_arrays,
    animal_shape_entries,
    elpv_entries,
    load_array,
    package_files,
    write_folder,
)
from benchmarks.imbalance import imbalanced_source
from benchmarks.task_data import task_source
from spt_core.data.prepare import prepare
from spt_core.portable.errors import SensituneError

# ELPV's four expert levels: a cell is defective from 2/3 on (a rule at p > 0 or p == 1 labels other cells)
ELPV_RULE = {0.0: "functional", 0.3333: "functional", 0.6667: "defective", 1.0: "defective"}


def _elpv_probabilities() -> dict[str, float]:
    """cellNNNN -> defect probability, read straight from the package's labels.csv."""
    _, (labels,) = package_files("elpv")
    rows = (line.split() for line in labels.read_text().splitlines() if line.strip())
    return {Path(r[0]).stem: round(float(r[1]), 4) for r in rows}


def _prepare_tiny(entries: list, tmp_path: Path, per_split: int) -> tuple[Path, object]:
    src = write_folder(entries, tmp_path / "src")
    out = tmp_path / "out"
    info = prepare(str(src), out, n_train=per_split, n_val=per_split, n_test=per_split, split=None, ok_class=None)
    return out, info


def test_elpv_cells_labelled_by_the_half_probability_rule(tmp_path: Path) -> None:
    probs = _elpv_probabilities()
    entries = elpv_entries()
    assert set(probs.values()) == set(ELPV_RULE)
    assert {uid: name for uid, name, _ in entries} == {uid: ELPV_RULE[p] for uid, p in probs.items()}
    # a tiny subset with one cell of every level, through the harness's own prepare
    pick = [e for p in ELPV_RULE for e in [e for e in entries if probs[e[0]] == p][: 1 + (p in (0.0, 1.0))]]
    out, info = _prepare_tiny(pick, tmp_path, per_split=2)
    assert info.class_names == ["defective", "functional"]
    assert [sum(info.counts[s].values()) for s in ("train", "val", "test")] == [2, 2, 2]
    written = sorted(out.rglob("cell*.png"))
    assert len(written) == 6
    for p in written:  # each image is its package file's pixels, in the folder of its level's class
        assert p.parent.name == ELPV_RULE[probs[p.stem]]
        source = {uid: f for uid, _, f in pick}[p.stem]
        np.testing.assert_array_equal(np.asarray(Image.open(p))[..., 0], np.asarray(Image.open(source)))


def test_animal_shapes_distinct_images_and_class_order(tmp_path: Path) -> None:
    images, labels = animal_shape_arrays()
    entries = animal_shape_entries()
    first: dict[bytes, int] = {}
    for i, im in enumerate(images):
        first.setdefault(im.tobytes(), i)
    assert 0 < len(entries) == len(first) < len(images)  # the package repeats some images: each is kept once
    for uid, name, im in entries:
        i = int(uid.removeprefix("animal_"))
        assert first[im.tobytes()] == i and name == ANIMAL_CLASSES[labels[i]]
    # the names follow the labels: giraffes are the tallest shapes, zebras the only striped (mid-grey) ones
    fg = images > 64
    aspect = fg.any(2).sum(1) / np.maximum(fg.any(1).sum(1), 1)
    grey = ((images > 40) & (images < 200)).sum((1, 2)) / np.maximum((images > 40).sum((1, 2)), 1)
    by_class = [(np.median(aspect[labels == c]), grey[labels == c].mean()) for c in range(len(ANIMAL_CLASSES))]
    assert ANIMAL_CLASSES[int(np.argmax([a for a, _ in by_class]))] == "giraffe"
    assert ANIMAL_CLASSES[int(np.argmax([g for _, g in by_class]))] == "zebra"
    pick = [e for c in ANIMAL_CLASSES for e in [e for e in entries if e[1] == c][:3]]
    _, info = _prepare_tiny(pick, tmp_path, per_split=len(ANIMAL_CLASSES))
    assert info.class_names == list(ANIMAL_CLASSES)
    assert all(info.counts[s] == dict.fromkeys(ANIMAL_CLASSES, 1) for s in ("train", "val", "test"))


def test_source_written_once_per_package_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    few = elpv_entries()[:3]
    monkeypatch.setitem(heldout_tasks.ENTRIES, "elpv", lambda: few)
    src = Path(task_source("elpv", tmp_path, 0))
    assert src == tmp_path / "data" / f"elpv-source_{importlib.metadata.version('elpv-dataset')}"
    assert sorted(p.name for p in src.rglob("*.png")) == sorted(f"{uid}.png" for uid, _, _ in few)
    monkeypatch.setitem(heldout_tasks.ENTRIES, "elpv", lambda: pytest.fail("a complete source is not rewritten"))
    assert task_source("elpv", tmp_path, 0) == str(src)


def test_missing_package_names_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.distribution

    def distribution(name: str) -> importlib.metadata.Distribution:
        if name == "animal-shape-mnist":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(SensituneError, match="pip install animal-shape-mnist"):
        task_source("animal-shapes", tmp_path, 0)
    assert not (tmp_path / "data").exists()


class _Payload:
    """A pickle that would create a directory when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return os.makedirs, (str(self.path),)


def test_package_pickles_load_arrays_only(tmp_path: Path) -> None:
    good = tmp_path / "good.gz"
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    good.write_bytes(gzip.compress(pickle.dumps(array)))
    np.testing.assert_array_equal(load_array(good), array)
    bad, marker = tmp_path / "bad.gz", tmp_path / "ran"
    bad.write_bytes(gzip.compress(pickle.dumps(_Payload(marker))))
    with pytest.raises(pickle.UnpicklingError, match="os.makedirs|posix.makedirs"):
        load_array(bad)
    assert not marker.exists()


def test_the_held_out_lines_take_their_declared_classes_by_a_seeded_draw(tmp_path: Path) -> None:
    """`--imbalance` on ELPV and Animal-Shape (benchmarks/README.md, round 5): ELPV's cells by the expert's level,
    each class a draw that is the same on every machine; a class with too few images is refused, not cut short."""
    probs = _elpv_probabilities()
    level = {0.0: "functional", 0.3333: "possible", 0.6667: "likely", 1.0: "defective"}
    src, ok, counts = imbalanced_source("elpv", tmp_path / "a", 100, 0.9)
    assert ok == "functional" and counts == {"functional": 90, "defective": 5, "possible": 3, "likely": 2}
    files = {c: sorted(p.stem for p in (Path(src) / c).glob("*.png")) for c in counts}
    assert {c: len(f) for c, f in files.items()} == counts
    assert all(level[probs[uid]] == c for c, uids in files.items() for uid in uids)  # not the two-class rule
    assert files["functional"] != sorted(u for u, p in probs.items() if p == 0.0)[:90]  # a draw, not the first 90
    again, _, _ = imbalanced_source("elpv", tmp_path / "b", 100, 0.9)
    assert {c: sorted(p.stem for p in (Path(again) / c).glob("*.png")) for c in counts} == files
    src, ok, counts = imbalanced_source("animal-shapes", tmp_path / "a", 60, 0.9)
    assert ok == "horse" and counts == {"horse": 54, "zebra": 3, "cow": 2, "dog": 1}
    animals = {c: sorted(p.name for p in (Path(src) / c).glob("*.png")) for c in counts}
    assert {c: len(f) for c, f in animals.items()} == counts
    again, _, _ = imbalanced_source("animal-shapes", tmp_path / "b", 60, 0.9)
    assert {c: sorted(p.name for p in (Path(again) / c).glob("*.png")) for c in counts} == animals
    n_likely = sum(p == 0.6667 for p in probs.values())  # the scarcest level: 1,200 images at half good need 120
    with pytest.raises(ValueError, match=f"--n-images: the line needs 120 likely images, the set has {n_likely}"):
        imbalanced_source("elpv", tmp_path / "c", 1200, 0.5)
    assert not (tmp_path / "c" / "data" / "elpv-line_1200_0.5").exists()  # nothing half-written


@pytest.mark.parametrize("row", ["images/cell0001.png 0.5 mono", "images/cell0001.png 1.3333 poly",
                                 "images/cell0001.png"])  # fmt: skip
def test_an_elpv_label_off_the_experts_four_levels_is_refused_in_one_line(row: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("images/cell0000.png 0.3333 mono\n" + row + "\n")
    monkeypatch.setattr(heldout_tasks, "package_files", lambda task: ("1.0", [labels]))
    with pytest.raises(SensituneError, match=r"labels.csv:2: not '<image> <probability 0, 1/3, 2/3 or 1> <type>'"):
        elpv_entries(grades=True)
