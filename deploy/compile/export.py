"""Torch side of the edge: merged timm model -> ONNX -> OpenVINO IR (FP32 / FP16 / NNCF INT8) + manifest.

The manifest contract is `deploy.edge.artifact`, INT8 quantization `deploy.compile.quantize`, the parity gate
`deploy.compile.verify`.

Layout written by `export_all` (one immutable directory per model version)::

    out_dir/                     e.g. exports/3/
      model.onnx  manifest.json  ONNX artifact (format "onnx", fp32)
      openvino/fp32/  openvino/fp16/  openvino/int8/   each: model.xml, model.bin, manifest.json
      export_report.json         parity, accuracies, promotable flags (see `deploy.compile.verify.verify`)

Two places silently change precision, and both are pinned here (docs/mlops-notes.md, "Export and the edge"):
``openvino.save_model`` stores FP16 weights unless ``compress_to_fp16=False``, and the CPU plugin computes in
bf16 on CPUs with native bf16 (AVX512-BF16, AMX) unless ``INFERENCE_PRECISION_HINT=f32``. The hint is stored in
every manifest's ``runtime_config`` so the edge compiles exactly as verification did.

Every directory is built under a temp name next to its target and renamed into place; an existing target is
never overwritten (OpenVINO Model Server does not notice files changed inside a version folder).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import openvino as ov
import timm
import torch
from torch import nn

import spt_core
from deploy.compile.quantize import calibration_fingerprint, calibration_items, nncf_model_type, quantize
from deploy.compile.verify import verify
from deploy.edge.artifact import INPUT_NAME, OUTPUT_NAME, PRECISIONS, build_manifest, seal
from spt_core.portable.errors import SensituneError, one_line
from spt_core.portable.io import atomic_path, umask, write_text
from spt_core.portable.preprocess import Preprocess, preprocess_image

log = logging.getLogger(__name__)

REPORT = "export_report.json"


class ExportError(SensituneError):
    """An export step that fails or is given bad arguments (sealing and loading raise `ArtifactError`)."""


def export_onnx(model: nn.Module, pre: Preprocess, path: str | Path, *, opset: int = 18, dynamo: bool = True) -> Path:
    """Export ``model`` to ONNX with input ``input`` (N, 3, H, W) float32 and output ``logits`` (N, classes).

    The torch.export-based exporter (``dynamo=True``) is the default: it is torch's default since 2.9, the
    TorchScript one is deprecated, and it folds timm's "same" padding into a plain graph (Lite0: 49 Conv, no
    Shape/Pad arithmetic). It implements opset >= 18; a lower ``opset`` makes torch down-convert, which fails on
    some graphs and then keeps 18, so read the opset actually written with `onnx_opset`.

    Args:
        model: The merged (plain timm) model; exported in eval mode, its previous mode restored afterwards.
        pre: The preprocessing; ``pre.size`` gives the export height and width. Only the batch axis is dynamic.
        path: Target ``.onnx`` file, written atomically (weights inside the file, no external data).
        opset: ONNX opset requested.
        dynamo: False uses the legacy TorchScript exporter (honours opset 17) for models torch.export rejects.

    Returns:
        ``path``.

    Raises:
        ExportError: The exporter or the ONNX checker rejects the model.
    """
    path = Path(path)
    was_training = model.training
    model.eval()
    param = next(iter(model.parameters()), None)
    h, w = pre.size
    dummy = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))  # (1, 3, H, W)
    dummy = dummy.to(param.device if param is not None else "cpu")
    names = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            if dynamo:
                shapes = ({0: torch.export.Dim("batch")},)  # one dict per positional arg: input dim 0 is dynamic
                kw = dict(dynamo=True, external_data=False, verbose=False, dynamic_shapes=shapes)
                torch.onnx.export(model, (dummy,), tmp, **kw, **names)
            else:
                warnings.simplefilter("ignore", category=torch.jit.TracerWarning)  # H, W are fixed by design
                axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
                torch.onnx.export(model, (dummy,), tmp, dynamo=False, dynamic_axes=axes, **names)
            onnx.checker.check_model(str(tmp))
    except Exception as e:  # exporter errors come in many types; all mean "this model does not export"
        raise ExportError(
            f"ONNX export of {type(model).__name__} to {path} failed ({one_line(e)}): "
            f"retry with export_onnx(..., dynamo={not dynamo})"
        ) from e
    finally:
        model.train(was_training)
    return path


def onnx_opset(path: str | Path) -> int:
    """The default-domain opset an ONNX file was written with."""
    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def compile_openvino(
    onnx_path: str | Path,
    out_dir: str | Path,
    precision: str,
    *,
    calibration: Iterable[np.ndarray] | None = None,
    subset_size: int = 300,
    model_type: str | None = None,
    fast_bias_correction: bool = False,
) -> Path:
    """Convert an ONNX file to OpenVINO IR (``out_dir/model.xml`` + ``model.bin``) in one precision.

    fp32 stores FP32 weights (checked after saving), fp16 stores FP16 weights, int8 runs NNCF post-training
    quantization on the FP32 model and stores the rest of its weights in FP32.

    Args:
        onnx_path: Output of `export_onnx`.
        out_dir: Artifact directory; must not exist (built in a temp dir beside it, then renamed).
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        calibration: int8 only: preprocessed images, each (3, H, W) or (1, 3, H, W) float32. Fed to NNCF one image
            per item, because NNCF's ``subset_size`` counts dataset items.
        subset_size: int8 only: calibration images used (the first ``subset_size``); ~300 is NNCF's usual size.
        model_type: int8 only: ``"transformer"`` for ViTs (NNCF keeps softmax/LayerNorm paths accurate), else None.
        fast_bias_correction: int8 only: False runs NNCF's full bias correction, which costs seconds and recovers
            most of the loss of depthwise-conv nets such as Lite0.

    Returns:
        ``out_dir``.

    Raises:
        ExportError: Unknown precision, missing calibration for int8, existing ``out_dir``, conversion failure.
        QuantizeError: Calibration images of the wrong shape, unknown ``model_type``, NNCF failure.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    out_dir = Path(out_dir)
    _refuse_existing(out_dir)
    try:
        ov_model = ov.convert_model(str(onnx_path))
    except Exception as e:
        raise ExportError(f"OpenVINO cannot convert {onnx_path} ({one_line(e)}): re-run export_onnx") from e
    if precision == "int8":
        items = calibration_items(calibration or [], subset_size)
        if not items:
            raise ExportError(f"int8 export to {out_dir} needs calibration images: pass a non-empty calibration")
        ov_model = quantize(ov_model, items, model_type, fast_bias_correction)
    with _staging_dir(out_dir) as tmp:
        ov.save_model(ov_model, tmp / "model.xml", compress_to_fp16=(precision == "fp16"))
        if precision == "fp32" and (n16 := ir_weight_types(tmp / "model.xml").get("f16", 0)):
            raise ExportError(f"{out_dir}: FP32 IR holds {n16} f16 constants; check openvino.save_model arguments")
    return out_dir


