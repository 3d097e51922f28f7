"""`sensitune import DIR`: a user's images become the DVC-tracked raw data that `dvc repro` depends on.

The pipeline reads one input, ``paths.raw`` (data/raw), versioned by ``data/raw.dvc``. Importing copies (or
hard-links) an ImageFolder (``DIR/<class>/<images>``, any depth below the class, PNG/JPEG/BMP/TIFF/WebP, 8 or
16 bit) into it and runs ``dvc add`` on it, so the new images are a new data version and ``dvc repro`` re-runs
prepare and everything after it. A second import adds a new batch; ``replace`` starts over.

The class names are checked against ``data.ok_class`` and the safe character set here already (prepare checks
again), with the names found. Nothing outside DIR is imported: a symlink that leaves it is refused, and every file
must open as an image of its kind (its header is read, not the pixels).
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from PIL import Image

from spt_core.api import IMAGE_SUFFIXES
from spt_core.portable.errors import DataError, check_class_name

from .config import Params
from .layout import dvc_root

IMPORT_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP")  # what IMAGE_SUFFIXES name, as Pillow calls them


def _inside(path: Path, source: Path) -> None:
    """Refuse `path` when it (or a link on the way) leads out of `source` (resolved already)."""
    real = path.resolve()
    if real != source and source not in real.parents:
        raise DataError(f"{path}: a link to {real}, outside {source}; copy the file into the folder or remove the link")


def _check_image(path: Path) -> None:
    """Refuse a file that does not open as one of `IMPORT_FORMATS` (only its header is read)."""
    try:
        with Image.open(path) as im:
            kind = im.format
    except Exception as e:
        raise DataError(f"{path}: not an image ({' '.join(str(e).split())[:100]}); remove it or replace it") from None
    if kind not in IMPORT_FORMATS:
        raise DataError(f"{path}: a {kind} file; give {'/'.join(IMPORT_FORMATS)} images, or remove it")


def import_images(source: Path, params: Params, *, replace: bool = False, link: bool = False, dvc: bool = True) -> dict:
    """Copy (or link) ``source``'s ImageFolder into ``paths.raw``; ``dvc add`` it when inside a DVC repository.

    Returns:
        {"raw", "files", "classes", "dvc": the command's output or None, "next": what to run next}.

    Raises:
        DataError: not an ImageFolder, an ok_class that is not among its classes, a file that already exists in
            paths.raw with other content (without ``replace``), or a failed ``dvc add``.
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
            _check_image(f)
    if len(classes) < 2:
        raise DataError(f"{source}: found {len(classes)} class folder(s) with images {classes}; need DIR/<class>/ x2+")
    ok = params["data"]["ok_class"]
    if ok is not None and ok not in classes and not (raw / ok).is_dir():
        raise DataError(
            f"data.ok_class={ok!r} is not a class of {source}; found {classes}: set data.ok_class in params.yaml to "
            "the good class's folder name"
        )
    if replace and raw.exists():
        shutil.rmtree(raw)
    plan = [(f, raw / c / f.relative_to(source / c)) for c in classes for f in files[c]]
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
    root = dvc_root(raw.parent) if dvc else None
    if root is not None:
        try:
            r = subprocess.run(["dvc", "add", "-q", str(raw.relative_to(root))], cwd=root, capture_output=True,
                               text=True)  # fmt: skip
        except FileNotFoundError:
            raise DataError(
                "dvc is not installed: install it, or pass --no-dvc and version the data yourself"
            ) from None
        if r.returncode != 0:
            raise DataError(f"dvc add {raw} failed: {' '.join((r.stderr or r.stdout).split())[:300]}")
        out["dvc"] = f"dvc add {raw.relative_to(root)}"
        out["next"] = f"versioned by {raw.name}.dvc (git add it); run `dvc repro`"
    else:
        out["next"] = "run `sensitune run` (or `dvc add` the folder inside a DVC repository, then `dvc repro`)"
    return out
