"""Load sealed artifacts and check them against PyTorch on real images (the torch side of the parity gate).

`load_artifact` trusts nothing: directory, manifest, checksums and the model file itself are checked, each
failure a one-line `ExportError`. `verify` runs PyTorch, ONNX Runtime and the OpenVINO IRs on the *same*
preprocessed batches (`spt_core.preprocess.preprocess_batch`, the edge's own function), so a difference can only
come from the exported graph, never from a second preprocessing path.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch
from torch import nn

from deploy.export import INPUT_NAME, MANIFEST, OUTPUT_NAME, RUNTIME_CONFIG, ExportError, _one_line, file_sha256
from spt_core.preprocess import Preprocess, preprocess_batch

FORMATS = ("onnx", "fp32", "fp16", "int8")  # keys of `verify`'s artifacts: the ONNX file and the three IRs
_MODEL_FILES = {"openvino": ("model.xml", "model.bin"), "onnx": ("model.onnx",)}
_REQUIRED = ("format", "precision", "model_version", "class_names", "preprocess", "files")


@functools.cache
def _core() -> ov.Core:
    return ov.Core()


def load_artifact(artifact_dir: str | Path, *, device: str = "CPU") -> tuple[Any, dict[str, Any]]:
    """Check and compile a sealed artifact directory.

    Args:
        artifact_dir: A directory written by `deploy.export.export_all` (or compile + `write_manifest`).
        device: OpenVINO device for IR artifacts.

    Returns:
        ``(compiled, manifest)``: an ``openvino.CompiledModel`` compiled with the manifest's ``runtime_config``
        (openvino format) or an ``onnxruntime.InferenceSession`` (onnx format), and the manifest dict.

    Raises:
        ExportError: Missing directory, missing/corrupt/incomplete manifest, missing file, checksum mismatch, or a
            model file the runtime cannot load.
    """
    d = Path(artifact_dir)
    if not d.is_dir():
        raise ExportError(f"artifact dir {d} does not exist: check the path or run `sensitune export`")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise ExportError(f"{mpath} is missing: the artifact is incomplete; re-export it to a new model_version")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{mpath} is not valid JSON ({_one_line(e)}): re-copy the artifact or re-export it") from e
    if not isinstance(manifest, dict) or (missing := [k for k in _REQUIRED if k not in manifest]):
        what = f"lacks {missing}" if isinstance(manifest, dict) else "is not a JSON object"
        raise ExportError(f"{mpath} {what}: it was not written by sensitune export; re-export the artifact")
    fmt, files = manifest["format"], manifest["files"]
    if fmt not in _MODEL_FILES or not isinstance(files, dict):
        raise ExportError(f"{mpath}: format={fmt!r} or files={files!r} is invalid; re-export the artifact")
    for name in _MODEL_FILES[fmt]:
        if name not in files:
            raise ExportError(f"{mpath} has no checksum for {name}: re-export the artifact")
    for name, sha in files.items():
        path = d / name
        if Path(name).name != name:  # a manifest must not point outside its own directory
            raise ExportError(f"{mpath}: file name {name!r} leaves the artifact dir; re-export the artifact")
        if not path.is_file():
            raise ExportError(f"{path} is missing: re-copy the whole artifact dir or re-export it")
        if (actual := file_sha256(path)) != sha:
            raise ExportError(
                f"{path} sha256 {actual[:12]}... does not match the manifest's {str(sha)[:12]}...: the file is "
                "corrupt or was modified; re-copy the artifact or re-export it"
            )
    main = d / _MODEL_FILES[fmt][0]
    try:
        if fmt == "openvino":
            compiled = _core().compile_model(str(main), device, dict(manifest.get("runtime_config") or {}))
        else:
            compiled = ort.InferenceSession(str(main), providers=["CPUExecutionProvider"])
    except Exception as e:  # runtimes raise RuntimeError/Fail/InvalidGraph...: all mean a corrupt file here
        raise ExportError(f"{main} cannot be loaded ({_one_line(e)}): the file is corrupt; re-export it") from e
    return compiled, manifest


def runner(artifact: str | Path, fmt: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function (N, 3, H, W) float32 -> (N, classes) logits for an artifact dir, ``.onnx`` or ``.xml`` file.

    A bare ``.xml`` is compiled with ``RUNTIME_CONFIG[fmt]``, the config its manifest will carry.
    """
    path = Path(artifact)
    if path.is_dir():
        compiled, _ = load_artifact(path)
    elif path.suffix == ".onnx":
        compiled = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    elif path.suffix == ".xml":
        compiled = _core().compile_model(str(path), "CPU", RUNTIME_CONFIG.get(fmt, RUNTIME_CONFIG["fp32"]))
    else:
        raise ExportError(f"artifact {path}: give an artifact dir, a .onnx or a .xml file")
    if isinstance(compiled, ort.InferenceSession):
        return lambda x: compiled.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    # By name, so a graph whose input/output lost the manifest's names fails here and not on the edge.
    return lambda x: np.array(compiled({INPUT_NAME: x})[OUTPUT_NAME])


