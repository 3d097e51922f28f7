"""Issue 33: `sensitune import` as a line engineer meets it after following the README: a clone where `make run`
left the demo's classes in data/raw, a good class called "Good", a class too small for the split, several corrupt
files. Each stops the import with one line that names what to do, before anything is copied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.config import load_params
from pipelines.ingest import good_class_guess, import_images
from spt_core.portable.errors import DataError


def _folder(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(len(counts))
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / cls / f"{root.name}-{i}.png")
    return root


def _params(raw: Path, **data: object) -> dict:
    return load_params(None, {"paths.raw": str(raw), **{f"data.{k}": v for k, v in data.items()}})


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.png")) if root.exists() else []


LINE = {"good": 12, "scratch": 6, "dent": 6, "stain": 6}
DEMO = {"ok": 6, "scratch": 6, "spot": 6, "crack": 6}


def test_a_raw_folder_holding_the_demos_classes_is_not_merged_into(tmp_path: Path) -> None:
    raw, mine = _folder(tmp_path / "raw", DEMO), _folder(tmp_path / "mine", LINE)
    before = _files(raw)
    with pytest.raises(DataError) as e:
        import_images(mine, _params(raw, ok_class="good"), dvc=False)
    msg = str(e.value)
    assert "already holds the classes ['crack', 'ok', 'scratch', 'spot']" in msg and "\n" not in msg
    assert "adds ['dent', 'good', 'stain']" in msg and "--replace" in msg and "--into" in msg
    assert _files(raw) == before  # nothing copied
    r = import_images(mine, _params(raw, ok_class="good"), replace=True, dvc=False)
    assert r["classes"] == ["dent", "good", "scratch", "stain"] and {p.name for p in raw.iterdir()} == set(LINE)


def test_into_merges_on_purpose_and_a_batch_of_known_classes_needs_no_flag(tmp_path: Path) -> None:
    raw = _folder(tmp_path / "raw", DEMO)
    r = import_images(_folder(tmp_path / "new", {"ok": 3, "dent": 5}), _params(raw), into=True, dvc=False)
    assert r["files"] == 8 and (raw / "dent").is_dir()
    r = import_images(_folder(tmp_path / "batch2", {"crack": 2, "ok": 1}), _params(raw), dvc=False)
    assert r["files"] == 3  # classes data/raw holds already: a new batch, no flag needed (crack: 6 + 2 images)


def test_the_good_class_is_proposed_when_ok_class_does_not_match(tmp_path: Path) -> None:
    mine = _folder(tmp_path / "mine", {"Good": 6, "dent": 6})
    with pytest.raises(DataError, match=r"^data.ok_class='ok' is not a class of .*\['Good', 'dent'\]: did you mean "
                                        r"--set data.ok_class=Good\?"):  # fmt: skip
        import_images(mine, _params(tmp_path / "raw"), dvc=False)
    assert not (tmp_path / "raw").exists()
    assert good_class_guess("ok", ["PASS", "dent"]) == "PASS" and good_class_guess("ok", ["Normal", "x"]) == "Normal"
    assert good_class_guess("goood", ["dent", "good"]) == "good" and good_class_guess("ok", ["a", "b"]) is None


def test_a_wrong_ok_class_given_with_set_names_the_flag_and_the_closest_class(tmp_path: Path, monkeypatch, capsys):
    mine = _folder(tmp_path / "mine", LINE)
    monkeypatch.chdir(tmp_path)
    args = ["import", str(mine), "--raw", str(tmp_path / "raw"), "--no-dvc", "--set", "data.ok_class=goood"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set data.ok_class=goood: not a class of ") and "\n" not in err
    assert err.endswith("the closest is 'good': --set data.ok_class=good") and "params.yaml" not in err


def test_a_class_too_small_for_the_split_stops_the_import_naming_it(tmp_path: Path) -> None:
    mine = _folder(tmp_path / "mine", {"good": 30, "dent": 2, "stain": 4, "scratch": 5})
    with pytest.raises(DataError) as e:
        import_images(mine, _params(tmp_path / "raw", ok_class="good"), dvc=False)
    assert str(e.value).startswith(f"import {mine}: class 'dent' has 2 image(s), class 'stain' has 4 image(s); the "
                                   "split needs at least 5 (1 to train and data.min_per_class=2 each")  # fmt: skip
    assert not (tmp_path / "raw").exists()
    # the count mode draws its own numbers: no per-class minimum at import
    assert import_images(mine, _params(tmp_path / "raw", ok_class="good", split=None), dvc=False)["files"] == 41


def test_every_corrupt_file_is_named_in_one_line(tmp_path: Path) -> None:
    mine = _folder(tmp_path / "mine", {"good": 8, "dent": 8})
    for name in ("a.png", "b.jpg", "c.tif"):
        (mine / "dent" / name).write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"^3 files are not images: ") as e:
        import_images(mine, _params(tmp_path / "raw", ok_class="good"), dvc=False)
    assert all(f"dent/{n}: not an image" in str(e.value) for n in ("a.png", "b.jpg", "c.tif"))
    for i in range(7):
        (mine / "dent" / f"x{i}.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"^10 files are not images: .* and 5 more; remove or replace them$"):
        import_images(mine, _params(tmp_path / "raw", ok_class="good"), dvc=False)
