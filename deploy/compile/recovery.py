"""INT8 that fails its accuracy budget, retried once before it is declared not promotable (``export.int8_recovery``).

Plain post-training INT8 (`deploy.compile.quantize.quantize`) is judged by the export gate like every precision
(`deploy.compile.verify`: its accuracy drop on the eval images within the INT8 budget). Only when it fails does
`recover_int8` rebuild it, from the same ONNX file and calibration tensors, by one method of ``INT8_RECOVERY``, and
verify again; the rebuilt artifact replaces the first only when it passes, so a promotable INT8 costs nothing more.

Accuracy control measures on validation images, never on the eval (test) images: a validation tensor equal to an
eval tensor is dropped before NNCF sees it. The gate judges both tries on the eval images, as it judges every export;
both verdicts are recorded side by side in the INT8 manifest (``quantization``) and export_report.json
(``int8_recovery``).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploy.compile.build import ExportError, compile_openvino
from deploy.compile.quantize import (
    INT8_RECOVERY,
    QuantizeError,
    calibration_fingerprint,
    edge_layers,
    float_layers,
    quantize,
    quantize_accuracy_control,
)
from deploy.compile.verify import verify
from deploy.edge.precision import PRECISIONS, SOURCE
from spt_core.portable.metrics import softmax
from spt_core.portable.operating_point import OperatingPoint
from spt_core.portable.preprocess import Preprocess, preprocess_image

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

RECOVERABLE = "int8"  # the NNCF row; ONNX Runtime's onnx_int8 is built by ORT, which has no accuracy control here


def check_recovery(method: str) -> None:
    """Fail before any export work on an unknown ``int8_recovery``."""
    if method not in INT8_RECOVERY:
        raise ExportError(f"int8_recovery={method!r}: use one of {', '.join(INT8_RECOVERY)} (export.int8_recovery)")


def rebuild_int8(
    method: str,
    onnx_path: Path,
    out_dir: Path,
    calibration: Sequence[np.ndarray],
    validation: Sequence[np.ndarray],
    max_drop: float,
    model_type: str | None,
    outcome: Callable[[np.ndarray], Hashable] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Build the INT8 precision again by `method` into `out_dir` (must not exist); ``outcome`` as
    `deploy.compile.quantize.quantize_accuracy_control` (`line_outcome` for a line's model).

    Returns:
        (its ``model.xml``, what was done: ``ignored`` ops (ignored_scope), ``float_layers`` (weighted layers left
        unquantized), ``seconds``).
    """
    check_recovery(method)
    row, info = PRECISIONS[RECOVERABLE], {}

    def quantizer(ov_model: Any, items: list[np.ndarray]) -> Any:
        if method == "ignored_scope":
            info["ignored"] = edge_layers(ov_model)
            q = quantize(ov_model, items, model_type, False, ignored=info["ignored"])
        else:
            cfg = row.runtime_config
            q = quantize_accuracy_control(ov_model, items, validation, model_type, max_drop, cfg, outcome)
        info["float_layers"] = float_layers(q)
        return q

    t0 = time.perf_counter()
    kw = dict(calibration=calibration, subset_size=len(calibration), model_type=model_type, quantizer=quantizer)
    xml = compile_openvino(onnx_path, out_dir, row.weights, **kw) / "model.xml"
    return xml, info | {"seconds": round(time.perf_counter() - t0, 1)}


