"""Loaders: a prepared split directory -> torch datasets and loaders, transformed exactly as the edge does."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from spt_core.data.prepare import load_dataset_info
from spt_core.data.sources import IMAGE_SUFFIXES, SPLITS
from spt_core.errors import DataError
from spt_core.preprocess import Preprocess, load_rgb


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
