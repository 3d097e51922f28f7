"""`sensitune import DIR`: a user's images become the DVC-tracked raw data that `dvc repro` depends on.

The pipeline reads one input, ``paths.raw`` (data/raw), versioned by ``data/raw.dvc``. Importing copies (or
hard-links) an ImageFolder (``DIR/<class>/<images>``, any depth below the class, PNG/JPEG/BMP/TIFF/WebP, 8 or
16 bit) into it and runs ``dvc add`` on it, so the new images are a new data version and ``dvc repro`` re-runs
prepare and everything after it. A second import adds a new batch; ``replace`` starts over.

The class names are checked against ``data.ok_class`` (a folder named good/ok/pass/normal is proposed), the safe
character set and the split's per-class minimum here already (prepare checks again), with the names found. A
paths.raw that holds another dataset's classes (the demo's, after `make run`) is not merged into without ``into``.
Nothing outside DIR is imported: a symlink that leaves it is refused, and every file must open as an image of its
kind (its header is read, not the pixels); every file that does not is named at once.
"""

from __future__ import annotations

import difflib
import filecmp
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from spt_core.api import IMAGE_SUFFIXES, check_class_sizes
from spt_core.portable.errors import DataError, check_class_name, few

from .config import Params
from .layout import dvc_root

IMPORT_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP")  # what IMAGE_SUFFIXES name, as Pillow calls them
GOOD_NAMES = ("good", "ok", "pass", "normal")  # folder names that say "the good class" (case-insensitive)


def _inside(path: Path, source: Path) -> None:
    """Refuse `path` when it (or a link on the way) leads out of `source` (resolved already)."""
    real = path.resolve()
    if real != source and source not in real.parents:
        raise DataError(f"{path}: a link to {real}, outside {source}; copy the file into the folder or remove the link")


def _image_problem(path: Path) -> str | None:
    """Why a file does not open as one of `IMPORT_FORMATS` (only its header is read); None when it does."""
    try:
        with Image.open(path) as im:
            kind = im.format
    except Exception as e:
        return f"{path}: not an image ({' '.join(str(e).split())[:100]})"
    return None if kind in IMPORT_FORMATS else f"{path}: a {kind} file, not {'/'.join(IMPORT_FORMATS)}"


def _check_images(files: list[Path]) -> None:
    """Refuse the import when any file is not an image, naming them all (a bounded list) in one line."""
    bad = [why for why in map(_image_problem, files) if why]
    if len(bad) == 1:
        raise DataError(f"{bad[0]}; remove it or replace it")
    if bad:
        raise DataError(f"{len(bad)} files are not images: {few(bad)}; remove or replace them")


def good_class_guess(ok: str, classes: list[str]) -> str | None:
    """The class `ok` most likely meant: the closest name (case-insensitive; "goood" -> "good"), else a folder
    named like a good class (`GOOD_NAMES`: "Good", "PASS"), else None."""
    lower = {c.lower(): c for c in classes}
    close = difflib.get_close_matches(ok.lower(), list(lower), n=1)
    return lower[close[0]] if close else next((c for c in classes if c.lower() in GOOD_NAMES), None)


def _check_ok_class(ok: str, classes: list[str], source: Path, ok_flag: bool) -> None:
    """A one-line error for a good class that is not among `classes`: naming the flag when ``--set`` gave it, else
    params.yaml, and the class it most likely is (`good_class_guess`)."""
    guess = good_class_guess(ok, classes)
    if ok_flag:
        fix = f"the closest is {guess!r}: --set data.ok_class={guess}" if guess else "give one of them"
        raise DataError(f"--set data.ok_class={ok}: not a class of {source}; found {classes}: {fix}")
    fix = "set data.ok_class in params.yaml to the good class's folder name"
    if guess:
        fix = f"did you mean --set data.ok_class={guess}? (and ok_class: {guess} in params.yaml, which dvc repro reads)"
    raise DataError(f"data.ok_class={ok!r} is not a class of {source}; found {classes}: {fix}")


