"""Datasets: sources -> a prepared split directory -> loaders.

`sources` reads every input format into labelled items, `prepare` writes the one split layout (and
``dataset.json``) that everything downstream reads, `loaders` turns that layout into torch loaders.
"""

from spt_core.data.loaders import (
    Augment,
    BalancedSampler,
    ImageDataset,
    SeededSampler,
    class_weights,
    eval_transform,
    make_loaders,
    median_side,
    scan_split,
    train_transform,
)
from spt_core.data.prepare import DatasetInfo, check_class_sizes, data_hash, load_dataset_info, prepare
from spt_core.data.sources import (
    BUILTINS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    IMAGE_SUFFIXES,
    SPLITS,
    VTAB_LISTS,
)
from spt_core.demo import DEMO_CLASSES, generate_demo_defects

__all__ = [
    "Augment",
    "BalancedSampler",
    "check_class_sizes",
    "class_weights",
    "train_transform",
    "BUILTINS",
    "DEMO_CLASSES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "VTAB_LISTS",
    "DatasetInfo",
    "ImageDataset",
    "SeededSampler",
    "data_hash",
    "eval_transform",
    "generate_demo_defects",
    "load_dataset_info",
    "make_loaders",
    "median_side",
    "prepare",
    "scan_split",
]
