"""`sensitune init DIR`: what it writes (params.yaml with every key, dvc.yaml of the installed package), how the good
class is declared, and its refusals: one line, exit 2, nothing left behind. The whole verb through a shell, as the
README runs it, is tests/test_readme_recipe.py; a project it made through `dvc repro` to a box, tests/test_journey.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import config
from pipelines.cli import main
from pipelines.init import render_dvc_yaml, render_params
from pipelines.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def _folder(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 4095, (8, 8), dtype=np.uint16)).save(root / cls / f"{i}.tif")
    return root


def _refused(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_params_yaml_lists_every_key_with_its_help_and_reads_back_as_given(tmp_path: Path) -> None:
    params = config.load_params(None, {"data.ok_class": "Pass", "plan.budget": "0.5%", "model.input_size": None})
    text = render_params(params)
    (tmp_path / "params.yaml").write_text(text)
    assert config.load_params(tmp_path / "params.yaml") == params  # every type survives: lists, null, "0.5%", floats
    assert "  ok_class: Pass # the good class's name" in text
    assert sum(line.startswith("  ") for line in text.splitlines()) == len(config.keys())


def test_dvc_yaml_is_the_packages_pipeline_without_its_code() -> None:
    """The line project has no spt_core/ or pipelines/: its stages depend on their data and params only."""
    made, ours = yaml.safe_load(render_dvc_yaml()), yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert list(made["stages"]) == [s.name for s in STAGES]
    for name, st in made["stages"].items():
        assert st["cmd"] == ours["stages"][name]["cmd"] and st.get("params") == ours["stages"][name].get("params")
        assert (st.get("outs"), st.get("metrics")) == (
            ours["stages"][name].get("outs"),
            ours["stages"][name].get("metrics"),
        )
        assert st["deps"] == [d for d in ours["stages"][name]["deps"] if d.startswith("$")] and st["deps"], name
    assert made["plots"] == ours["plots"]


def test_a_folder_that_is_not_empty_is_refused_untouched(tmp_path: Path, capsys) -> None:
    (tmp_path / "line7").mkdir()
    (tmp_path / "line7" / "notes.txt").write_text("mine")
    err = _refused(capsys, ["init", str(tmp_path / "line7")])
    assert "exists and is not empty" in err and "give a new folder" in err
    assert [p.name for p in (tmp_path / "line7").iterdir()] == ["notes.txt"]


def test_a_folder_inside_a_dvc_project_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "clone" / ".dvc").mkdir(parents=True)  # the demo's clone
    err = _refused(capsys, ["init", str(tmp_path / "clone" / "line7")])
    assert "is inside the DVC project" in err and not (tmp_path / "clone" / "line7").exists()


def test_the_good_class_is_declared_not_guessed(tmp_path: Path, capsys) -> None:
    """With --from and no --ok-class, only a folder named like a good class is taken; else the user must say."""
    src = _folder(tmp_path / "mine", {"accept": 6, "dent": 6})
    err = _refused(capsys, ["init", str(tmp_path / "line7"), "--from", str(src)])
    assert "none is named good/ok/pass/normal: name the good class with --ok-class NAME" in err
    assert "['accept', 'dent']" in err and not (tmp_path / "line7").exists()
    two = _folder(tmp_path / "two", {"OK": 6, "pass": 6, "dent": 6})
    assert "several are (['OK', 'pass'])" in _refused(capsys, ["init", str(tmp_path / "l2"), "--from", str(two)])


def test_a_failed_import_leaves_no_project_behind(tmp_path: Path, capsys) -> None:
    """A wrong --ok-class stops at the import (before git and DVC run), and the folder the user made is empty again."""
    src = _folder(tmp_path / "mine", {"good": 6, "dent": 6})
    (tmp_path / "line7").mkdir()
    err = _refused(capsys, ["init", str(tmp_path / "line7"), "--from", str(src), "--ok-class", "goood"])
    assert "data.ok_class=goood: not a class of" in err and "the closest is 'good'" in err
    assert list((tmp_path / "line7").iterdir()) == []
    small = _folder(tmp_path / "small", {"good": 6, "dent": 2})  # dent cannot fill val and test
    err = _refused(capsys, ["init", str(tmp_path / "line8"), "--from", str(small)])
    assert "class 'dent' has 2 image(s)" in err and not (tmp_path / "line8").exists()
