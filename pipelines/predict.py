"""`sensitune predict`: images -> CSV with class, P(good) and the decision at the model's threshold, on any artifact.

The model may be a merged ``model.safetensors`` or tuned-weights directory (PyTorch), or an export: the export
directory (its ``openvino/fp32``), any artifact directory of it or its ``model.xml`` / ``model.onnx``; those run
torch-free through `deploy.edge.inferencer`, as on the edge (`deploy.compile.inferencer.open_inferencer` opens
all). Every path reads images through `spt_core.portable.preprocess` (16-bit frames scaled by the model's
``bit_depth``; oversized images refused in one line) and decides through the model's
`spt_core.portable.operating_point.OperatingPoint`, so predict and the edge give the same answer.

A file that cannot be read is reported and skipped; the CSV holds the others; the caller exits non-zero when any
failed. An existing CSV is only replaced with ``force``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spt_core.api import IMAGE_SUFFIXES
from spt_core.portable.errors import DataError, ModelError, SensituneError
from spt_core.portable.io import atomic_path
from spt_core.portable.metrics import softmax
from spt_core.portable.preprocess import preprocess_image

if TYPE_CHECKING:
    from deploy.edge.inferencer import Inferencer

log = logging.getLogger(__name__)


def list_images(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory; pass image files or folders")
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, inputs))}")
    return files


def load_model(path: Path) -> tuple[Inferencer, str]:
    """The model at `path` through the one model runner (`deploy.compile.inferencer.open_inferencer`: an export dir,
    an artifact dir or its model file torch-free, merged weights or a tuned-weights dir in PyTorch), and a line
    naming it. Refused without a manifest or merged info: predict needs the class names and operating point."""
    from deploy.compile.inferencer import open_inferencer

    def read_torch(p: Path) -> tuple[Any, dict[str, Any]]:
        from .models import load_any  # torch is imported only for a PyTorch model

        return load_any(p)

    inf = open_inferencer(path, torch_loader=read_torch)
    if inf.card is None:
        raise ModelError(f"{path}: no manifest.json beside it; predict runs sealed artifacts from `sensitune export`")
    art = inf.artifact
    return inf, f"{art.format} {art.precision} artifact {art.dir}" if art is not None else f"PyTorch model {path}"


def predict_files(model_path: Path, inputs: list[Path], out_csv: Path, *, force: bool = False, batch: int = 32) -> dict:
    """Predict every image; write the CSV (atomically); return {"out", "n", "failed": [(file, reason)], "model"}.

    Raises:
        SensituneError: the output exists (without ``force``), no images, or an unusable model.
    """
    out_csv = Path(out_csv)
    if out_csv.exists() and not force:
        raise SensituneError(f"{out_csv} exists; pass --force to replace it or --out another file")
    files = list_images(inputs)
    inf, desc = load_model(model_path)
    names, pre, op = inf.card.class_names, inf.card.preprocess, inf.card.operating_point
    rows, failed = [], []
    for i in range(0, len(files), batch):
        xs, kept = [], []
        for f in files[i : i + batch]:
            try:
                xs.append(preprocess_image(f, pre))
                kept.append(f)
            except SensituneError as e:
                failed.append((str(f), str(e)))
                log.error("skipped %s", e)
        if not xs:
            continue
        z = inf.infer(np.stack(xs).astype(np.float32))  # (B, C)
        p = softmax(z)  # float64, as the edge decides
        for f, row in zip(kept, p):
            k = int(row.argmax())
            d = op.answer(row, names)
            good = "" if d["p_good"] is None else f"{d['p_good']:.6f}"
            rows.append([str(f), names[k], f"{row[k]:.6f}", good, d["decision"], *(f"{v:.6f}" for v in row)])
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_csv) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "class", "confidence", "P(good)", "decision",  # never a p_<class> column
                    *(f"p_{c}" for c in names)])  # fmt: skip
        w.writerows(rows)
    return {"out": str(out_csv), "n": len(rows), "failed": failed, "model": desc, **op.to_dict()}


def describe(result: dict) -> tuple[str, list[str]]:
    """The CLI's line about a predict run (stdout) and its error lines (stderr)."""
    rule = (f"reject when P({result['ok_class']}) < {result['threshold']:.4f}" if result["threshold"] is not None
            else "the argmax class decides")  # fmt: skip
    errors = [f"error: {reason}" for _, reason in result["failed"][:20]]
    if result["failed"]:
        total = result["n"] + len(result["failed"])
        errors.append(f"error: {len(result['failed'])} of {total} file(s) failed and were skipped (exit code 1)")
    return f"wrote {result['out']}: {result['n']} image(s) by {result['model']} ({rule})", errors
