"""How each precision is built from the exported ONNX file: one function per `Precision.build` of
`deploy.edge.precision`, looked up in ``BUILDERS``.

Every builder takes the ONNX file, the artifact directory to create (it must not exist; it is built in a temp dir
beside it and renamed into place, so a reader never sees a half-built one), the precision's row and the
calibration tensors, and returns the model file a runtime opens. Adding a precision: a row in
`deploy.edge.precision`, and here its function and its ``BUILDERS`` entry.

Two places silently change precision, and both are pinned here (docs/mlops-notes.md, "Export and the edge"):
``openvino.save_model`` stores FP16 weights unless ``compress_to_fp16=False``, and the CPU plugin computes in
bf16 on CPUs with native bf16 (AVX512-BF16, AMX) unless ``INFERENCE_PRECISION_HINT=f32`` (the row's
``runtime_config``, stored in every manifest so the edge compiles exactly as verification did).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import openvino as ov

from deploy.compile.quantize import QuantizeError, calibration_items, quantize
from deploy.edge.artifact import INPUT_NAME
from deploy.edge.precision import PRECISIONS, Precision, weights_of
from spt_core.portable.errors import SensituneError, one_line
from spt_core.portable.io import umask


class ExportError(SensituneError):
    """An export step that fails or is given bad arguments (sealing and loading raise `ArtifactError`)."""


def compile_openvino(
    onnx_path: str | Path,
    out_dir: str | Path,
    precision: str,
    *,
    calibration: Iterable[np.ndarray] | None = None,
    subset_size: int = 300,
    model_type: str | None = None,
    fast_bias_correction: bool = False,
    quantizer: Callable[[ov.Model, list[np.ndarray]], ov.Model] | None = None,
) -> Path:
    """Convert an ONNX file to OpenVINO IR (``out_dir/model.xml`` + ``model.bin``) in one precision.

    fp32 stores FP32 weights (checked after saving), fp16 stores FP16 weights, int8 runs NNCF post-training
    quantization on the FP32 model and stores the rest of its weights in FP32.

    Args:
        onnx_path: Output of `deploy.compile.export.export_onnx`.
        out_dir: Artifact directory; must not exist (built in a temp dir beside it, then renamed).
        precision: The stored weights: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        calibration: int8 only: preprocessed images, each (3, H, W) or (1, 3, H, W) float32. Fed to NNCF one image
            per item, because NNCF's ``subset_size`` counts dataset items.
        subset_size: int8 only: calibration images used (the first ``subset_size``); ~300 is NNCF's usual size.
        model_type: int8 only: ``"transformer"`` for ViTs (NNCF keeps softmax/LayerNorm paths accurate), else None.
        fast_bias_correction: int8 only: False runs NNCF's full bias correction, which costs seconds and recovers
            most of the loss of depthwise-conv nets such as Lite0.
        quantizer: int8 only: (FP32 model, calibration tensors) -> quantized model, in place of plain `quantize`
            (`deploy.compile.recovery` passes its retries here, so that they are converted and stored alike).

    Returns:
        ``out_dir``.

    Raises:
        ExportError: Unknown precision, missing calibration for int8, existing ``out_dir``, conversion failure.
        QuantizeError: Calibration images of the wrong shape, unknown ``model_type``, NNCF failure.
    """
    if precision not in (ir := weights_of("openvino")):
        raise ExportError(f"precision={precision!r}: use one of {', '.join(ir)}")
    out_dir = Path(out_dir)
    refuse_existing(out_dir)
    try:
        ov_model = ov.convert_model(str(onnx_path))
    except Exception as e:
        raise ExportError(f"OpenVINO cannot convert {onnx_path} ({one_line(e)}): re-run export_onnx") from e
    if precision == "int8":
        items = calibration_items(calibration or [], subset_size)
        if not items:
            raise ExportError(f"int8 export to {out_dir} needs calibration images: pass a non-empty calibration")
        if quantizer is None:
            ov_model = quantize(ov_model, items, model_type, fast_bias_correction)
        else:
            ov_model = quantizer(ov_model, items)
    with staging_dir(out_dir) as tmp:
        ov.save_model(ov_model, tmp / "model.xml", compress_to_fp16=(precision == "fp16"))
        if precision == "fp32" and (n16 := ir_weight_types(tmp / "model.xml").get("f16", 0)):
            raise ExportError(f"{out_dir}: FP32 IR holds {n16} f16 constants; check openvino.save_model arguments")
    return out_dir


def ir_weight_types(xml_path: str | Path) -> Counter[str]:
    """Count the element types of the floating-point Constant nodes in an IR (``{"f32": 95}`` for FP32)."""
    model = ov.Core().read_model(str(xml_path))
    types = (op.get_output_element_type(0) for op in model.get_ops() if op.get_type_name() == "Constant")
    return Counter(t.get_type_name() for t in types if t.is_real())


def quantize_onnx_int8(onnx_path: str | Path, out_dir: str | Path, calibration: Sequence[np.ndarray]) -> Path:
    """ONNX Runtime static INT8: ``out_dir/model.onnx`` with QDQ nodes around every quantizable op.

    Weights per output channel (symmetric int8), activations per tensor (int8, MinMax ranges over ``calibration``,
    the same tensors OpenVINO INT8 is calibrated on). ORT's pre-processing (shape inference, graph optimisation)
    runs first, as its documentation asks: without it some Conv+Add pairs stay unfused and lose accuracy.

    Raises:
        ExportError: Existing ``out_dir`` or no calibration images.
        QuantizeError: Calibration tensors of the wrong shape, or onnxruntime cannot quantize the graph.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_dir = Path(out_dir)
    items = calibration_items(calibration, len(calibration))
    if not items:
        raise ExportError(f"int8 export to {out_dir} needs calibration images: pass a non-empty calibration")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(items)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else {INPUT_NAME: x}

    with staging_dir(out_dir) as tmp:
        try:
            quant_pre_process(str(onnx_path), str(tmp / "pre.onnx"), skip_symbolic_shape=True)
            quantize_static(
                str(tmp / "pre.onnx"), str(tmp / "model.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )  # fmt: skip
        except Exception as e:  # ORT raises many types; all mean "this graph does not quantize"
            raise QuantizeError(f"ONNX Runtime INT8 quantization of {onnx_path} failed ({one_line(e)})") from e
        (tmp / "pre.onnx").unlink()
    return out_dir / "model.onnx"


def _build_openvino(onnx_path: Path, out_dir: Path, row: Precision, calibration: Sequence[np.ndarray],
                    model_type: str | None) -> Path:  # fmt: skip
    kw = dict(calibration=calibration, subset_size=len(calibration), model_type=model_type)
    return compile_openvino(onnx_path, out_dir, row.weights, **kw) / "model.xml"


def _build_onnxruntime_int8(onnx_path: Path, out_dir: Path, row: Precision, calibration: Sequence[np.ndarray],
                            model_type: str | None) -> Path:  # fmt: skip
    return quantize_onnx_int8(onnx_path, out_dir, calibration)


Builder = Callable[[Path, Path, Precision, Sequence[np.ndarray], "str | None"], Path]
BUILDERS: dict[str, Builder] = {"openvino": _build_openvino, "onnxruntime_int8": _build_onnxruntime_int8}


def build(
    name: str, onnx_path: Path, out_dir: Path, calibration: Sequence[np.ndarray], model_type: str | None = None
) -> Path:
    """Build precision `name` from the ONNX file into `out_dir`; returns the model file a runtime opens.

    Raises:
        ExportError: A precision with no builder, or a failing build.
    """
    row = PRECISIONS[name]
    if row.build not in BUILDERS:
        raise ExportError(f"precision {name}: no builder {row.build!r} in deploy.compile.build.BUILDERS; add one")
    return BUILDERS[row.build](onnx_path, out_dir, row, calibration, model_type)


def refuse_existing(target: Path) -> None:
    if target.exists():
        raise ExportError(f"{target} already exists: versions are immutable; export to a new model_version directory")


@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; on success rename it to ``target`` (which must not exist)."""
    refuse_existing(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; artifacts are served and copied by other users
    try:
        yield tmp
        refuse_existing(target)  # again: another export may have finished meanwhile
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
