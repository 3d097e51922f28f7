"""Check exported artifacts against PyTorch on real images (the torch side of the parity gate).

`verify` runs PyTorch, ONNX Runtime and the OpenVINO IRs on the *same* preprocessed batches
(`spt_core.portable.preprocess.preprocess_batch`, the edge's own function), so a difference can only come from the
exported graph, never from a second preprocessing path. Sealed artifact directories are read through
`deploy.edge.artifact.load_artifact` (checksums verified) and OpenVINO runs through `deploy.edge.inferencer.Inferencer`,
exactly as on the edge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from deploy.edge.artifact import INPUT_NAME, OUTPUT_NAME, RUNTIME_CONFIG, ArtifactError, load_artifact
from deploy.edge.inferencer import Inferencer
from spt_core.portable.errors import SensituneError, one_line
from spt_core.portable.preprocess import Preprocess, preprocess_batch

FORMATS = ("onnx", "fp32", "fp16", "int8")  # keys of `verify`'s artifacts: the ONNX file and the three IRs


class VerifyError(SensituneError):
    """Verification that cannot run: unknown artifact key, label count mismatch, logits of the wrong shape."""


def runner(artifact: str | Path, fmt: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function (N, 3, H, W) float32 -> (N, classes) logits for an artifact dir, ``.onnx`` or ``.xml`` file.

    A directory is loaded with `load_artifact` (checksums verified) and compiled with its manifest's
    ``runtime_config``; a bare ``.xml`` is compiled with ``RUNTIME_CONFIG[fmt]``, the config its manifest will carry.

    Raises:
        ArtifactError: An artifact that cannot be trusted or loaded, or a path that is none of the three.
    """
    path = Path(artifact)
    if path.is_dir():
        art = load_artifact(path)
        if art.format == "onnx":
            return _onnx_runner(art.model_path)
        return Inferencer.from_artifact(art).infer
    if path.suffix == ".onnx":
        return _onnx_runner(path)
    if path.suffix == ".xml":
        # By name, so a graph whose input/output lost the manifest's names fails here and not on the edge.
        return Inferencer(path, RUNTIME_CONFIG.get(fmt, RUNTIME_CONFIG["fp32"])).infer
    raise ArtifactError(f"artifact {path}: give an artifact dir, a .onnx or a .xml file")


def _onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises Fail/InvalidGraph/...: all mean a corrupt file here
        raise ArtifactError(f"{path} cannot be loaded ({one_line(e)}): the file is corrupt; re-export it") from e
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


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
        VerifyError: Unknown artifact key, label count mismatch, or logits of another shape than PyTorch's.
        ArtifactError: An artifact that cannot be trusted or loaded.
    """
    if unknown := sorted(set(artifacts) - set(FORMATS)):
        raise VerifyError(f"artifacts keys {unknown}: use {', '.join(FORMATS)}")
    if len(images) != len(labels) or not images:
        raise VerifyError(f"{len(images)} images, {len(labels)} labels: give one label per image (at least one)")
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
            raise VerifyError(
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