def ir_weight_types(xml_path: str | Path) -> Counter[str]:
    """Count the element types of the floating-point Constant nodes in an IR (``{"f32": 95}`` for FP32)."""
    model = ov.Core().read_model(str(xml_path))
    types = (op.get_output_element_type(0) for op in model.get_ops() if op.get_type_name() == "Constant")
    return Counter(t.get_type_name() for t in types if t.is_real())


def write_manifest(
    artifact_dir: str | Path,
    *,
    precision: str,
    model_name: str,
    class_names: Sequence[str],
    pre: Preprocess,
    model_version: str | int,
    plan_hash: str | None,
    data_version: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Seal an artifact directory with ``manifest.json`` (`deploy.edge.artifact.build_manifest` + `seal`), recording the
    versions of this export toolchain and, for ONNX, the opset. Arguments as `build_manifest`.

    Returns:
        The manifest written.

    Raises:
        ArtifactError: Missing directory/model files, existing manifest, bad precision, or ``extra`` overriding a
            computed key.
    """
    d = Path(artifact_dir)
    opset = onnx_opset(d / "model.onnx") if (d / "model.onnx").is_file() else None
    manifest = build_manifest(
        d,
        precision=precision,
        model_name=model_name,
        class_names=class_names,
        pre=pre,
        model_version=model_version,
        plan_hash=plan_hash,
        data_version=data_version,
        versions=_versions(int8=precision == "int8"),
        onnx_opset=opset,
        extra=extra,
    )
    seal(d, manifest)
    return manifest


def export_all(
    model: nn.Module,
    pre: Preprocess,
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    calibration_images: Sequence[Any],
    eval_images: Sequence[Any],
    eval_labels: Sequence[int],
    model_name: str,
    model_version: str | int,
    plan_hash: str | None,
    data_version: str | None,
    precisions: Sequence[str] = PRECISIONS,
    calibration_size: int = 300,
    int8_max_drop: float = 1.0,
    fp16_max_drop: float = 1.0,
    opset: int = 18,
    decision: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export one model version: ONNX + OpenVINO IRs, verified on real images, each sealed with a manifest.

    The whole ``out_dir`` is built in a temp dir beside it and renamed at the end, so a reader never sees a
    partial version. Verification results go into each manifest (``promotable``, ``verification``) and into
    ``export_report.json``; a failed gate is reported, not raised (``report["passed"]``), so that the report
    survives for inspection; callers such as the CLI should exit non-zero on it.

    Args:
        model: The merged plain timm model.
        pre: Its preprocessing (`spt_core.portable.preprocess.Preprocess`).
        class_names: One name per logit.
        out_dir: The version directory to create (e.g. ``exports/3``); must not exist.
        calibration_images: Images (paths, PIL or uint8 arrays) for INT8 calibration, ideally from the training
            split; ``calibration_size`` of them are taken evenly spaced over the list (class-sorted lists stay
            balanced).
        eval_images: Test images (paths, PIL or arrays) for parity and accuracy.
        eval_labels: Their class indices.
        model_name: timm model name.
        model_version: The version this export publishes.
        plan_hash: SPT plan hash, if any.
        data_version: Training data version, if known.
        precisions: OpenVINO precisions to build.
        calibration_size: INT8 calibration images.
        int8_max_drop: Accuracy points INT8 may lose against PyTorch and stay promotable.
        fp16_max_drop: Same for FP16.
        opset: ONNX opset requested (see `export_onnx`).
        decision: The operating decision every manifest carries: ``ok_class`` and ``threshold`` (reject when
            P(ok_class) < threshold, chosen on validation), ``max_escape_rate``; None values are left out.

    Returns:
        The report: paths (relative to ``out_dir``), ONNX opset, verification numbers and flags.

    Raises:
        ExportError: Existing ``out_dir``, bad arguments, or a failing export step (nothing is left behind).
    """
    out_dir = Path(out_dir)
    if unknown := [p for p in precisions if p not in PRECISIONS]:
        raise ExportError(f"precisions={unknown}: use a subset of {', '.join(PRECISIONS)}")
    n_out = getattr(model, "num_classes", len(class_names))
    if n_out != len(class_names):
        raise ExportError(f"{len(class_names)} class_names for a model with {n_out} outputs: pass one name per class")
    if len(eval_images) != len(eval_labels) or not eval_images:
        raise ExportError(f"{len(eval_images)} eval_images, {len(eval_labels)} eval_labels: give one label per image")
    calibration: list[np.ndarray] = []
    if "int8" in precisions:
        if calibration_size < 1 or not calibration_images:
            raise ExportError(
                f"int8 export to {out_dir} needs calibration images: pass training images and calibration_size > 0"
            )
        idx = np.unique(np.linspace(0, len(calibration_images) - 1, min(calibration_size, len(calibration_images))))
        calibration = [preprocess_image(calibration_images[int(i)], pre)[None] for i in idx]
    model_type = nncf_model_type(model)
    common = dict(model_name=model_name, class_names=class_names, pre=pre, model_version=model_version)
    common |= dict(plan_hash=plan_hash, data_version=data_version)

    with _staging_dir(out_dir) as tmp:
        export_onnx(model, pre, tmp / "model.onnx", opset=opset)
        artifacts: dict[str, Path] = {"onnx": tmp / "model.onnx"}
        for p in precisions:
            log.info("compiling OpenVINO %s", p)
            kw = dict(calibration=calibration, subset_size=len(calibration), model_type=model_type)
            artifacts[p] = compile_openvino(tmp / "model.onnx", tmp / "openvino" / p, p, **kw) / "model.xml"
        report = verify(
            model, artifacts, eval_images, eval_labels, pre, int8_max_drop=int8_max_drop, fp16_max_drop=fp16_max_drop
        )
        opset_used = onnx_opset(tmp / "model.onnx")
        for fmt, path in artifacts.items():
            extra: dict[str, Any] = {
                "onnx_opset": opset_used,
                "promotable": report["promotable"][fmt],
                "verification": _verification_for(report, fmt),
            }
            extra |= {k: v for k, v in (decision or {}).items() if v is not None}  # ok_class, threshold
            if fmt == "int8":
                extra |= {"calibration": calibration_fingerprint(calibration), "nncf_model_type": model_type}
            write_manifest(path.parent, precision="fp32" if fmt == "onnx" else fmt, extra=extra, **common)
        report = {
            "out_dir": str(out_dir),
            "model_name": model_name,
            "model_version": str(model_version),
            "onnx_opset": opset_used,
            "artifacts": {fmt: str(p.parent.relative_to(tmp)) for fmt, p in artifacts.items()},
            **report,
        }
        write_text(tmp / REPORT, json.dumps(report, indent=2) + "\n")
    return report


def _verification_for(report: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The slice of the verification report about one artifact (stored in its manifest)."""
    keys = ("max_abs_diff", "correlation", "agreement", "accuracy", "accuracy_drop")
    out = {k: report[k][fmt] for k in keys if fmt in report.get(k, {})}
    return {"n_images": report["n_images"], "pytorch_accuracy": report["accuracy"]["pytorch"], **out}


def _versions(*, int8: bool) -> dict[str, str]:
    v = {
        "sensitune": spt_core.__version__,
        "openvino": ov.get_version(),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    if int8:
        import nncf

        v["nncf"] = nncf.__version__
    return v


def _refuse_existing(target: Path) -> None:
    if target.exists():
        raise ExportError(f"{target} already exists: versions are immutable; export to a new model_version directory")


@contextlib.contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; on success rename it to ``target`` (which must not exist)."""
    _refuse_existing(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; artifacts are served and copied by other users
    try:
        yield tmp
        _refuse_existing(target)  # again: another export may have finished meanwhile
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
