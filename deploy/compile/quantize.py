"""NNCF post-training INT8 quantization of an OpenVINO model, and the calibration set it is fed.

Used by `deploy.compile.export.compile_openvino` for ``precision="int8"``; the calibration fingerprint goes into the
INT8 manifest so that an artifact records exactly which tensors calibrated it. When plain post-training INT8 fails
its accuracy budget, `deploy.compile.recovery` rebuilds it by one of ``INT8_RECOVERY``: NNCF's accuracy control
(`quantize_accuracy_control`) or a fixed ignored scope (`edge_layers`, passed to `quantize`).

Torch is imported only where a torch model is inspected, so that the config can read ``INT8_RECOVERY`` torch-free.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from spt_core.portable.errors import SensituneError, one_line

if TYPE_CHECKING:
    from torch import nn

# How an INT8 build that fails its accuracy budget is retried (``export.int8_recovery``), the default first:
# "ignored_scope" keeps the stem and the classifier in float (one more quantization, no validation pass);
# "accuracy_control" puts back in float the quantizers that hurt validation agreement most (NNCF's ranking: one
# validation pass per quantized layer group, minutes for Lite0); "none" declares it not promotable. On Lite0
# (benchmarks/results/int8_recovery.md) ignored_scope recovered as much or more, at a fifth to a tenth of the cost.
INT8_RECOVERY = ("ignored_scope", "accuracy_control", "none")
# Accuracy control puts back at most this many layer groups in float. Each step costs a validation pass and each
# step back a re-ranking of every group (Lite0: ~60 passes), so unbounded it ran past 20 minutes on the shared 2-core
# box; a model that needs more float layers than this is better served in FP16.
AC_MAX_STEPS = 10
_WEIGHTED = ("Convolution", "GroupConvolution", "MatMul")
_PASS_THROUGH = ("Convert", "Reshape", "Transpose", "Multiply", "Subtract", "FakeQuantize")  # weight -> op
_RESHAPES = ("Reshape", "Squeeze", "Unsqueeze", "Transpose")  # move values, change none


class QuantizeError(SensituneError):
    """INT8 quantization that cannot run: bad calibration images, unknown model type, NNCF failure."""


def quantize(
    ov_model: Any,
    items: list[np.ndarray],
    model_type: str | None,
    fast_bias_correction: bool,
    ignored: Sequence[str] = (),
) -> Any:
    """NNCF INT8 post-training quantization of ``ov_model`` on ``items`` (each (1, 3, H, W) float32).

    Args:
        ov_model: An ``openvino.Model`` (FP32).
        items: Calibration tensors (`calibration_items`); all of them are used.
        model_type: ``"transformer"`` for ViTs (NNCF keeps softmax/LayerNorm paths accurate), else None.
        fast_bias_correction: False runs NNCF's full bias correction (seconds; recovers most of the loss of
            depthwise-conv nets such as Lite0).
        ignored: Names of ops of ``ov_model`` left in float (their input quantizers are not inserted).
    """
    import nncf  # slow import (~2 s), int8 only

    try:
        return nncf.quantize(
            ov_model,
            nncf.Dataset(items),
            subset_size=len(items),
            model_type=_nncf_type(model_type),
            fast_bias_correction=fast_bias_correction,
            ignored_scope=nncf.IgnoredScope(names=list(ignored)) if ignored else None,
        )
    except Exception as e:
        raise QuantizeError(f"NNCF INT8 quantization failed ({one_line(e)}): check the calibration images") from e


def quantize_accuracy_control(
    ov_model: Any,
    items: list[np.ndarray],
    validation: Sequence[np.ndarray],
    model_type: str | None,
    max_drop: float,
    runtime_config: Mapping[str, str],
    outcome: Callable[[np.ndarray], Hashable] | None = None,
) -> Any:
    """NNCF's accuracy-aware INT8: `quantize` (full bias correction), then the quantizers that cost most validation
    agreement are put back in float, one layer group at a time, until agreement is within ``max_drop`` points of 100.

    The metric is agreement with the FP32 model (% of validation images with the same ``outcome``), not accuracy: it
    needs no labels, and a model that agrees with FP32 on all but d % of the images is at most d points less
    accurate on them, so ``max_drop`` (the INT8 accuracy budget) is kept on validation. NNCF gives up when every
    group is in float or after ``AC_MAX_STEPS`` steps; the caller re-verifies.

    Args:
        ov_model: An ``openvino.Model`` (FP32).
        items: Calibration tensors (`calibration_items`).
        validation: Tensors the agreement is measured on, each (1, 3, H, W) float32; never the test split.
        model_type: As `quantize`.
        max_drop: Agreement points the result may lose (``DropType.ABSOLUTE``).
        runtime_config: How the FP32 reference is compiled (the row's f32 hint, as NNCF compiles its candidates).
        outcome: What must agree, from one image's (C,) logits; None: the top-1 class. A line passes (top-1, its
            accept/reject decision): on an imbalanced line accuracy barely moves when a few defects slip through.
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    if not validation:
        raise QuantizeError("accuracy control needs validation images: pass the validation split")
    see = outcome or (lambda logits: int(np.argmax(logits)))
    fp32 = ov.Core().compile_model(ov_model, "CPU", dict(runtime_config))
    pairs = [(x, see(fp32(x)[0][0])) for x in validation]  # (tensor (1, 3, H, W), FP32's outcome)

    def agreement(compiled: Any, data: Iterable[tuple[np.ndarray, Hashable]]) -> tuple[float, list[float]]:
        hits = [float(see(compiled(x)[0][0]) == ref) for x, ref in data]
        return 100.0 * float(np.mean(hits)), hits  # per-item values let NNCF rank layers on the disagreeing items

    try:
        return nncf.quantize_with_accuracy_control(
            ov_model,
            nncf.Dataset(items),
            nncf.Dataset(pairs),
            agreement,
            max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(items),
            model_type=_nncf_type(model_type),
            fast_bias_correction=False,
            # one worker: NNCF's pool forks a model copy per worker, which a shared 2-core box cannot afford
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=AC_MAX_STEPS, num_ranking_workers=1
            ),
        )
    except Exception as e:
        raise QuantizeError(f"NNCF accuracy-aware INT8 quantization failed ({one_line(e)})") from e


