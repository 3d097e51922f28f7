"""NNCF post-training INT8 quantization of an OpenVINO model, and the calibration set it is fed.

Used by `deploy.compile.export.compile_openvino` for ``precision="int8"``; the calibration fingerprint goes into the
INT8 manifest so that an artifact records exactly which tensors calibrated it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from torch import nn

from spt_core.portable.errors import SensituneError, one_line


class QuantizeError(SensituneError):
    """INT8 quantization that cannot run: bad calibration images, unknown model type, NNCF failure."""


def quantize(ov_model: Any, items: list[np.ndarray], model_type: str | None, fast_bias_correction: bool) -> Any:
    """NNCF INT8 post-training quantization of ``ov_model`` on ``items`` (each (1, 3, H, W) float32).

    Args:
        ov_model: An ``openvino.Model`` (FP32).
        items: Calibration tensors (`calibration_items`); all of them are used.
        model_type: ``"transformer"`` for ViTs (NNCF keeps softmax/LayerNorm paths accurate), else None.
        fast_bias_correction: False runs NNCF's full bias correction (seconds; recovers most of the loss of
            depthwise-conv nets such as Lite0).
    """
    import nncf  # slow import (~2 s), int8 only

    types = {None: None, "transformer": nncf.ModelType.TRANSFORMER}
    if model_type not in types:
        raise QuantizeError(f"model_type={model_type!r}: use 'transformer' (ViTs) or None (CNNs)")
    try:
        return nncf.quantize(
            ov_model,
            nncf.Dataset(items),
            subset_size=len(items),
            model_type=types[model_type],
            fast_bias_correction=fast_bias_correction,
        )
    except Exception as e:
        raise QuantizeError(f"NNCF INT8 quantization failed ({one_line(e)}): check the calibration images") from e


def calibration_items(images: Iterable[np.ndarray], limit: int) -> list[np.ndarray]:
    """Up to ``limit`` preprocessed images as contiguous (1, 3, H, W) float32 arrays, in the given order."""
    items = []
    for x in images:
        if len(items) >= limit:
            break
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[:2] != (1, 3):
            raise QuantizeError(f"calibration item of shape {x.shape}: give preprocessed (3, H, W) arrays")
        items.append(np.ascontiguousarray(x))
    return items


def calibration_fingerprint(items: Sequence[np.ndarray]) -> dict[str, Any]:
    """``{"size", "sha256"}`` of the exact calibration tensors (shape + float32 bytes, in order)."""
    h = hashlib.sha256()
    for x in items:
        x = np.ascontiguousarray(x, dtype=np.float32)
        h.update(str(x.shape).encode())
        h.update(x.tobytes())
    return {"size": len(items), "sha256": h.hexdigest()}


def nncf_model_type(model: nn.Module) -> str | None:
    """``"transformer"`` for ViT-like models (attention blocks), else None; CNNs with SE/ECA gates are not."""
    is_vit = any(
        isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention") for m in model.modules()
    )
    return "transformer" if is_vit else None
