"""The artifact contract: what a sealed model directory holds, how `manifest.json` is built, and how it is read.

One directory per model version and format (docs/ARCHITECTURE.md, "Artifacts")::

    model.xml + model.bin (format "openvino")  or  model.onnx (format "onnx"); the precisions each format may
                    carry and their runtime_config are the rows of `deploy.edge.precision`
    manifest.json   format, precision, model_version, class names, preprocessing, input/output names, the
                    sha256 of every model file, runtime_config, the versions that built it; the operating
                    point (`spt_core.portable.operating_point`): ``ok_class`` (the good class), ``threshold``
                    (reject when P(ok_class) < threshold) and the ``max_escape_rate`` it was chosen for on validation;
                    ``input_variant`` (host, the default, or graph: the box feeds decoded frames) with the spec and
                    measured parity of the in-graph preprocessing, ``graph_preprocess`` (`deploy.edge.graph_spec`)

`deploy.compile.export` seals directories with `build_manifest` + `seal`; the edge service, `deploy.compile.verify`
and the
benchmarks read them with `load_artifact`, which trusts nothing: directory, manifest, file names and every
listed file's sha256 are checked, each failure a one-line `ArtifactError`. Each file is read once: the bytes that
were hashed are the bytes kept in `Artifact.data` and compiled from memory (`deploy.edge.inferencer`), so a file
changed,
truncated or replaced on disk afterwards cannot change what serves (nor SIGBUS a memory map).

Torch-free (json + spt_core's torch-free leaves): the edge box imports this module.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deploy.edge.graph_spec import GRAPH, GraphSpec, input_variant
from deploy.edge.precision import for_manifest, weights_of
from spt_core.portable.errors import DataError, SensituneError, check_class_name, one_line
from spt_core.portable.io import file_sha256, write_text
from spt_core.portable.operating_point import OperatingPoint
from spt_core.portable.preprocess import Preprocess

MANIFEST = "manifest.json"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MODEL_FILES = {"openvino": ("model.xml", "model.bin"), "onnx": ("model.onnx",)}  # the first one is compiled
REQUIRED_KEYS = ("format", "precision", "model_version", "class_names", "preprocess", "files")
# Keys `build_manifest` computes itself; `extra` may add keys but not replace these.
_OWN_KEYS = frozenset(
    "format precision model_version model_name class_names num_classes preprocess input_name output_name "
    "sensitune_version plan_hash data_version files created versions".split()
)


class ArtifactError(SensituneError):
    """An artifact directory that cannot be sealed, trusted or loaded (missing file, checksum, version, bad IR)."""


@dataclass(frozen=True)
class Artifact:
    """A sealed artifact directory whose model files matched their manifest checksums when it was loaded.

    Attributes:
        dir: The artifact directory.
        manifest: ``manifest.json`` as read.
        format: ``"openvino"`` or ``"onnx"``.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"`` (the weights; `deploy.edge.precision` lists each format's).
        version: ``model_version`` (a string).
        class_names: One name per logit, in logit order.
        preprocess: The preprocessing the model takes.
        files: Every file the manifest lists -> its path (sha256-verified).
        data: Every file the manifest lists -> the bytes read and verified (what a runtime compiles).
    """

    dir: Path
    manifest: dict[str, Any]
    format: str
    precision: str
    version: str
    class_names: list[str]
    preprocess: Preprocess
    files: dict[str, Path]
    data: Mapping[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    @property
    def model_path(self) -> Path:
        """The file a runtime compiles: ``model.xml`` (its ``model.bin`` beside it) or ``model.onnx``."""
        return self.files[MODEL_FILES[self.format][0]]

    @property
    def runtime_config(self) -> dict[str, Any]:
        """OpenVINO compile properties the artifact was verified with (empty for ONNX)."""
        return dict(self.manifest.get("runtime_config") or {})

    @property
    def operating_point(self) -> OperatingPoint:
        """The decision the manifest carries: the good class, the reject threshold on P(good) and the escape ceiling
        it was chosen for (checked when the artifact was loaded)."""
        return OperatingPoint.from_dict(self.manifest, where=str(self.dir / MANIFEST))

    def decide(self, probs: Any) -> dict[str, Any]:
        """One softmax vector -> ``p_good`` and ``decision`` at the manifest's operating point
        (`OperatingPoint.answer`): what `predict` and the edge serve."""
        return self.operating_point.answer(probs, self.class_names)

    @property
    def input_variant(self) -> str:
        """``graph`` when export shipped the in-graph preprocessing (`deploy.edge.graph_spec`), else ``host``."""
        return input_variant(self.manifest, str(self.dir / MANIFEST))

    @property
    def graph_spec(self) -> GraphSpec | None:
        """How the box builds the graph variant (the manifest's ``graph_preprocess``); None for a host artifact."""
        if self.input_variant != GRAPH:
            return None
        return GraphSpec.from_dict(self.manifest["graph_preprocess"], self.preprocess, str(self.dir / MANIFEST))

    @property
    def promotable(self) -> bool | None:
        """False when export's verification gate failed for this artifact; None when not recorded."""
        return self.manifest.get("promotable")


def _model_format(artifact_dir: Path) -> str:
    """The format the files present give: ``model.xml`` -> openvino, else ``model.onnx`` -> onnx."""
    if (artifact_dir / "model.xml").is_file():
        return "openvino"
    if (artifact_dir / "model.onnx").is_file():
        return "onnx"
    raise ArtifactError(f"{artifact_dir} holds neither model.xml nor model.onnx: compile the model into it first")


def build_manifest(
    artifact_dir: str | Path,
    *,
    precision: str,
    model_name: str,
    class_names: Sequence[str],
    pre: Preprocess,
    model_version: str | int,
    plan_hash: str | None,
    data_version: str | None,
    versions: Mapping[str, str],
    onnx_opset: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest for an unsealed artifact directory (the contract in docs/ARCHITECTURE.md); writes nothing.

    The format follows the files present (``model.xml`` -> openvino, else ``model.onnx`` -> onnx); each model
    file's sha256 is recorded.

    Args:
        artifact_dir: Directory holding the model files and no manifest yet.
        precision: The stored weights, one a row of `deploy.edge.precision` gives this format (openvino: fp32,
            fp16, int8; onnx: fp32, int8).
        model_name: timm model name.
        class_names: One name per logit, in logit order.
        pre: The preprocessing the model was trained with.
        model_version: Version this artifact belongs to (stored as a string).
        plan_hash: Hash of the SPT plan that made the model, if any.
        data_version: Data version (e.g. DVC hash) the model was trained on, if known.
        versions: The toolchain that built it (``{"sensitune": ..., "openvino": ..., ...}``); ``versions
            ["sensitune"]`` is also stored as ``sensitune_version``.
        onnx_opset: The ONNX file's opset, stored for onnx artifacts.
        extra: Further keys: ``runtime_config`` (replaces the default), ``promotable``, ``verification``,
            ``onnx_opset``; a calibrated precision requires ``calibration``
            (`deploy.compile.quantize.calibration_fingerprint`).

    Returns:
        The manifest, for `seal`.

    Raises:
        ArtifactError: Missing directory/model files, existing manifest, bad precision, or ``extra`` overriding a
            computed key.
    """
    d = Path(artifact_dir)
    extra = dict(extra or {})
    if not d.is_dir():
        raise ArtifactError(f"artifact dir {d} does not exist: compile the model into it first")
    if (d / MANIFEST).exists():
        raise ArtifactError(f"{d / MANIFEST} exists: a sealed artifact is never rewritten; export a new model_version")
    fmt = _model_format(d)
    if (row := for_manifest(fmt, precision)) is None:
        raise ArtifactError(f"precision={precision!r} for a {fmt} artifact: use one of {', '.join(weights_of(fmt))}")
    if row.calibration and "calibration" not in extra:
        raise ArtifactError(f"{d}: {precision} manifest needs extra['calibration'] (use calibration_fingerprint)")
    if clash := sorted(_OWN_KEYS & extra.keys()):
        raise ArtifactError(f"write_manifest extra overrides computed key(s) {clash}: drop them from extra")
    for name in MODEL_FILES[fmt]:
        if not (d / name).is_file():
            raise ArtifactError(f"{d / name} is missing: re-run compile_openvino")
    manifest: dict[str, Any] = {
        "format": fmt,
        "precision": precision,
        "model_version": str(model_version),
        "model_name": model_name,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "preprocess": pre.to_dict(),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": [-1, 3, *pre.size],
        "sensitune_version": versions["sensitune"],
        "plan_hash": plan_hash,
        "data_version": data_version,
        "files": {name: file_sha256(d / name) for name in MODEL_FILES[fmt]},
        "runtime_config": dict(row.runtime_config),
        "versions": dict(versions),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if fmt == "onnx" and onnx_opset is not None:
        manifest["onnx_opset"] = onnx_opset
    manifest.update(extra)
    return manifest


def seal(artifact_dir: str | Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` atomically; a directory that already has one is sealed and never rewritten."""
    path = Path(artifact_dir) / MANIFEST
    if path.exists():
        raise ArtifactError(f"{path} exists: a sealed artifact is never rewritten; export a new model_version")
    write_text(path, json.dumps(manifest, indent=2) + "\n")


def read_manifest(artifact_dir: str | Path) -> dict[str, Any]:
    """The checked ``manifest.json`` of an artifact directory, without reading its model files: for readers that need
    only what the manifest declares (the rollout statistics' operating point, the operator pages' model list).

    Raises:
        ArtifactError: Missing directory or manifest, unreadable or invalid JSON, a missing key, an invalid format
            or file list, malformed preprocess or class names, or an invalid operating point.
    """
    d = Path(artifact_dir)
    if not d.is_dir():
        raise ArtifactError(f"artifact dir {d} does not exist: check the path or run `sensitune export`")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{mpath} is missing: cannot read the artifact manifest; re-copy or re-export the artifact")
    try:
        m = json.loads(mpath.read_text())
    except OSError as e:
        raise ArtifactError(f"{mpath}: cannot read the artifact manifest ({one_line(e)}); check its permissions") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ArtifactError(f"{mpath} is not valid JSON ({one_line(e)}): re-copy the artifact or re-export it") from e
    if not isinstance(m, dict) or (missing := [k for k in REQUIRED_KEYS if k not in m]):
        what = f"lacks {missing}" if isinstance(m, dict) else "is not a JSON object"
        raise ArtifactError(f"{mpath} {what}: it was not written by sensitune export; re-export the artifact")
    fmt, listed = m["format"], m["files"]
    if fmt not in MODEL_FILES or not isinstance(listed, dict):
        raise ArtifactError(f"{mpath}: format={fmt!r} or files={listed!r} is invalid; re-export the artifact")
    for name in MODEL_FILES[fmt]:
        if name not in listed:
            raise ArtifactError(f"{mpath} has no checksum for {name}: re-export the artifact")
    try:
        Preprocess.from_dict(m["preprocess"])
        class_names = [str(c) for c in m["class_names"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{mpath}: preprocess or class_names is malformed ({one_line(e)}); re-export it") from e
    try:  # absent: host preprocessing (artifacts from before the graph variant)
        input_variant(m, str(mpath))
    except ValueError as e:
        raise ArtifactError(f"{e}; re-export it (a newer export: update this box's sensitune)") from None
    try:  # a name that is served, logged and shown on the operator pages must be plain text
        for c in class_names:
            check_class_name(c, str(mpath))
    except DataError as e:
        raise ArtifactError(f"{e}; then re-export the artifact") from None
    try:
        op = OperatingPoint.from_dict(m, where=str(mpath))
    except SensituneError as e:
        raise ArtifactError(f"{e} (or re-export the artifact)") from None
    if op.ok_class is not None and op.ok_class not in class_names:
        raise ArtifactError(f"{mpath}: ok_class={op.ok_class!r} is not one of {class_names}; re-export it")
    return m


def load_artifact(artifact_dir: str | Path, expected_version: str | None = None) -> Artifact:
    """Read a sealed artifact directory (`read_manifest`) and check the sha256 of every file its manifest lists.

    Args:
        artifact_dir: A directory sealed by `deploy.compile.export` (or `build_manifest` + `seal`).
        expected_version: The version the rollout manifest names; the artifact's ``model_version`` must equal it.

    Returns:
        The verified `Artifact`.

    Raises:
        ArtifactError: Missing directory, missing/corrupt/incomplete manifest, a file name leaving the directory,
            a missing file, a checksum mismatch, or another ``model_version``.
    """
    d = Path(artifact_dir)
    m = read_manifest(d)
    mpath, fmt, listed = d / MANIFEST, m["format"], m["files"]
    files: dict[str, Path] = {}
    data: dict[str, bytes] = {}
    for name, digest in listed.items():
        path = d / name
        if Path(name).name != name:  # a manifest must not point outside its own directory
            raise ArtifactError(f"{mpath}: file name {name!r} leaves the artifact dir; re-export the artifact")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: re-copy the whole artifact dir or re-export it")
        try:
            data[name] = path.read_bytes()  # read once: these very bytes are hashed and compiled
        except OSError as e:
            raise ArtifactError(f"{path}: cannot read it ({one_line(e)}); check its permissions") from e
        if (actual := hashlib.sha256(data[name]).hexdigest()) != digest:
            raise ArtifactError(
                f"{path}: sha256 differs from manifest.json ({actual[:12]}... does not match {str(digest)[:12]}...): "
                "the file is corrupt or was changed in place; re-copy the artifact or publish a new version"
            )
        files[name] = path
    version = str(m["model_version"])
    if expected_version is not None and version != expected_version:
        raise ArtifactError(f"{mpath}: model_version={version!r} but the rollout manifest says {expected_version!r}")
    pre, class_names = Preprocess.from_dict(m["preprocess"]), [str(c) for c in m["class_names"]]  # checked above
    return Artifact(d, m, fmt, str(m["precision"]), version, class_names, pre, files, data)
