"""Tiny OpenVINO artifacts of a statistic model (not via deploy.compile.export), demo images, rollout manifests.

The models are deterministic functions of image statistics, so whoever uses them knows every answer exactly:
    features f(x) = per-channel mean and std, min, max, mean and max |horizontal / vertical gradient|
    of the normalised (3, H, W) input
    logits = f @ W.T + b
`reference_logits` computes the same in numpy from `spt_core.portable.preprocess`, the edge's own preprocessing.
Fitted by least squares to the demo defects (`fit_linear`) they give real, imperfect verdicts on real images in
seconds: the demo line of `benchmarks/ui_pages.py` (`benchmarks/demo_line.py`) and the edge tests
(tests/support/artifacts.py) are built from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from spt_core.portable.preprocess import Preprocess, preprocess_image

CLASSES = ["ok", "scratch", "spot", "crack"]


def features(x: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) -> (N, N_FEATURES), the same maths as `StatModel.forward` (std with Bessel's correction)."""
    n = len(x)
    gx, gy = np.abs(np.diff(x, axis=3)).reshape(n, -1), np.abs(np.diff(x, axis=2)).reshape(n, -1)
    flat = x.reshape(n, -1)
    cols = [x.mean(axis=(2, 3)), x.reshape(n, 3, -1).std(axis=2, ddof=1), flat.min(1), flat.max(1)]
    cols += [gx.mean(1), gy.mean(1), gx.max(1), gy.max(1)]
    return np.concatenate([c.reshape(n, -1) for c in cols], 1)


N_FEATURES = 12


def reference_logits(images: list[Any], pre: Preprocess, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = np.stack([preprocess_image(im, pre) for im in images]).astype(np.float64)
    return features(x) @ w.T + b


def fit_linear(images: list[Any], labels: list[int], pre: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """Least squares on one-hot targets: a weak but real classifier of the demo defects."""
    x = np.stack([preprocess_image(im, pre) for im in images]).astype(np.float64)
    f = np.concatenate([features(x), np.ones((len(x), 1))], 1)
    coef, *_ = np.linalg.lstsq(f, np.eye(len(CLASSES))[labels], rcond=None)  # (7, C)
    return coef[:-1].T.copy(), coef[-1].copy()


def build_artifact(
    out_dir: Path, version: str, w: np.ndarray, b: np.ndarray, size: int, extra: dict[str, Any] | None = None
) -> Path:
    """Convert a tiny torch model to OpenVINO IR (fp32) + manifest.json per docs/ARCHITECTURE.md, atomically.
    The manifest declares ``ok_class: ok``; ``extra`` adds keys (e.g. a ``threshold``)."""
    import openvino as ov
    import torch

    class StatModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.tensor(w, dtype=torch.float32))
            self.register_buffer("b", torch.tensor(b, dtype=torch.float32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, C)
            flat = x.flatten(1)
            gx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1)
            gy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1)
            cols = [x.mean(dim=(2, 3)), x.flatten(2).std(2), flat.amin(1, True), flat.amax(1, True)]
            cols += [gx.mean(1, True), gy.mean(1, True), gx.amax(1, True), gy.amax(1, True)]
            return torch.cat(cols, 1) @ self.w.T + self.b

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    om = ov.convert_model(
        StatModel().eval(), example_input=torch.zeros(1, 3, size, size), input=[ov.PartialShape([-1, 3, size, size])]
    )
    om.inputs[0].get_tensor().set_names({"input"})
    om.outputs[0].get_tensor().set_names({"logits"})
    ov.save_model(om, tmp / "model.xml", compress_to_fp16=False)
    digest = {n: hashlib.sha256((tmp / n).read_bytes()).hexdigest() for n in ("model.xml", "model.bin")}
    manifest = {
        "format": "openvino",
        "precision": "fp32",
        "model_version": version,
        "model_name": "stat-model",
        "class_names": CLASSES,
        "preprocess": Preprocess(size=(size, size)).to_dict(),
        "input_name": "input",
        "output_name": "logits",
        "runtime_config": {"INFERENCE_PRECISION_HINT": "f32"},
        "sensitune_version": "0.1.0",
        "plan_hash": "test",
        "data_version": "test",
        "files": digest,
        "created": "2026-01-01T00:00:00+00:00",
        "ok_class": "ok",
        **(extra or {}),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def demo_images(
    out_dir: Path, n_per_class: int, size: int, seed: int = 0, bit_depth: int | None = None
) -> list[tuple[Path, int]]:
    """Demo defect PNGs (ImageFolder ok/scratch/spot/crack from spt_core.data) -> [(path, class index)], sorted;
    ``bit_depth`` 10/12/16: single-channel 16-bit PNGs as a Mono10/12/16 camera sends them (8-bit RGB otherwise)."""
    from spt_core.api import generate_demo_defects

    root = Path(generate_demo_defects(out_dir, n_per_class=n_per_class, seed=seed, size=size, counts=None,
                                      bit_depth=bit_depth))  # fmt: skip
    items = [(p, CLASSES.index(p.parent.name)) for p in sorted(root.glob("*/*.png")) if p.parent.name in CLASSES]
    assert len(items) == n_per_class * len(CLASSES), f"expected {n_per_class} images per class in {root}"
    return items


def demo_set(
    out_dir: Path, n_per_class: int, size: int, bit_depth: int | None = None
) -> tuple[list[tuple[Path, int]], list[Any], list[int]]:
    """`demo_images`, plus the images opened (RGB; 16-bit grey as it is, for a preprocess with ``bit_depth``) and
    their class indices: (items, images, labels)."""
    from PIL import Image

    def opened(p: Path) -> Any:
        with Image.open(p) as im:
            return im.convert("RGB") if bit_depth is None else im.copy()

    items = demo_images(out_dir, n_per_class=n_per_class, size=size, bit_depth=bit_depth)
    return items, [opened(p) for p, _ in items], [c for _, c in items]


def write_manifest(path: Path, **fields: Any) -> Path:
    """A rollout manifest (YAML) with exactly these fields, in this order."""
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path
