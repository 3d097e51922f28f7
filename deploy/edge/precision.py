"""Every export precision as one row of plain data: the runtime that runs it, where it lies in an export, how much
accuracy it may lose, whether it is calibrated, and how the compile side builds it.

The one place that knows the layout of an export directory::

    exports/3/                       model.onnx + manifest.json     row "onnx" (the source of every other row)
      openvino/fp32/ fp16/ int8/     model.xml + model.bin + manifest.json
      onnx/int8/                     model.onnx + manifest.json     (opt-in: ONNX Runtime static INT8)

Readers: `deploy.compile.export` (what to build, where), `deploy.compile.build` (a `Precision.build` -> a function),
`deploy.compile.verify` (exact or within ``max_drop``), `deploy.edge.artifact` (which manifest precisions a format
may carry, their ``runtime_config``), `deploy.edge.inferencer` (an export dir + a name -> the artifact dir), the
config's ``export.precisions`` choices, publish, sync and the benchmarks. Adding a precision is one row here and its
build function in `deploy.compile.build`.

Torch-free and import-free (stdlib only): the edge box and the CLI's config both read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

# f32 compute for every OpenVINO row: FP16 here means FP16-*stored* weights (half the download), decompressed on the
# CPU; INT8 keeps its non-quantized ops in f32. Left to the plugin, compute precision follows the edge box's ISA
# (bf16 on AVX512-BF16/AMX: Lite0 logits move by ~0.4), so the accuracy verified at export would not be the edge's.
_OV_F32: Mapping[str, str] = MappingProxyType({"INFERENCE_PRECISION_HINT": "f32"})
_NONE: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Precision:
    """One export precision.

    Attributes:
        name: The key in ``export.precisions``, ``export_report.json`` and `deploy.compile.verify.verify`.
        format: The manifest's ``format`` (``"openvino"`` or ``"onnx"``): which inferencer runs it.
        weights: The manifest's ``precision``: how the weights are stored (``"fp32"``, ``"fp16"``, ``"int8"``).
        path: The artifact directory, relative to the export directory (``"."``: the export directory itself).
        max_drop: Accuracy points it may lose against PyTorch and stay promotable; None: it must match PyTorch's
            logits within the parity tolerance (an exact conversion, no accuracy budget).
        calibration: Built from calibration images; its manifest records their fingerprint.
        build: How `deploy.compile.build` makes it from the ONNX file (a key of its ``BUILDERS``); the ONNX file
            itself comes from `deploy.compile.export.export_onnx`.
        default: Built when ``export.precisions`` is not given (the main job's outputs).
        runtime_config: Runtime properties stored in the manifest and applied wherever it is compiled.
    """

    name: str
    format: str
    weights: str
    path: str
    max_drop: float | None
    calibration: bool
    build: str
    default: bool
    runtime_config: Mapping[str, str] = field(default_factory=lambda: _NONE)

    @property
    def exact(self) -> bool:
        """Judged by logit parity with PyTorch rather than by an accuracy budget."""
        return self.max_drop is None


TABLE: tuple[Precision, ...] = (
    # name       format      weights  path             max_drop calibration build          default runtime_config
    Precision("onnx", "onnx", "fp32", ".", None, False, "export_onnx", True),  # torch.onnx, not a BUILDERS entry
    Precision("fp32", "openvino", "fp32", "openvino/fp32", None, False, "openvino", True, _OV_F32),
    Precision("fp16", "openvino", "fp16", "openvino/fp16", 1.0, False, "openvino", True, _OV_F32),
    Precision("int8", "openvino", "int8", "openvino/int8", 1.0, True, "openvino", True, _OV_F32),
    Precision("onnx_int8", "onnx", "int8", "onnx/int8", 1.0, True, "onnxruntime_int8", False),
)
PRECISIONS: Mapping[str, Precision] = MappingProxyType({p.name: p for p in TABLE})
SOURCE = "onnx"  # always built: every other row is made from this file
BUILDABLE = tuple(p.name for p in TABLE if p.name != SOURCE)  # what ``export.precisions`` may name
DEFAULT = tuple(p.name for p in TABLE if p.default and p.name != SOURCE)
SERVED = "fp32"  # what the edge serves and `sensitune predict` opens in an export directory by default
# What a box serves, best first: the smallest download whose accuracy held. A box set to a precision serves it when
# promotable, else the next one down this list; fp32 is exact, so it is the last resort of every chain.
FALLBACK = ("int8", "fp16", "fp32")


def artifact_dir(export_dir: str | Path, name: str) -> Path:
    """Where precision `name` lies in an export directory (``exports/3`` + ``int8`` -> ``exports/3/openvino/int8``)."""
    return Path(export_dir) / PRECISIONS[name].path


def for_manifest(fmt: str, weights: str) -> Precision | None:
    """The row a manifest's ``format`` and ``precision`` describe, or None when no row does."""
    return next((p for p in TABLE if (p.format, p.weights) == (fmt, weights)), None)


def weights_of(fmt: str) -> list[str]:
    """The manifest precisions a format may carry (``openvino`` -> fp32, fp16, int8)."""
    return [p.weights for p in TABLE if p.format == fmt]


def fallback_chain(wanted: str) -> tuple[str, ...]:
    """The precisions a box set to `wanted` may serve, in order (``int8`` -> int8, fp16, fp32; ``fp32`` -> fp32)."""
    return FALLBACK[FALLBACK.index(wanted) :] if wanted in FALLBACK else (wanted,)


def choose_served(wanted: str, verdicts: Mapping[str, Mapping]) -> tuple[str | None, str]:
    """Which precision serves, and why in one line: the first of `fallback_chain(wanted)` that is exported and not
    refused by export verification.

    Both sides ask this one rule: the box (`verdicts` from each precision's manifest) and the hand-over gate (from
    export_report.json), so that the gate judges the very artifact the boxes will pull.

    Args:
        wanted: The precision the boxes are set to (box.yaml ``registry.precision``, params ``publish.precision``).
        verdicts: Per exported precision: ``promotable`` (bool, or None when not recorded: allowed, as acceptance
            allows it), and optionally ``accuracy_drop`` and ``max_drop`` (points) and ``escapes`` and
            ``pytorch_escapes`` (defects accepted at the operating point) for the reason. A precision left out was
            not exported.

    Returns:
        (precision or None when none of the chain may serve, reason), e.g.
        ``("fp16", "int8 not promotable: drop 9.2 pt > 1.0; serving fp16")``.
    """
    skipped = []
    for name in fallback_chain(wanted):
        v = verdicts.get(name)
        if v is None:
            skipped.append(f"{name} not exported")
        elif v.get("promotable") is False:
            skipped.append(f"{name} not promotable{_refused_why(name, v)}")
        else:
            return name, "; ".join([*skipped, f"serving {name}"])
    return None, "; ".join([*skipped, "nothing promotable to serve"])


def _refused_why(name: str, v: Mapping) -> str:
    """Why a precision is not promotable: more escapes than PyTorch at the operating point, else its accuracy drop."""
    drop, budget = v.get("accuracy_drop"), v.get("max_drop", PRECISIONS[name].max_drop if name in PRECISIONS else None)
    if not isinstance(drop, (int, float)):
        return " (export verification failed)"
    escapes, reference = v.get("escapes"), v.get("pytorch_escapes")
    if isinstance(escapes, int) and isinstance(reference, int) and escapes > reference:
        return f": {escapes} escapes at the operating point > PyTorch's {reference} (drop {drop:.1f} pt)"
    return f": drop {drop:.1f} pt > {budget}" if isinstance(budget, (int, float)) else f": drop {drop:.1f} pt"


def report_verdicts(report: Mapping) -> dict[str, dict]:
    """`choose_served`'s verdicts from an export_report.json (`deploy.compile.verify.verify`'s report)."""
    drops, escapes = report.get("accuracy_drop") or {}, report.get("escapes") or {}
    return {name: {"promotable": ok, "accuracy_drop": drops.get(name), "max_drop": report.get(f"{name}_max_drop"),
                   "escapes": escapes.get(name), "pytorch_escapes": escapes.get("pytorch")}
            for name, ok in (report.get("promotable") or {}).items()}  # fmt: skip


def manifest_verdict(manifest: Mapping) -> dict:
    """One precision's `choose_served` verdict from its sealed manifest (``promotable``, ``verification``)."""
    v = manifest.get("verification") or {}
    return {"promotable": manifest.get("promotable"), "accuracy_drop": v.get("accuracy_drop"),
            "escapes": v.get("escapes"), "pytorch_escapes": v.get("pytorch_escapes")}  # fmt: skip
