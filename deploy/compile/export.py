"""Torch side of the edge: merged timm model -> ONNX -> every precision asked for (OpenVINO FP32 / FP16 / NNCF INT8,
ONNX Runtime INT8) + manifest, verified against PyTorch.

The precisions, their layout and accuracy budgets are the rows of `deploy.edge.precision`; each is built by
`deploy.compile.build`; the manifest contract is `deploy.edge.artifact`, the parity gate `deploy.compile.verify`.

Layout written by `export_all` (one immutable directory per model version; `deploy.edge.precision` has the rest)::

    out_dir/                     e.g. exports/3/
      model.onnx  manifest.json  ONNX artifact (format "onnx", fp32)
      openvino/fp32/  openvino/fp16/  openvino/int8/   each: model.xml, model.bin, manifest.json
      export_report.json         parity, accuracies, promotable flags (see `deploy.compile.verify.verify`)

Every directory is built under a temp name next to its target and renamed into place; an existing target is
never overwritten (OpenVINO Model Server does not notice files changed inside a version folder).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
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
from deploy.compile.build import ExportError, build, staging_dir
from deploy.compile.graph_gate import check_graph_options, graph_failures, graph_gate
from deploy.compile.quantize import calibration_fingerprint, nncf_model_type
from deploy.compile.recovery import RECOVERABLE, check_recovery, recover_int8
from deploy.compile.verify import verify
from deploy.edge.artifact import INPUT_NAME, OUTPUT_NAME, build_manifest, seal
from deploy.edge.precision import BUILDABLE, PRECISIONS, SOURCE, artifact_dir
from spt_core.portable.errors import one_line
from spt_core.portable.io import atomic_path, write_text
from spt_core.portable.preprocess import Preprocess, preprocess_image

log = logging.getLogger(__name__)

REPORT = "export_report.json"


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
        versions=_versions(nncf=precision == "int8" and (d / "model.xml").is_file()),
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
    precisions: Sequence[str],
    calibration_size: int,
    opset: int,
    max_drop: Mapping[str, float] | None = None,
    decision: dict[str, Any] | None = None,
    validation_images: Sequence[Any] = (),
    int8_recovery: str = "ignored_scope",
    weights_source: Mapping[str, Any] | None = None,
    model_kind: str | None = None,
    graph_preprocess: str = "auto",
    graph_parity_min_agreement: float = 99.0,
    graph_parity_max_dp: float = 0.01,
    eval_split: str = "test",
) -> dict[str, Any]:
    """Export one model version: ONNX + the precisions asked for, verified on real images, each sealed with a manifest.

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
        precisions: Precisions to build from the ONNX file (rows of `deploy.edge.precision`; the ONNX file itself
            is always exported, verified and sealed).
        calibration_size: Calibration images of the calibrated precisions (INT8), the same set for each.
        opset: ONNX opset requested (see `export_onnx`).
        max_drop: Accuracy points a precision may lose against PyTorch and stay promotable, by name; a name left
            out keeps its row's ``max_drop``.
        decision: The operating decision every manifest carries: ``ok_class`` and ``threshold`` (reject when
            P(ok_class) < threshold, chosen on validation), ``max_escape_rate``; None values are left out, except
            ``ok_class``, which every manifest records (null: plain classification, no reject decision).
        validation_images: Images (the validation split, never ``eval_images``) that INT8 accuracy control
            measures on when plain INT8 is refused (`deploy.compile.recovery`).
        int8_recovery: How INT8 refused by the gate is retried before it is declared not promotable:
            ``ignored_scope``, ``accuracy_control`` or ``none``; the INT8 manifest records it under ``quantization``.
        weights_source: Where the weights came from when no sensitune plan made them (a merged peft adapter:
            `spt_core.peft_bridge.merge_peft`'s record); every manifest carries it under ``weights_source``.
        model_kind: What the model is, recorded in every manifest under ``model``: ``tuned`` (the plan trained) or
            ``probe`` (no candidate beat the linear probe on validation: the probe's head on the pretrained backbone,
            ``train.below_probe: export_probe``).
        graph_preprocess: ``auto``: each OpenVINO artifact ships its in-graph preprocessing (the box feeds decoded
            frames) where the parity gate on ``eval_images`` passes, host preprocessing elsewhere; ``on``: the same,
            and a failed gate fails the export; ``off``: host preprocessing (`deploy.compile.graph_gate`).
        graph_parity_min_agreement: Top-1 agreement (%) of the graph variant with host preprocessing, at least.
        graph_parity_max_dp: Largest |P(ok_class) difference| of the graph variant from host preprocessing.
        eval_split: Which split ``eval_images`` are, recorded with the graph parity.

    Returns:
        The report: paths (relative to ``out_dir``), ONNX opset, verification numbers and flags.

    precisions, calibration_size and opset are required: params.yaml's ``export`` section is the one place that
    gives them values (a library default once disagreed with it).

    Raises:
        ExportError: Existing ``out_dir``, bad arguments, or a failing export step (nothing is left behind).
    """
    out_dir = Path(out_dir)
    check_recovery(int8_recovery)
    check_graph_options(graph_preprocess, graph_parity_min_agreement, graph_parity_max_dp)
    if unknown := [p for p in precisions if p not in BUILDABLE]:
        raise ExportError(f"precisions={unknown}: use a subset of {', '.join(BUILDABLE)}")
    n_out = getattr(model, "num_classes", len(class_names))
    if n_out != len(class_names):
        raise ExportError(f"{len(class_names)} class_names for a model with {n_out} outputs: pass one name per class")
    if len(eval_images) != len(eval_labels) or not eval_images:
        raise ExportError(f"{len(eval_images)} eval_images, {len(eval_labels)} eval_labels: give one label per image")
    calibration: list[np.ndarray] = []
    if calibrated := [p for p in precisions if PRECISIONS[p].calibration]:
        if calibration_size < 1 or not calibration_images:
            raise ExportError(
                f"{', '.join(calibrated)} export to {out_dir} needs calibration images: pass training images and "
                "calibration_size > 0"
            )
        idx = np.unique(np.linspace(0, len(calibration_images) - 1, min(calibration_size, len(calibration_images))))
        calibration = [preprocess_image(calibration_images[int(i)], pre)[None] for i in idx]
    model_type = nncf_model_type(model)
    common = dict(model_name=model_name, class_names=class_names, pre=pre, model_version=model_version)
    common |= dict(plan_hash=plan_hash, data_version=data_version)

    with staging_dir(out_dir) as tmp:
        source = export_onnx(model, pre, artifact_dir(tmp, SOURCE) / "model.onnx", opset=opset)
        artifacts: dict[str, Path] = {SOURCE: source}
        for p in precisions:
            log.info("building %s", p)
            artifacts[p] = build(p, source, artifact_dir(tmp, p), calibration, model_type)
        report = verify(model, artifacts, eval_images, eval_labels, pre, max_drop=max_drop, decision=decision,
                        class_names=class_names)  # fmt: skip
        report, quantization = recover_int8(
            model, artifacts, report, method=int8_recovery, calibration=calibration,
            validation_images=validation_images, eval_images=eval_images, eval_labels=eval_labels, pre=pre,
            max_drop=max_drop, model_type=model_type, class_names=class_names, decision=decision,
        )  # fmt: skip
        op = decision or {}
        inputs = graph_gate(artifacts, eval_images, pre, class_names, op.get("ok_class"), op.get("threshold"),
                            split=eval_split, graph_preprocess=graph_preprocess,
                            graph_parity_min_agreement=graph_parity_min_agreement,
                            graph_parity_max_dp=graph_parity_max_dp)  # fmt: skip
        opset_used = onnx_opset(source)
        for name, path in artifacts.items():
            row = PRECISIONS[name]
            extra: dict[str, Any] = {
                "onnx_opset": opset_used,
                "promotable": report["promotable"][name],
                "verification": _verification_for(report, name),
            }
            # ok_class always, null for plain classification: a box must not guess which class is the good one
            extra |= {"ok_class": None} | {k: v for k, v in (decision or {}).items() if v is not None}
            if weights_source is not None:
                extra["weights_source"] = dict(weights_source)
            if model_kind is not None:
                extra["model"] = model_kind
            if row.calibration:
                extra["calibration"] = calibration_fingerprint(calibration)
            if row.calibration and row.format == "openvino":
                extra["nncf_model_type"] = model_type
            if name == RECOVERABLE:
                extra["quantization"] = quantization
            extra |= inputs[name]  # input_variant, and graph_preprocess where the graph's parity was measured
            write_manifest(path.parent, precision=row.weights, extra=extra, **common)
        report = {
            "out_dir": str(out_dir),
            "model_name": model_name,
            "model_version": str(model_version),
            "onnx_opset": opset_used,
            "artifacts": {fmt: str(p.parent.relative_to(tmp)) for fmt, p in artifacts.items()},
            **report,
        }
        if RECOVERABLE in artifacts:
            report["int8_recovery"] = quantization
        report["graph_preprocess"] = {n: {"input_variant": d["input_variant"], **d.get("graph_preprocess", {})}
                                      for n, d in inputs.items()}  # fmt: skip
        if failed := graph_failures(inputs, graph_preprocess):  # `on`: the graph variant was required
            report |= {"passed": False, "graph_failures": failed}
        write_text(tmp / REPORT, json.dumps(report, indent=2) + "\n")
    return report


def _verification_for(report: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The slice of the verification report about one artifact (stored in its manifest)."""
    keys = ("max_abs_diff", "correlation", "agreement", "accuracy", "accuracy_drop")
    out = {k: report[k][fmt] for k in keys if fmt in report.get(k, {})}
    if "escapes" in report:  # defects accepted at the line's operating point, this artifact's and PyTorch's
        out |= {"escapes": report["escapes"][fmt], "pytorch_escapes": report["escapes"]["pytorch"],
                "defects": report["defects"]}  # fmt: skip
    return {"n_images": report["n_images"], "pytorch_accuracy": report["accuracy"]["pytorch"], **out}


def _versions(*, nncf: bool) -> dict[str, str]:
    v = {
        "sensitune": spt_core.__version__,
        "openvino": ov.get_version(),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    if nncf:
        import nncf as nncf_

        v["nncf"] = nncf_.__version__
    return v