def verify(
    model: nn.Module,
    artifacts: Mapping[str, str | Path],
    images: Sequence[Any],
    labels: Sequence[int],
    pre: Preprocess,
    *,
    int8_max_drop: float = 1.0,
    fp16_max_drop: float = 1.0,
    parity_atol: float = 1e-4,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Compare exported artifacts with the PyTorch model on real images.

    Args:
        model: The PyTorch model that was exported (run in eval mode).
        artifacts: ``{"onnx"|"fp32"|"fp16"|"int8": artifact dir, .onnx or .xml}``; any subset.
        images: Test images (paths, PIL images or HxW[x3] uint8 arrays).
        labels: Their class indices.
        pre: The preprocessing, applied once per batch and fed to every runtime.
        int8_max_drop: Accuracy points INT8 may lose against PyTorch (``int8_ok``).
        fp16_max_drop: Same for FP16 (``fp16_ok``).
        parity_atol: Max |logit difference| allowed for ONNX and OpenVINO FP32.
        batch_size: Images per batch.

    Returns:
        ``n_images``; per format ``max_abs_diff``, ``correlation`` (Pearson of all logits with PyTorch's),
        ``agreement`` (% same top-1 as PyTorch), ``accuracy`` (%, incl. ``pytorch``), ``accuracy_drop``
        (points); ``parity_ok`` (ONNX and FP32 within ``parity_atol``), ``fp16_ok``, ``int8_ok`` (None when
        absent), ``promotable`` per format, and ``passed`` (= ``parity_ok``: the export itself is correct).

    Raises:
        ExportError: Unknown artifact key, label count mismatch, or an artifact that cannot be loaded.
    """
    if unknown := sorted(set(artifacts) - set(FORMATS)):
        raise ExportError(f"artifacts keys {unknown}: use {', '.join(FORMATS)}")
    if len(images) != len(labels) or not images:
        raise ExportError(f"{len(images)} images, {len(labels)} labels: give one label per image (at least one)")
    runners = {fmt: runner(path, fmt) for fmt, path in artifacts.items()}
    model.eval()
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    chunks: dict[str, list[np.ndarray]] = {"pytorch": [], **{fmt: [] for fmt in runners}}
    for i in range(0, len(images), batch_size):
        x = preprocess_batch(list(images[i : i + batch_size]), pre)  # (B, 3, H, W) float32, shared by all
        with torch.no_grad():
            chunks["pytorch"].append(model(torch.from_numpy(x).to(device)).float().cpu().numpy())
        for fmt, run in runners.items():
            chunks[fmt].append(run(x))
    logits = {k: np.concatenate(v) for k, v in chunks.items()}  # each (N, classes)
    ref, y = logits["pytorch"], np.asarray(labels)
    for fmt, out in logits.items():
        if out.shape != ref.shape:
            raise ExportError(
                f"{fmt} artifact {artifacts[fmt]} gives logits {out.shape}, PyTorch {ref.shape}: re-export"
            )

    acc = {k: 100.0 * float(np.mean(v.argmax(1) == y)) for k, v in logits.items()}
    fmts = list(runners)
    report: dict[str, Any] = {
        "n_images": len(images),
        "parity_atol": parity_atol,
        "max_abs_diff": {f: float(np.abs(logits[f] - ref).max()) for f in fmts},
        "correlation": {f: float(np.corrcoef(logits[f].ravel(), ref.ravel())[0, 1]) for f in fmts},
        "agreement": {f: 100.0 * float(np.mean(logits[f].argmax(1) == ref.argmax(1))) for f in fmts},
        "accuracy": acc,
        "accuracy_drop": {f: acc["pytorch"] - acc[f] for f in fmts},
        "fp16_max_drop": fp16_max_drop,
        "int8_max_drop": int8_max_drop,
    }
    exact = [f for f in ("onnx", "fp32") if f in runners]
    report["parity_ok"] = all(report["max_abs_diff"][f] <= parity_atol for f in exact)
    for f, budget in (("fp16", fp16_max_drop), ("int8", int8_max_drop)):
        report[f"{f}_ok"] = report["accuracy_drop"][f] <= budget if f in runners else None
    # Every artifact comes from the same ONNX graph: if that graph is wrong, none of them may ship.
    report["promotable"] = {
        f: report["parity_ok"] and (report["max_abs_diff"][f] <= parity_atol if f in exact else report[f"{f}_ok"])
        for f in fmts
    }
    report["passed"] = report["parity_ok"]
    return report