def recover_int8(
    model: nn.Module,
    artifacts: Mapping[str, Path],
    report: dict[str, Any],
    *,
    method: str,
    calibration: Sequence[np.ndarray],
    validation_images: Sequence[Any],
    eval_images: Sequence[Any],
    eval_labels: Sequence[int],
    pre: Preprocess,
    max_drop: Mapping[str, float] | None,
    model_type: str | None,
    class_names: Sequence[str],
    decision: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Retry INT8 by `method` when the gate refused it; the export's artifacts are changed only if the retry passes.

    Args:
        model: The PyTorch model verification compares with.
        artifacts: Precision name -> model file, as `deploy.compile.verify.verify` takes them (in the export's
            staging dir; the INT8 directory is replaced in place when the retry passes).
        report: `verify`'s report on `artifacts`.
        method: One of ``INT8_RECOVERY``.
        calibration: The calibration tensors plain INT8 was built with (reused: only the method changes).
        validation_images: Images accuracy control measures agreement on (the validation split).
        eval_images, eval_labels, pre, max_drop: As given to `verify` for `report`.
        model_type: As `deploy.compile.quantize.quantize`.
        class_names, decision: The model's classes and operating decision (as `export_all`): with a threshold,
            accuracy control keeps each validation image's accept/reject decision too (`line_outcome`).

    Returns:
        (the report that stands: `report`, or the retry's when it passed; the ``quantization`` record: ``method``
        that built the served INT8 (ptq, accuracy_control or ignored_scope), ``recovery``, ``tried``, and when tried
        the ``ptq`` and ``retry`` verdicts (accuracy drop, agreement, promotable) and what the retry changed).
    """
    record: dict[str, Any] = {"method": "ptq", "recovery": method, "tried": False}
    refused = RECOVERABLE in artifacts and report["parity_ok"] and not report["promotable"][RECOVERABLE]
    if not refused or method == "none":  # a wrong ONNX graph (parity) is no quantization problem
        return report, record
    validation = validation_tensors(validation_images, eval_images, pre) if method == "accuracy_control" else []
    if method == "accuracy_control" and not validation:
        log.warning("INT8 not promotable and no validation images for accuracy control: pass validation_images")
        return report, record | {"skipped": "no validation images apart from the eval images"}
    budget = (max_drop or {}).get(RECOVERABLE, PRECISIONS[RECOVERABLE].max_drop)
    target = artifacts[RECOVERABLE].parent
    staged = target.with_name(f".{target.name}-{method}")
    why = f"drop {report['accuracy_drop'][RECOVERABLE]:.2f} pt"
    if "escapes" in report:
        why += f", {report['escapes'][RECOVERABLE]} escapes vs PyTorch's {report['escapes']['pytorch']}"
    log.info("INT8 not promotable (%s): retrying with %s", why, method)
    args = (calibration, validation, budget, model_type, line_outcome(decision, class_names))
    try:
        xml, info = rebuild_int8(method, artifacts[SOURCE], staged, *args)
    except QuantizeError as e:  # a failed retry leaves plain INT8 refused; FP32 and FP16 still ship
        log.warning("INT8 %s retry failed: %s", method, e)
        return report, record | {"tried": True, "error": str(e)}
    retried = verify(model, {**artifacts, RECOVERABLE: xml}, eval_images, eval_labels, pre, max_drop=max_drop,
                     decision=decision, class_names=class_names)  # fmt: skip
    record |= {"tried": True, "ptq": _verdict(report), "retry": _verdict(retried), **info}
    if validation:
        record["validation"] = calibration_fingerprint(validation)
        record["agreement_on"] = "top-1 and accept/reject" if args[-1] else "top-1"
    if not retried["promotable"][RECOVERABLE]:
        shutil.rmtree(staged)
        return report, record
    shutil.rmtree(target)
    staged.rename(target)
    return retried, record | {"method": method}


def line_outcome(decision: Mapping[str, Any] | None, class_names: Sequence[str]) -> Callable | None:
    """(top-1, accept/reject at the threshold) of one image's logits, by the line's own rule
    (`OperatingPoint.decisions`); None without a threshold (plain classification: top-1 alone)."""
    op = OperatingPoint.from_dict(decision)
    if op.ok_class is None or op.threshold is None:
        return None
    return lambda logits: (int(np.argmax(logits)), str(op.decisions(softmax(logits)[None], class_names)[0]))


def validation_tensors(images: Sequence[Any], eval_images: Sequence[Any], pre: Preprocess) -> list[np.ndarray]:
    """The validation images preprocessed as (1, 3, H, W) float32, less any whose tensor equals an eval image's:
    the gate's images must not also steer the quantization it judges."""
    seen = {_digest(preprocess_image(x, pre)) for x in eval_images} if images else set()
    tensors = [preprocess_image(x, pre)[None] for x in images]
    kept = [t for t in tensors if _digest(t[0]) not in seen]
    if len(kept) < len(tensors):
        log.warning("%d validation images equal eval images: left out of INT8 recovery", len(tensors) - len(kept))
    return kept


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


def _verdict(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy_drop", "agreement", "promotable", "escapes")  # escapes: with the line's operating point
    return {k: report[k][RECOVERABLE] for k in keys if k in report}
