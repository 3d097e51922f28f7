"""Check exported artifacts against PyTorch on real images (the torch side of the parity gate).

`verify` runs PyTorch and every artifact through the one model runner (`deploy.compile.inferencer.open_inferencer`:
sealed directories are read with `load_artifact`, checksums verified, and compiled exactly as on the edge) on the
*same* preprocessed batches (`spt_core.portable.preprocess.preprocess_batch`, the edge's own function), so a
difference can only come from the exported graph, never from a second preprocessing path. What each precision must
meet is its row of `deploy.edge.precision`: exact ones match PyTorch's logits within ``parity_atol``, the others
lose at most ``max_drop`` accuracy points and, with the line's operating point (``decision``), let no more defective
parts through than PyTorch does at it on the same images: an INT8 model can keep its accuracy and still pass defects
that the float model rejects (the main job's once went from 0 to 2 escapes of 8 at an unchanged accuracy budget).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from deploy.compile.inferencer import TorchInferencer, open_inferencer
from deploy.edge.precision import PRECISIONS
from spt_core.portable.errors import SensituneError
from spt_core.portable.metrics import softmax
from spt_core.portable.operating_point import ACCEPT, OperatingPoint
from spt_core.portable.preprocess import Preprocess, preprocess_batch


class VerifyError(SensituneError):
    """Verification that cannot run: unknown artifact key, label count mismatch, logits of the wrong shape."""


def verify(
    model: nn.Module,
    artifacts: Mapping[str, str | Path],
    images: Sequence[Any],
    labels: Sequence[int],
    pre: Preprocess,
    *,
    max_drop: Mapping[str, float] | None = None,
    parity_atol: float = 1e-4,
    batch_size: int = 16,
    decision: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Compare exported artifacts with the PyTorch model on real images.

    Args:
        model: The PyTorch model that was exported (run in eval mode).
        artifacts: Precision name (a row of `deploy.edge.precision`: ``onnx``, ``fp32``, ...) -> its artifact dir or
            model file (a bare file is opened with its row's runtime config); any subset.
        images: Test images (paths, PIL images or HxW[x3] uint8 arrays).
        labels: Their class indices.
        pre: The preprocessing, applied once per batch and fed to every runtime.
        max_drop: Accuracy points a precision may lose against PyTorch, by name (``{"int8": 1.0}``); a name left
            out keeps its row's ``max_drop``.
        parity_atol: Max |logit difference| allowed for the exact precisions (ONNX, OpenVINO FP32).
        batch_size: Images per batch.
        decision: The line's operating point (``ok_class``, ``threshold``: `OperatingPoint.from_dict`), with
            `class_names`: each runner's escapes (defects it accepts) are counted, and a precision with an accuracy
            budget is promotable only if it escapes no more than PyTorch. None, or no ``ok_class``: accuracy alone.

    Returns:
        ``n_images``; per precision ``max_abs_diff``, ``correlation`` (Pearson of all logits with PyTorch's),
        ``agreement`` (% same top-1 as PyTorch), ``accuracy`` (%, incl. ``pytorch``), ``accuracy_drop``
        (points); ``parity_ok`` (the exact precisions within ``parity_atol``); for every row with an accuracy
        budget ``<name>_max_drop`` and ``<name>_ok`` (None when absent); with a ``decision``, ``defects`` and
        ``escapes`` per runner and ``<name>_escapes_ok`` (``<name>_ok`` then needs it too); ``promotable`` per
        precision, and ``passed`` (= ``parity_ok``: the export itself is correct).

    Raises:
        VerifyError: Unknown artifact key, label count mismatch, or logits of another shape than PyTorch's.
        ArtifactError: An artifact that cannot be trusted or loaded.
    """
    if unknown := sorted(set(artifacts) - set(PRECISIONS)):
        raise VerifyError(f"artifacts keys {unknown}: use {', '.join(PRECISIONS)}")
    if len(images) != len(labels) or not images:
        raise VerifyError(f"{len(images)} images, {len(labels)} labels: give one label per image (at least one)")
    if unknown := sorted(set(max_drop or {}) - set(PRECISIONS)):
        raise VerifyError(f"max_drop keys {unknown}: use {', '.join(PRECISIONS)}")
    runners = {"pytorch": TorchInferencer(model)}
    runners |= {name: open_inferencer(path, name) for name, path in artifacts.items()}
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    for i in range(0, len(images), batch_size):
        x = preprocess_batch(list(images[i : i + batch_size]), pre)  # (B, 3, H, W) float32, shared by all
        for name, inf in runners.items():
            chunks[name].append(inf.infer(x))
    logits = {k: np.concatenate(v) for k, v in chunks.items()}  # each (N, classes)
    ref, y = logits["pytorch"], np.asarray(labels)
    for name, out in logits.items():
        if out.shape != ref.shape:
            raise VerifyError(
                f"{name} artifact {artifacts[name]} gives logits {out.shape}, PyTorch {ref.shape}: re-export"
            )

    acc = {k: 100.0 * float(np.mean(v.argmax(1) == y)) for k, v in logits.items()}
    names = list(artifacts)
    report: dict[str, Any] = {
        "n_images": len(images),
        "parity_atol": parity_atol,
        "max_abs_diff": {f: float(np.abs(logits[f] - ref).max()) for f in names},
        "correlation": {f: float(np.corrcoef(logits[f].ravel(), ref.ravel())[0, 1]) for f in names},
        "agreement": {f: 100.0 * float(np.mean(logits[f].argmax(1) == ref.argmax(1))) for f in names},
        "accuracy": acc,
        "accuracy_drop": {f: acc["pytorch"] - acc[f] for f in names},
    }
    budgets = {r.name: (max_drop or {}).get(r.name, r.max_drop) for r in PRECISIONS.values() if not r.exact}
    report |= {f"{f}_max_drop": budget for f, budget in budgets.items()}
    report["parity_ok"] = all(report["max_abs_diff"][f] <= parity_atol for f in names if PRECISIONS[f].exact)
    for f, budget in budgets.items():
        report[f"{f}_ok"] = report["accuracy_drop"][f] <= budget if f in artifacts else None
    held = _escapes(logits, y, decision, class_names)
    if held is not None:
        report["defects"], report["escapes"] = held
        for f in budgets:
            report[f"{f}_escapes_ok"] = None
            if f in artifacts:  # within the accuracy budget is not enough: no more escapes than PyTorch either
                report[f"{f}_escapes_ok"] = report["escapes"][f] <= report["escapes"]["pytorch"]
                report[f"{f}_ok"] = report[f"{f}_ok"] and report[f"{f}_escapes_ok"]
    # Every artifact comes from the same ONNX graph: if that graph is wrong, none of them may ship.
    report["promotable"] = {
        f: report["parity_ok"]
        and (report["max_abs_diff"][f] <= parity_atol if PRECISIONS[f].exact else report[f"{f}_ok"])
        for f in names
    }
    report["passed"] = report["parity_ok"]
    return report


def _escapes(
    logits: Mapping[str, np.ndarray], y: np.ndarray, decision: Mapping[str, Any] | None,
    class_names: Sequence[str] | None,
) -> tuple[int, dict[str, int]] | None:  # fmt: skip
    """(defective images, {runner: defects it accepts}) at the line's operating point; None without a good class."""
    op = OperatingPoint.from_dict(decision)
    if op.ok_class is None or class_names is None:
        return None
    defect = y != op.index(class_names)
    accepted = {k: op.decisions(softmax(v), class_names) == ACCEPT for k, v in logits.items()}
    return int(defect.sum()), {k: int(np.sum(defect & a)) for k, a in accepted.items()}
