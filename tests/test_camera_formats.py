"""Issue 33: a Mono12 camera (12-bit values in 16-bit PNG and TIFF files) end to end through the one conversion
(`spt_core.portable.preprocess`): prepare measures or checks the bit depth and records it, the edge serves the same
TIFF frames training read, and the operator pages show a frame as the model sees it.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile
from support.artifacts import N_FEATURES, build_artifact, reference_logits
from support.edge import STORE, EdgeWorld, png, post_frame, rollout
from support.servers import serve

from deploy.edge.limits import LimitError, Limits, open_image
from deploy.edge.service import EdgeService, create_app
from deploy.edge.ui.recent import thumbnail
from deploy.edge.ui.router import LineUI
from pipelines.cli import main
from spt_core.data.prepare import prepare
from spt_core.portable.errors import DataError
from spt_core.portable.metrics import softmax
from spt_core.portable.preprocess import Preprocess, infer_bit_depth

SPLIT = (0.6, 0.2, 0.2)


def _mono_line(root: Path, values: dict[str, int], fmt: str = "png", n: int = 5) -> Path:
    """An ImageFolder of flat 16-bit grey frames, one value per class (a Mono12 line: values up to 4095)."""
    for cls, v in values.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), v, np.uint16)).save(root / cls / f"{i}.{fmt}")
    return root


def _written(out: Path, cls: str) -> int:
    return int(np.asarray(Image.open(next((out / "train" / cls).glob("*.png"))))[0, 0, 0])


# ---------------------------------------------------------------------------------------- prepare: bit depth
def test_mono12_frames_are_read_as_12_bit_when_the_depth_is_null_and_it_is_recorded(tmp_path: Path) -> None:
    src = _mono_line(tmp_path / "src", {"good": 3000, "dent": 2048})
    info = prepare(str(src), tmp_path / "out", split=SPLIT, min_per_class=1, ok_class="good")
    assert (info.bit_depth, info.bit_depth_inferred, info.max_value) == (12, True, 3000)
    assert _written(tmp_path / "out", "dent") == round(2048 * 255 / 4095) == 128  # not 2048 / 65535: 8 of 255
    assert _written(tmp_path / "out", "good") == round(3000 * 255 / 4095)
    recorded = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert (recorded["bit_depth"], recorded["bit_depth_inferred"]) == (12, True)  # training copies it to the manifest


def test_the_inferred_depth_is_the_fewest_camera_bits_that_hold_the_values() -> None:
    assert [infer_bit_depth(v) for v in (0, 1023, 1024, 4095, 4096, 16383, 65535, 70000)] == [
        10, 10, 12, 12, 14, 14, 16, 17]  # fmt: skip


def test_a_declared_depth_is_checked_against_the_values(tmp_path: Path) -> None:
    src = _mono_line(tmp_path / "src", {"good": 4000, "dent": 100}, fmt="tif")
    with pytest.raises(DataError, match=r"^data.bit_depth=16: every value is under 4096,.*; set data.bit_depth: 12 "):
        prepare(str(src), tmp_path / "out", split=SPLIT, min_per_class=1, ok_class="good", bit_depth=16)
    with pytest.raises(DataError, match=r"^data.bit_depth=10: values up to 4000 do not fit 10 bits .*good/0.tif"):
        prepare(str(src), tmp_path / "out", split=SPLIT, min_per_class=1, ok_class="good", bit_depth=10)
    info = prepare(str(src), tmp_path / "out", split=SPLIT, min_per_class=1, ok_class="good", bit_depth=12)
    assert (info.bit_depth, info.bit_depth_inferred, info.max_value) == (12, False, 4000)
    assert _written(tmp_path / "out", "dent") == round(100 * 255 / 4095)


def test_prepare_says_what_it_inferred_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    src = _mono_line(tmp_path / "src", {"ok": 4095, "dent": 10})
    monkeypatch.chdir(tmp_path)
    code = main(["prepare", "--raw", str(src), "--data", str(tmp_path / "out"), "--set", "data.min_per_class=1"])
    out = capsys.readouterr().out
    assert code == 0
    note = [line for line in out.splitlines() if line.startswith("note:")]
    assert note == ["note: 16-bit frames read as 12-bit (largest value 4095; data.bit_depth is null); set "
                    "data.bit_depth: 12 to pin it"]  # fmt: skip


def test_every_unreadable_file_is_named_and_skip_bad_is_a_clean_note(tmp_path: Path, monkeypatch, capsys) -> None:
    src = _mono_line(tmp_path / "src", {"ok": 4000, "dent": 10})
    good = (src / "ok" / "0.png").read_bytes()
    for i in range(3):  # truncated: the header reads, the pixels do not
        (src / "dent" / f"cut{i}.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"^3 unreadable image files: .*cut0.png, .*cut1.png, .*cut2.png \(the first"):
        prepare(str(src), tmp_path / "out", split=SPLIT, min_per_class=1, ok_class="ok")
    monkeypatch.chdir(tmp_path)
    args = ["prepare", "--raw", str(src), "--data", str(tmp_path / "out"), "--set", "data.min_per_class=1"]
    assert main([*args, "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "UserWarning" not in err and "warnings.warn" not in err
    assert [line for line in err.splitlines() if "skipped" in line] == [
        f"note: skipped 3 bad file(s) in {src}: " + ", ".join(str(src / "dent" / f"cut{i}.png") for i in range(3))]


# ------------------------------------------------------------------------------------------------- the edge
def _mono12(rgb_png: bytes) -> np.ndarray:
    """A camera frame as a Mono12 camera writes it: its grey scaled to 0..4095."""
    grey = np.asarray(Image.open(io.BytesIO(rgb_png)).convert("L"), np.float64)
    return np.rint(grey * 4095 / 255).astype(np.uint16)


@pytest.fixture(scope="module")
def mono12_world(edge_world: EdgeWorld, tmp_path_factory: pytest.TempPathFactory) -> tuple[EdgeWorld, Any, Any]:
    """The edge world with one more artifact, "12": a statistic model whose manifest says ``bit_depth: 12``."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, N_FEATURES)), rng.normal(size=4)
    pre = Preprocess(size=(40, 40), bit_depth=12)
    art = build_artifact(tmp_path_factory.mktemp("m12") / "v12", "12", w, b, 40, {"preprocess": pre.to_dict()})
    return dataclasses.replace(edge_world, art={"12": art}), w, b