def edge_layers(ov_model: Any) -> list[str]:
    """The ops of the "ignored_scope" recovery: the first weighted layer (the stem, fed the raw input range) and
    every op after the second-to-last one (the classifier and its pooling, where a few logits decide).

    Weighted layers are convolutions and the MatMuls whose second input is a weight (attention's activation x
    activation MatMuls are not); Constant, Parameter and Result nodes are left out (NNCF's scope names layers).
    """
    ops = list(ov_model.get_ordered_ops())
    weighted = [i for i, op in enumerate(ops) if _is_weighted(op)]
    if len(weighted) < 2:
        return [ops[i].get_friendly_name() for i in weighted]
    tail = [op for op in ops[weighted[-2] + 1 :] if op.get_type_name() not in ("Constant", "Parameter", "Result")]
    return [ops[weighted[0]].get_friendly_name()] + [op.get_friendly_name() for op in tail]


def weighted_layers(ov_model: Any) -> list[str]:
    """Names of the weighted layers (convolutions, MatMuls by a weight), in graph order."""
    return [op.get_friendly_name() for op in ov_model.get_ordered_ops() if _is_weighted(op)]


def float_layers(ov_model: Any) -> list[str]:
    """Names of the weighted layers of a quantized model whose input is not quantized (left in float)."""
    return [op.get_friendly_name() for op in ov_model.get_ordered_ops() if _is_weighted(op) and not _fed_int8(op)]


def _fed_int8(op: Any) -> bool:
    node = op.input(0).get_source_output().get_node()
    while node.get_type_name() in _RESHAPES:  # NNCF quantizes a pooled vector before the flatten that feeds the head
        node = node.input(0).get_source_output().get_node()
    return node.get_type_name() == "FakeQuantize"


def _is_weighted(op: Any) -> bool:
    if op.get_type_name() not in _WEIGHTED:
        return False
    node = op.input(1).get_source_output().get_node()
    while node.get_type_name() in _PASS_THROUGH:  # weight -> Convert/Reshape/... -> op; activations end elsewhere
        node = node.input(0).get_source_output().get_node()
    return node.get_type_name() == "Constant"


def _nncf_type(model_type: str | None) -> Any:
    import nncf

    types = {None: None, "transformer": nncf.ModelType.TRANSFORMER}
    if model_type not in types:
        raise QuantizeError(f"model_type={model_type!r}: use 'transformer' (ViTs) or None (CNNs)")
    return types[model_type]


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
    from torch import nn

    is_vit = any(
        isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention") for m in model.modules()
    )
    return "transformer" if is_vit else None
