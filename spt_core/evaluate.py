"""Evaluation: accuracy, loss, per-class recall/precision and the confusion matrix; predictions to CSV.

Everything here runs under ``torch.inference_mode`` with the model in eval mode, and puts every submodule
back into the mode it was in (a model training with BatchNorm statistics frozen has BN layers in eval mode
inside a model in train mode; ``model.train(was_training)`` would silently unfreeze them).
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spt_core.portable.errors import SensituneError


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(inputs, labels)`` from a loader batch: a tensor, or a tuple/list ``(x, y, *extra)``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], batch[1] if len(batch) > 1 else None
    raise SensituneError(f"loader batch of type {type(batch).__name__}: yield a tensor or a tuple (images, labels)")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, then restore each submodule's own training flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _device_or_models(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` when given, else where the model's first parameter lives (cpu for a parameter-free model)."""
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device | None = None,
    num_classes: int | None = None,
    *,
    amp_dtype: torch.dtype | None = None,
    sync: Callable[[list[torch.Tensor]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a classifier on a labelled loader.

    Args:
        model: Returns logits ``(N, C)``.
        loader: Yields ``(images, labels, *extra)`` batches.
        device: Where to run; defaults to the device of the model's first parameter.
        num_classes: Size of the confusion matrix; defaults to the number of logits.
        amp_dtype: Autocast dtype (e.g. ``torch.bfloat16`` on CUDA); ``None`` runs in full precision.
        sync: Sums tensors over processes in place (`spt_core.distributed.all_reduce_sum`) when each process
            evaluates its own shard of the split: the confusion matrix and loss sum become the whole split's.

    Returns:
        JSON-serialisable dict: ``accuracy``, ``loss`` (mean cross-entropy), ``n``, ``confusion``
        (``confusion[true][pred]`` counts), ``per_class_recall`` (= per-class accuracy) and
        ``per_class_precision`` (``None`` for a class with no true / no predicted samples).

    Raises:
        SensituneError: Empty loader, unlabelled batches, or a label outside ``[0, num_classes)``.
    """
    device = _device_or_models(model, device)
    confusion: torch.Tensor | None = None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    with eval_mode(model), torch.inference_mode():
        for batch in loader:
            x, y = split_batch(batch)
            if y is None:
                raise SensituneError("evaluate() got a batch without labels: pass a loader yielding (images, labels)")
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
            with _autocast(device, amp_dtype):
                logits = model(x)
            logits = logits.float()  # (B, C)
            c = num_classes or logits.shape[1]
            if confusion is None:
                confusion = torch.zeros(c, c, dtype=torch.int64, device=device)
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= c or logits.shape[1] != c:
                raise SensituneError(
                    f"label range [{lo}, {hi}] does not fit {logits.shape[1]} logits / num_classes={c}: "
                    "check the class list of the data against the model head"
                )
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            confusion += torch.bincount(y * c + logits.argmax(1), minlength=c * c).view(c, c)
        if sync is not None and confusion is not None:
            sync([confusion, loss_sum])
    if confusion is None or int(confusion.sum()) == 0:
        raise SensituneError("evaluate() got an empty loader: check the split has images")
    cm = confusion.cpu()
    n = int(cm.sum())
    diag, true_n, pred_n = cm.diagonal(), cm.sum(1), cm.sum(0)
    return {
        "accuracy": float(diag.sum()) / n,
        "loss": float(loss_sum) / n,
        "n": n,
        "confusion": cm.tolist(),
        "per_class_recall": [float(d) / int(t) if t else None for d, t in zip(diag, true_n)],
        "per_class_precision": [float(d) / int(p) if p else None for d, p in zip(diag, pred_n)],
    }


def collect(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device | None = None,
    *,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels (N,) int64, softmax probabilities (N, C) float32 and the mean cross-entropy of a labelled loader:
    what the defect metrics (`spt_core.portable.metrics`) and the threshold are computed from."""
    device = _device_or_models(model, device)
    labels, probs = [], []
    loss_sum, n = 0.0, 0
    with eval_mode(model), torch.inference_mode():
        for batch in loader:
            x, y = split_batch(batch)
            if y is None:
                raise SensituneError("collect() got a batch without labels: pass a loader yielding (images, labels)")
            with _autocast(device, amp_dtype):
                logits = model(x.to(device, non_blocking=True))
            logits, y = logits.float().cpu(), y.long().cpu()  # (B, C), (B,)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
            labels.append(y)
            probs.append(logits.softmax(1))
    if not n:
        raise SensituneError("collect() got an empty loader: check the split has images")
    return torch.cat(labels).numpy(), torch.cat(probs).numpy().astype(np.float32), loss_sum / n


def _input_batches(data: torch.Tensor | Iterable[Any], batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
    else:
        for batch in data:
            yield split_batch(batch)[0]


def predict(
    model: nn.Module,
    data: torch.Tensor | Iterable[Any],
    device: str | torch.device | None = None,
    *,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Class predictions and softmax probabilities.

    Args:
        model: Returns logits ``(N, C)``.
        data: An ``(N, 3, H, W)`` tensor (split into ``batch_size`` chunks) or a loader (labels ignored).
        device: Where to run; defaults to the model's device.
        batch_size: Chunk size when ``data`` is a tensor.

    Returns:
        ``preds`` int64 ``(N,)`` and ``probs`` float32 ``(N, C)``.
    """
    device = _device_or_models(model, device)
    preds, probs = [], []
    with eval_mode(model), torch.inference_mode():
        for x in _input_batches(data, batch_size):
            p = model(x.to(device)).float().softmax(1)  # (B, C)
            probs.append(p.cpu())
            preds.append(p.argmax(1).cpu())
    if not probs:
        raise SensituneError("predict() got no images: check the input tensor or loader is not empty")
    return torch.cat(preds).numpy().astype(np.int64), torch.cat(probs).numpy().astype(np.float32)


def write_predictions_csv(
    paths: Sequence[str | os.PathLike],
    preds: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    out_path: str | os.PathLike,
) -> Path:
    """Write one row per image: ``path, pred, pred_index, confidence, p_<class>...`` (atomically).

    Returns:
        The written path.

    Raises:
        SensituneError: When the lengths of ``paths``, ``preds``, ``probs`` or ``class_names`` disagree.
    """
    preds, probs = np.asarray(preds), np.asarray(probs)
    if not (len(paths) == len(preds) == len(probs)) or probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise SensituneError(
            f"write_predictions_csv: {len(paths)} paths, {len(preds)} preds, probs {probs.shape} and "
            f"{len(class_names)} class names disagree: pass one row per image and one column per class"
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "pred", "pred_index", "confidence", *(f"p_{c}" for c in class_names)])
            for path, k, row in zip(paths, preds, probs):
                w.writerow([str(path), class_names[int(k)], int(k), f"{row[int(k)]:.6f}", *(f"{v:.6f}" for v in row)])
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path
