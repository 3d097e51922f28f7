"""``model.input_size: auto``: the network's side from the prepared training images, resolved once and recorded."""

import json

import pytest
import yaml
from PIL import Image
from support.params import TINY

from pipelines import models
from pipelines.cli import build_parser, main, params_from_args
from pipelines.config import load_params
from spt_core.api import DatasetInfo, input_size_for, median_side
from spt_core.model import AUTO_SIZE_MAX, AUTO_SIZE_MIN, check_input_side, input_grid, patch_size
from spt_core.portable.errors import DataError, ModelError, SensituneError


@pytest.mark.parametrize(
    ("side", "want"),
    [(1, 64), (8, 64), (28, 64), (64, 64), (65, 96), (70, 96), (96, 96), (97, 128), (128, 128), (300, 128)],
)
def test_the_side_rounds_up_to_the_grid_within_the_bounds(side, want):
    assert input_size_for(side) == want
    assert (AUTO_SIZE_MIN, AUTO_SIZE_MAX) == (64, 128)


@pytest.mark.parametrize(
    ("side", "want"), [(8, 70), (28, 70), (70, 70), (71, 84), (96, 98), (99, 112), (126, 126), (127, 126), (300, 126)]
)
def test_a_patch_grid_keeps_the_side_on_whole_patches_inside_the_bounds(side, want):
    # a ViT/14: 96 px images train at 98 (7 x 7 patches), not at the 32 px grid's 96 (6 patches and 12 px unseen)
    assert input_size_for(side, 14) == want and want % 14 == 0


def test_the_grid_is_a_vits_patch_and_a_cnns_coarsest_stride():
    assert (patch_size("test_vit"), input_grid("test_vit")) == (16, 16)
    assert (patch_size("test_efficientnet"), input_grid("test_efficientnet")) == (None, 32)
    assert input_size_for(70, input_grid("test_vit")) == 80 and input_size_for(70, input_grid("resnet10t")) == 96


def test_a_side_a_vit_would_crop_is_refused_in_one_line_and_a_cnn_takes_any_side(tmp_path, monkeypatch, capsys):
    with pytest.raises(ModelError, match=r"input_size=40: test_vit sees whole 16 px patches.*last 8 px.*48 or 32"):
        check_input_side("test_vit", 40)
    check_input_side("test_vit", 48)
    check_input_side("test_efficientnet", 41)
    params = {**TINY, "model": {**TINY["model"], "input_size": 40}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    cfg = ["--config", "params.yaml", "-q"]
    assert main(["demo", *cfg]) == 0 and main(["prepare", *cfg]) == 0
    assert main(["measure", *cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "model.input_size=40" in err[-1] and "set model.input_size to 48 or 32" in err[-1]
    assert not (tmp_path / "runs" / "main" / "sensitivity.safetensors").exists()


def test_a_side_below_one_pixel_is_refused():
    with pytest.raises(ModelError, match="image side 0"):
        input_size_for(0)


def _data_dir(tmp_path, sizes_by_class):
    """A prepared layout by hand: dataset.json and train/<class>/<n>.png of the given (width, height)."""
    root = tmp_path / "prepared"
    for name, sizes in sizes_by_class.items():
        (root / "train" / name).mkdir(parents=True)
        for i, size in enumerate(sizes):
            Image.new("RGB", size).save(root / "train" / name / f"{i}.png")
    counts = {"train": {n: len(s) for n, s in sizes_by_class.items()}}
    DatasetInfo(list(sizes_by_class), counts, "by hand", 0, "x").save(root / "dataset.json")
    return root


def test_median_side_is_the_median_of_the_shorter_sides_of_the_training_images(tmp_path):
    # shorter sides 20, 50, 90, 96, 200 -> 90; the longer sides' median (96) or the mean (91.2) would differ
    root = _data_dir(tmp_path, {"a": [(20, 40), (96, 96), (100, 90)], "b": [(300, 200), (50, 50)]})
    (root / "val" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "val" / "a" / "0.png")  # other splits are not read
    assert median_side(root) == 90
    # an even count takes the lower middle: 20, 50, 90, 200 -> 50 (the mean of the middles, 70, or the upper, 90,
    # would give another network side: 96 instead of 64)
    even = _data_dir(tmp_path / "even", {"a": [(20, 40), (100, 90)], "b": [(300, 200), (50, 50)]})
    assert median_side(even) == 50 and input_size_for(median_side(even)) == 64


def test_median_side_names_an_unreadable_file_and_an_empty_split(tmp_path):
    root = _data_dir(tmp_path, {"a": [(10, 10)]})
    (root / "train" / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"1\.png: cannot read the image header"):
        median_side(root)
    empty = _data_dir(tmp_path / "e", {"a": []})
    with pytest.raises(DataError, match="has no images"):
        median_side(empty)


def test_auto_is_a_value_of_the_key_and_of_its_flag_but_other_text_is_not():
    assert load_params(None, {"model.input_size": "auto"})["model"]["input_size"] == "auto"
    for bad in ("big", 96.5, 96.0, 0, True):
        with pytest.raises(SensituneError, match=rf"model\.input_size={bad!r}.*: give the side in pixels|is not"):
            load_params(None, {"model.input_size": bad})
    for text, want in (("auto", "auto"), ("96", 96), ("none", None)):
        args = build_parser().parse_args(["measure", "--input-size", text])
        assert params_from_args(args)["model"]["input_size"] == want


def test_a_run_at_auto_trains_merges_and_records_the_side_of_its_images(tmp_path, monkeypatch):
    """70 px demo frames: auto resolves to 80 once, in measure, and every later stage reads the recorded 80, not 64
    and not the images again (a ViT of 16 px patches: its grid is the patch, so 70 rounds up to 80, not to a CNN's
    96; its position embeddings are resampled to the 5 x 5 grid)."""
    params = {**TINY, "demo": {**TINY["demo"], "size": 70}, "model": {**TINY["model"], "input_size": "auto"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    cfg = ["--config", "params.yaml", "-q"]
    for verb in ("demo", "prepare", "measure"):
        assert main([verb, *cfg]) == 0, verb

    def again(data_dir):
        raise AssertionError(f"{data_dir}: the side was resolved again after measure")

    monkeypatch.setattr(models, "median_side", again)
    for verb in ("plan", "train", "merge"):
        assert main([verb, *cfg]) == 0, verb
    run = tmp_path / "runs" / "main"
    plan = json.loads((run / "plan.json").read_text())
    assert plan["meta"]["model_args"]["img_size"] == 80
    assert plan["meta"]["model_info"]["preprocess"]["size"] == [80, 80]
    assert json.loads((run / "metrics.json").read_text())["input_size"] == 80
    merged = json.loads((run / "merged" / "merged.json").read_text())
    assert merged["preprocess"]["size"] == [80, 80] and merged["img_size"] == 80
    assert main(["predict", "data/prepared/test", "--out", "p.csv", *cfg]) == 0