def class_folders(root: Path) -> dict[str, int]:
    """The class folders of an ImageFolder and their image files (none when `root` does not exist)."""
    if not root.is_dir():
        return {}
    dirs = (d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    counts = {d.name: sum(1 for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES) for d in dirs}
    return {c: n for c, n in sorted(counts.items()) if n}


def import_images(
    source: Path, params: Params, *, replace: bool = False, into: bool = False, link: bool = False, dvc: bool = True,
    ok_flag: bool = False,
) -> dict:
    """Copy (or link) ``source``'s ImageFolder into ``paths.raw``; ``dvc add`` it when inside a DVC repository.

    Args:
        replace: Start paths.raw over with these images.
        into: Add classes that paths.raw does not hold yet to the ones it does (without it, paths.raw holding other
            class folders, e.g. the demo's, is refused: a merge of two datasets is never silent).
        ok_flag: ``data.ok_class`` came from ``--set``: a wrong one is named as that flag, not as params.yaml.

    Returns:
        {"raw", "files", "classes", "dvc": the command's output or None, "next": what to run next}.

    Raises:
        DataError: not an ImageFolder, files that are not images, an ok_class that is not among its classes, paths.raw
            holding other classes (without ``into`` or ``replace``), a class below the split's minimum, a file that
            already exists in paths.raw with other content (without ``replace``), or a failed ``dvc add``.
    """
    source, raw = Path(source).resolve(), Path(params["paths"]["raw"]).resolve()
    if not source.is_dir():
        raise DataError(f"{source}: not a directory; give an ImageFolder DIR/<class>/<images>")
    if raw == source or raw in source.parents or source in raw.parents:
        raise DataError(f"{source} and paths.raw={raw} overlap; import from a folder outside the raw data")
    classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    for c in classes:
        _inside(source / c, source)
    files = {
        c: sorted(f for f in (source / c).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        for c in classes
    }
    classes = [c for c in classes if files[c]]
    for c in classes:
        check_class_name(c, str(source / c))
        for f in files[c]:
            _inside(f, source)
    _check_images([f for c in classes for f in files[c]])
    if len(classes) < 2:
        raise DataError(f"{source}: found {len(classes)} class folder(s) with images {classes}; need DIR/<class>/ x2+")
    held = {} if replace else class_folders(raw)
    ok = params["data"]["ok_class"]
    if ok is not None and ok not in classes and ok not in held:
        _check_ok_class(ok, classes, source, ok_flag)
    if held and not into and (new := [c for c in classes if c not in held]):
        raise DataError(
            f"paths.raw={raw} already holds the classes {sorted(held)} (another dataset, e.g. the demo's) and "
            f"{source} adds {new}: pass --replace to start the raw data over with these images, or --into to add them"
        )
    plan = [(f, raw / c / f.relative_to(source / c)) for c in classes for f in files[c]]
    if params["data"]["split"] is not None:  # proportional: every class needs its validation and test images
        added = Counter(d.relative_to(raw).parts[0] for _, d in plan if replace or not d.exists())
        after = {c: held.get(c, 0) + added[c] for c in classes}
        check_class_sizes(after, params["data"]["split"], params["data"]["min_per_class"], f"import {source}")
    if replace and raw.exists():
        shutil.rmtree(raw)
    clash = [str(d) for f, d in plan if d.exists() and not filecmp.cmp(f, d, shallow=False)]
    if clash:
        raise DataError(
            f"{len(clash)} file(s) already in {raw} with other content, e.g. {clash[0]}: rename the new batch's files "
            "or pass --replace to start the raw data over"
        )
    n = 0
    for f, d in plan:
        if d.exists():
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(f, d)
            except OSError:  # another file system: copy instead
                shutil.copy2(f, d)
        else:
            shutil.copy2(f, d)
        n += 1
    out: dict[str, Any] = {"raw": str(raw), "files": n, "classes": classes, "dvc": None}
    if dvc and dvc_root(raw.parent) is not None:
        out["dvc"] = version_raw(raw)
        out["next"] = f"versioned by {raw.name}.dvc (git add it); run `dvc repro`"
    else:
        out["next"] = "run `sensitune run` (or `dvc add` the folder inside a DVC repository, then `dvc repro`)"
    return out


def version_raw(raw: Path) -> str:
    """`dvc add` the raw folder in its DVC repository (a new data version); returns the command that ran."""
    raw = Path(raw).resolve()
    root = dvc_root(raw.parent)
    if root is None:
        raise DataError(f"{raw}: not inside a DVC repository (no .dvc/ above it); run `dvc init` there first")
    # this interpreter's DVC (a dependency of sensitune): found even when the venv is not activated
    r = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", str(raw.relative_to(root))], cwd=root,
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        raise DataError(f"dvc add {raw} failed: {' '.join((r.stderr or r.stdout).split())[:300]}")
    return f"dvc add {raw.relative_to(root)}"