def test_a_16bit_tiff_gets_the_same_answer_as_the_same_frame_as_16bit_png(mono12_world, tmp_path: Path) -> None:
    world, w, b = mono12_world
    frames = [_mono12(data) for data in world.images[:6]]
    expected = softmax(reference_logits(frames, Preprocess(size=(40, 40), bit_depth=12), w, b))
    as_16bit = softmax(reference_logits(frames, Preprocess(size=(40, 40)), w, b))
    assert np.abs(expected - as_16bit).max() > 0.05  # the bit depth matters to this model's answers
    with serve(create_app(rollout(tmp_path, world, "12", None), STORE)) as base:
        for k, frame in enumerate(frames):
            as_png = post_frame(base, png(Image.fromarray(frame)), "cam-a")
            as_tiff = post_frame(base, png(Image.fromarray(frame), "TIFF"), "cam-a")
            assert as_tiff.status_code == 200, as_tiff.text  # TIFF was refused: 415
            p, t = as_png.json(), as_tiff.json()
            assert (t["class"], t["score"]) == (p["class"], p["score"])
            assert t["class_index"] == int(expected[k].argmax())  # scaled by the manifest's 12 bits, as in training
            assert t["score"] == pytest.approx(float(expected[k].max()), abs=1e-4)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_tiff_is_bounded_before_decode_as_a_png_is(monkeypatch) -> None:
    bomb = io.BytesIO()
    Image.new("I;16", (12000, 12000)).save(bomb, "TIFF", compression="tiff_deflate")  # ~0.5 MB, 288 MB decoded
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: pytest.fail("decoded"))
    with pytest.raises(LimitError, match=r"^file: 12000x12000 = 144000000 pixels, over limits.max_pixels") as e:
        open_image(bomb.getvalue(), Limits())
    assert e.value.status == 413


def test_thumbnails_and_the_review_image_show_a_mono12_frame_as_the_model_sees_it(mono12_world, tmp_path) -> None:
    world = mono12_world[0]
    mid = png(Image.fromarray(np.full((64, 64), 2048, np.uint16)))  # Mono12 mid grey
    grey = lambda jpeg: int(np.asarray(Image.open(io.BytesIO(jpeg)).convert("L")).mean().round())  # noqa: E731
    assert abs(grey(thumbnail(mid, 32, bit_depth=12)) - 128) <= 2
    service = EdgeService(rollout(tmp_path, world, "12", None))
    try:
        ui = LineUI(service)
        status, body = service.predict(mid, "cam-a", None)  # the pages record its thumbnail from its decode
        assert status == 200, body
        ui.store = SimpleNamespace(get=lambda fid: None)  # not kept: the line view's thumbnail
        assert abs(grey(ui.image(body["frame_id"])) - 128) <= 2  # not 8 of 255 (or white)
        ui.store = SimpleNamespace(get=lambda fid: (None, mid))  # a kept frame: the Review page's large image
        assert abs(grey(ui.image(body["frame_id"])) - 128) <= 2
    finally:
        service.close()
