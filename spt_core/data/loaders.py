"""Loaders: a prepared split directory -> torch datasets and loaders, transformed exactly as the edge does.

Training may add two things the edge never sees: timm's train-time augmentation (`Augment`: flips, a small
scale/aspect jitter, colour jitter; off for the VTAB-1k protocol) and a class-balanced sampler
(`BalancedSampler`, ``balance="sampler"``/``"both"``), so that a good class at 90 % does not fill every batch.
Validation and test always use `eval_transform`, the same numbers as `spt_core.portable.preprocess` on the edge.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from spt_core.data.prepare import load_dataset_info
from spt_core.data.sources import IMAGE_SUFFIXES, SPLITS
from spt_core.portable.errors import DataError
from spt_core.portable.metrics import BALANCE, resolve_balance
from spt_core.portable.preprocess import Preprocess, load_rgb


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


def median_side(data_dir: Path) -> int:
    """The median (the lower middle) shorter side in pixels of the training split's images, from the file headers."""
    info = load_dataset_info(data_dir)
    records = scan_split(Path(data_dir) / "train", info.class_names)
    if not records:
        raise DataError(f"{data_dir}/train has no images: prepare a training split before measuring its image side")
    sides = []
    for path, _ in records:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # what a bad header raises
            raise DataError(f"{path}: cannot read the image header ({e}); re-run `sensitune prepare`") from e
    return sorted(sides)[(len(sides) - 1) // 2]


class ImageDataset(Dataset):
    """(path, label) records -> (transformed image tensor, label)."""

    def __init__(self, records: Sequence[tuple[Path, int]], transform: Any) -> None:
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.records]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.records[i]
        try:
            return self.transform(load_rgb(path)), label
        except (OSError, DataError) as e:
            raise DataError(f"{path}: cannot read image ({e}); re-run prepare") from e


def eval_transform(pre: Preprocess) -> Any:
    """The timm transform equal to `spt_core.portable.preprocess.preprocess_image`: direct resize to (H, W), normalise.

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


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation through timm's `create_transform` (is_training=True); plain data.

    ``flip``: probability of a horizontal and (independently) a vertical flip (inspection surfaces have no up);
    ``scale``: the random-resized-crop area range, a small zoom/shift (ratio 3/4..4/3); ``color_jitter``: brightness,
    contrast and saturation jitter. No AutoAugment and no random erasing: a defect must never be erased.
    """

    flip: float = 0.5
    scale: tuple[float, float] = (0.85, 1.0)
    color_jitter: float = 0.1


def train_transform(pre: Preprocess, aug: Augment | None) -> Any:
    """`eval_transform` (aug None) or timm's augmenting train transform ending in the same normalisation."""
    if aug is None:
        return eval_transform(pre)
    import timm.data

    return timm.data.create_transform(
        input_size=(3, *pre.size),
        is_training=True,
        scale=tuple(aug.scale),
        ratio=(3 / 4, 4 / 3),
        hflip=aug.flip,
        vflip=aug.flip,
        color_jitter=aug.color_jitter,
        auto_augment=None,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
        re_prob=0.0,
    )


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Cross-entropy weights N / (K n_c) (sklearn's "balanced"): every class weighs as much in total; 0 if absent."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.int64), minlength=num_classes).double()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float()


class BalancedSampler(Sampler[int]):
    """N indices per epoch, the classes taking turns (c0, c1, ..., cK-1, c0, ...), each class walking through its
    own seeded permutation and starting over when it runs out: every batch holds each class about equally, small
    classes repeat, large ones are sub-sampled. On balanced data it is a permutation (no repeats). Seeded by
    ``seed + epoch`` like `SeededSampler`, so a resumed run replays it."""

    def __init__(self, labels: Sequence[int], seed: int = 0) -> None:
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.n, self.seed, self.epoch = len(self.labels), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        classes = torch.unique(self.labels).tolist()
        members = [torch.nonzero(self.labels == c).flatten() for c in classes]
        perms = [m[torch.randperm(len(m), generator=g)].tolist() for m in members]
        start = int(torch.randint(len(classes), (1,), generator=g)) if classes else 0
        out = []
        for i in range(start, start + self.n):
            turn, c = divmod(i, len(classes))  # class c's turn-th draw
            out.append(perms[c][turn % len(perms[c])])
        return iter(out)

    def __len__(self) -> int:
        return self.n


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
    data_dir: Path,
    pre: Preprocess,
    *,
    batch_size: int = 32,
    seed: int = 0,
    num_workers: int = 0,
    balance: str = "none",
    augment: Augment | None = None,
) -> dict[str, DataLoader]:
    """Loaders ``train`` (shuffled by a `SeededSampler`, or a `BalancedSampler` for ``balance`` sampler/both, and
    auto on an imbalanced split;
    ``loader.sampler.set_epoch(e)``; ``augment`` applies to it only), ``val``, ``test``."""
    if balance not in BALANCE:
        raise DataError(f"balance={balance!r}: use one of {', '.join(BALANCE)}")
    info = load_dataset_info(data_dir)
    loaders = {}
    for split in SPLITS:
        tf = train_transform(pre, augment) if split == "train" else eval_transform(pre)
        ds = ImageDataset(scan_split(Path(data_dir) / split, info.class_names), tf)
        sampler = None
        if split == "train":
            balanced = resolve_balance(balance, ds.labels) in ("sampler", "both") and len(ds)
            sampler = BalancedSampler(ds.labels, seed) if balanced else SeededSampler(len(ds), seed)
        loaders[split] = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    return loaders
