"""`sensitune predict`: images -> CSV with class, P(good) and the decision at the model's threshold, on any artifact.

The model may be a merged ``model.safetensors`` or tuned-weights directory (PyTorch), or an export: the export
directory (its ``openvino/fp32``), an OpenVINO artifact directory or ``model.xml``, an ONNX ``model.onnx`` (or its
directory); those run torch-free through `deploy.edge.inferencer`, as on the edge. Every path reads images through
`spt_core.portable.preprocess` (16-bit frames scaled by the model's ``bit_depth``; oversized images refused in one line)
and
decides through `deploy.edge.artifact.decide`, so predict and the edge give the same answer.

A file that cannot be read is reported and skipped; the CSV holds the others; the caller exits non-zero when any
failed. An existing CSV is only replaced with ``force``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from spt_core.data import IMAGE_SUFFIXES
from spt_core.portable.errors import DataError, ModelError, SensituneError
from spt_core.portable.io import atomic_path
from spt_core.portable.preprocess import Preprocess, preprocess_image

log = logging.getLogger(__name__)
Logits = Callable[[np.ndarray], np.ndarray]  # (N, 3, H, W) float32 -> (N, C)


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


def artifact_dir(path: Path) -> Path | None:
    """The sealed artifact directory `path` names (export dir -> openvino/fp32 or its ONNX), or None (PyTorch)."""
    path = Path(path)
    if path.is_file() and path.name in ("model.xml", "model.onnx"):
        return path.parent
    if path.is_dir():
        for cand in (path / "openvino" / "fp32", path):
            if (cand / "manifest.json").is_file():
                return cand
    return None


def load_model(path: Path) -> tuple[Logits, dict[str, Any], str]:
    """(logits function, info with class_names, preprocess, ok_class, threshold, description) of any artifact."""
    adir = artifact_dir(path)
    if adir is not None:
        from deploy.edge.artifact import load_artifact
        from deploy.edge.inferencer import Inferencer, OnnxInferencer

        art = load_artifact(adir)
        inf = Inferencer.from_artifact(art) if art.format == "openvino" else OnnxInferencer(art)
        info = {"class_names": art.class_names, "preprocess": art.preprocess, "ok_class": art.ok_class,
                "threshold": art.threshold}  # fmt: skip
        return inf.infer, info, f"{art.format} {art.precision} artifact {adir}"
    if Path(path).suffix in (".xml", ".onnx", ".bin"):
        raise ModelError(f"{path}: no manifest.json beside it; predict runs sealed artifacts from `sensitune export`")
    import torch

    from .models import load_any

    model, raw = load_any(Path(path))

    def logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    info = {"class_names": raw["class_names"], "preprocess": Preprocess.from_dict(raw["preprocess"]),
            "ok_class": raw.get("ok_class"), "threshold": raw.get("threshold")}  # fmt: skip
    return logits, info, f"PyTorch model {path}"


def predict_files(model_path: Path, inputs: list[Path], out_csv: Path, *, force: bool = False, batch: int = 32) -> dict:
    """Predict every image; write the CSV (atomically); return {"out", "n", "failed": [(file, reason)], "model"}.

    Raises:
        SensituneError: the output exists (without ``force``), no images, or an unusable model.
    """
    from deploy.edge.artifact import decide

    out_csv = Path(out_csv)
    if out_csv.exists() and not force:
        raise SensituneError(f"{out_csv} exists; pass --force to replace it or --out another file")
    files = list_images(inputs)
    logits_of, info, desc = load_model(model_path)
    names, pre, ok, thr = info["class_names"], info["preprocess"], info["ok_class"], info["threshold"]
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
        z = logits_of(np.stack(xs).astype(np.float32))  # (B, C)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        for f, row in zip(kept, p):
            k = int(row.argmax())
            d = decide(row, names, ok, thr)
            good = "" if d["p_good"] is None else f"{d['p_good']:.6f}"
            rows.append([str(f), names[k], f"{row[k]:.6f}", good, d["decision"], *(f"{v:.6f}" for v in row)])
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_csv) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "class", "confidence", f"p_{ok}" if ok else "p_good", "decision",
                    *(f"p_{c}" for c in names)])  # fmt: skip
        w.writerows(rows)
    return {"out": str(out_csv), "n": len(rows), "failed": failed, "model": desc, "ok_class": ok, "threshold": thr}


def describe(result: dict) -> tuple[str, list[str]]:
    """The CLI's line about a predict run (stdout) and its error lines (stderr)."""
    rule = (f"reject when P({result['ok_class']}) < {result['threshold']:.4f}" if result["threshold"] is not None
            else "the argmax class decides")  # fmt: skip
    errors = [f"error: {reason}" for _, reason in result["failed"][:20]]
    if result["failed"]:
        total = result["n"] + len(result["failed"])
        errors.append(f"error: {len(result['failed'])} of {total} file(s) failed and were skipped (exit code 1)")
    return f"wrote {result['out']}: {result['n']} image(s) by {result['model']} ({rule})", errors
