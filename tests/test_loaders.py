"""spt_core.data's loaders and transforms: the training order per epoch, val/test in file order, and the eval
transform equal to the edge's `preprocess_image` (the datasets: tests/test_data.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from spt_core.data import eval_transform, load_dataset_info, make_loaders, scan_split
from spt_core.portable.errors import DataError
from spt_core.portable.preprocess import Preprocess, preprocess_image


# ------------------------------------------------------------------------------------------------ transforms
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (101, 37)])
@pytest.mark.parametrize("image", ["coffee", "brick"])
def test_eval_transform_matches_preprocess_image(image: str, size: tuple[int, int]) -> None:
    arr = getattr(skimage.data, image)()
    pre = Preprocess(size=size, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    got = eval_transform(pre)(Image.fromarray(arr).convert("RGB"))
    want = preprocess_image(arr, pre)
    assert tuple(got.shape) == (3, *size)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ loaders
def _order(loader: torch.utils.data.DataLoader) -> list[Path]:
    return [loader.dataset.records[i][0] for i in loader.sampler]


def test_train_order_reproducible_per_epoch(tiny_digits: Path) -> None:
    pre = Preprocess(size=(16, 16))
    a, b = make_loaders(tiny_digits, pre, batch_size=8, seed=3), make_loaders(tiny_digits, pre, batch_size=8, seed=3)
    a["train"].sampler.set_epoch(2)
    b["train"].sampler.set_epoch(2)
    assert _order(a["train"]) == _order(b["train"])  # a resumed run at epoch 2 replays the same order
    x_a, y_a = next(iter(a["train"]))
    x_b, y_b = next(iter(b["train"]))
    assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b) and x_a.shape == (8, 3, 16, 16)
    first = _order(a["train"])
    a["train"].sampler.set_epoch(3)
    assert _order(a["train"]) != first and sorted(_order(a["train"])) == sorted(first)
    c = make_loaders(tiny_digits, pre, seed=4)
    c["train"].sampler.set_epoch(2)
    assert _order(c["train"]) != first


def test_val_and_test_loaders_in_file_order(tiny_digits: Path) -> None:
    pre = Preprocess(size=(8, 8))
    info = load_dataset_info(tiny_digits)
    loaders = make_loaders(tiny_digits, pre, batch_size=64)
    for split in ("val", "test"):
        labels = torch.cat([y for _, y in loaders[split]]).tolist()
        assert labels == [y for _, y in scan_split(tiny_digits / split, info.class_names)] == sorted(labels)
        x, _ = next(iter(loaders[split]))  # the loaders' images are the edge's preprocessing of the files
        p0 = scan_split(tiny_digits / split, info.class_names)[0][0]
        np.testing.assert_allclose(x[0].numpy(), preprocess_image(p0, pre), atol=1e-6)


def test_loaders_need_a_prepared_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset.json"):
        make_loaders(tmp_path, Preprocess())
    with pytest.raises(DataError, match="split dir"):
        scan_split(tmp_path / "train", ["a", "b"])
