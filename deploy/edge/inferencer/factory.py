"""`open_inferencer`: any torch-free artifact path -> the `Inferencer` that runs it.

Accepted paths (the precision names are the rows of `deploy.edge.precision`):

- a sealed artifact directory (``exports/3/openvino/int8``), or the ``model.xml`` / ``model.bin`` / ``model.onnx``
  inside it: read with `load_artifact` (every sha256 checked) and compiled from those very bytes;
- an export directory (``exports/3``): the artifact of ``precision`` in it (default ``fp32``, else the ONNX file);
- a bare ``model.xml`` / ``model.onnx`` with no manifest yet (export verifies before it seals): compiled with the
  ``runtime_config`` of ``precision``'s row, the one its manifest will carry; `infer` only.

`deploy.compile.inferencer.open_inferencer` adds PyTorch models on the compile side.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy.edge.artifact import MANIFEST, Artifact, ArtifactError, load_artifact
from deploy.edge.graph_spec import HOST
from deploy.edge.inferencer.base import Inferencer
from deploy.edge.inferencer.graph_input import open_variant
from deploy.edge.inferencer.onnx_inferencer import OnnxRuntimeInferencer
from deploy.edge.inferencer.openvino_inferencer import OpenVINOInferencer
from deploy.edge.precision import PRECISIONS, SERVED, SOURCE, artifact_dir, for_manifest

IMPLEMENTATIONS: dict[str, type[OpenVINOInferencer] | type[OnnxRuntimeInferencer]] = {
    "openvino": OpenVINOInferencer,
    "onnx": OnnxRuntimeInferencer,
}  # manifest format -> the inferencer that runs it
SUFFIX_FORMAT = {".xml": "openvino", ".bin": "openvino", ".onnx": "onnx"}


def is_exported(path: str | Path) -> bool:
    """True when `open_inferencer` takes `path` (an artifact, an export dir or a model file), False for anything
    else (a PyTorch weights file or directory)."""
    p = Path(path)
    if p.is_file():
        return p.suffix in SUFFIX_FORMAT
    return p.is_dir() and any((d / MANIFEST).is_file() for d in (p, *(artifact_dir(p, n) for n in PRECISIONS)))


def open_artifact(
    artifact: Artifact, config: Mapping[str, Any] | None = None, variant: str | None = HOST
) -> Inferencer:
    """The inferencer of a verified artifact, compiled from its verified bytes with its ``runtime_config`` and
    ``config`` laid over it.

    `variant` (OpenVINO only): ``host`` takes preprocessed (N, 3, H, W) float32 (what `verify`, `predict` and the
    benchmarks feed); ``graph`` takes decoded frames (`graph_input.FrameInferencer`); None: the one the manifest
    ships (``input_variant``), which is what the box serves (`deploy.edge.acceptance`).

    Raises:
        ArtifactError: A format no inferencer runs, a preprocessing other than RGB/NCHW, a model that does not load.
    """
    if artifact.format not in IMPLEMENTATIONS:
        mpath = artifact.dir / MANIFEST
        raise ArtifactError(f"{mpath}: format={artifact.format!r}; use one of {', '.join(IMPLEMENTATIONS)}")
    if artifact.format == "openvino":
        return open_variant(artifact, config, variant)
    if variant not in (None, HOST):
        raise ArtifactError(f"{artifact.dir}: variant={variant!r}; an ONNX artifact takes host preprocessing only")
    return IMPLEMENTATIONS[artifact.format].from_artifact(artifact, config)


def open_inferencer(
    path: str | Path | Artifact,
    precision: str | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    expected_version: str | None = None,
    variant: str | None = HOST,
) -> Inferencer:
    """Open any torch-free artifact (see the module docstring for the paths it takes).

    Args:
        path: An `Artifact`, a sealed artifact dir or a model file in one, an export dir, or a bare model file.
        precision: A row of `deploy.edge.precision`: which artifact of an export dir, the runtime config of a bare
            file; for a sealed dir it must be the precision its manifest says. None: ``fp32`` (else the ONNX file)
            in an export dir, the manifest's own otherwise.
        config: Runtime properties laid over the artifact's ``runtime_config`` (OpenVINO compile properties such
            as ``PERFORMANCE_HINT``; ONNX Runtime session options such as ``intra_op_num_threads``).
        expected_version: The ``model_version`` a sealed artifact must have (`load_artifact`).
        variant: A sealed OpenVINO artifact's input variant (`open_artifact`): ``host`` (default), ``graph``, or None
            for the one its manifest ships.

    Raises:
        ArtifactError: An unknown precision, a path that holds no artifact, a failed checksum or version, a
            precision other than the manifest's, or a model the runtime cannot load.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ArtifactError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    if isinstance(path, Artifact):
        return open_artifact(_checked(path, precision), config, variant)
    p = Path(path)
    if p.is_file() and p.suffix in SUFFIX_FORMAT:
        if (p.parent / MANIFEST).is_file():
            return open_artifact(_checked(load_artifact(p.parent, expected_version), precision), config, variant)
        return _open_bare(p, precision, config)
    if p.is_dir():
        for name in (precision,) if precision else (SERVED, SOURCE):
            if (artifact_dir(p, name) / MANIFEST).is_file():
                art = load_artifact(artifact_dir(p, name), expected_version)
                return open_artifact(_checked(art, precision), config, variant)
        if (p / MANIFEST).is_file():
            return open_artifact(_checked(load_artifact(p, expected_version), precision), config, variant)
    raise ArtifactError(
        f"{p}: no sealed artifact {'of ' + precision + ' ' if precision else ''}there; pass an export dir, an "
        "artifact dir with manifest.json or its model file (run `sensitune export`)"
    )


def _checked(artifact: Artifact, precision: str | None) -> Artifact:
    """`artifact`, refused when a `precision` was asked for and its manifest says another one."""
    row = for_manifest(artifact.format, artifact.precision)
    if precision is not None and (row is None or row.name != precision):
        if row is not None and row.name == SOURCE:  # an export dir whose sub-dir for `precision` was not built
            missing = artifact_dir(artifact.dir, precision)
            raise ArtifactError(f"{artifact.dir}: no {precision} artifact in this export ({missing} is missing); add "
                                f"{precision} to export.precisions and re-export")  # fmt: skip
        held = row.name if row else f"{artifact.format} {artifact.precision}"
        where = artifact_dir("<export dir>", precision)
        raise ArtifactError(f"{artifact.dir}: holds {held}, not {precision}; open {where} for {precision}")
    return artifact


def _open_bare(path: Path, precision: str | None, config: Mapping[str, Any] | None) -> Inferencer:
    """A model file with no manifest yet, compiled with the runtime config of its precision's row."""
    fmt = SUFFIX_FORMAT[path.suffix]
    name = precision or (SERVED if fmt == "openvino" else SOURCE)
    row = PRECISIONS[name]
    if row.format != fmt:
        raise ArtifactError(f"{path}: an {fmt} file, but precision {name} is {row.format}; pass its {row.format} file")
    merged = dict(row.runtime_config) | dict(config or {})
    if fmt == "openvino":
        return OpenVINOInferencer(path.with_suffix(".xml"), merged)
    return OnnxRuntimeInferencer(path, merged)
