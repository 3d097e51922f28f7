"""params.yaml: the one config users edit, as typed sections. These dataclasses are the only defaults.

Every CLI verb, DVC stage and Prefect task reads the same params: the section dataclasses below, filled from
params.yaml and then from flags (`--set section.key=value`, or a verb's own flags, which are derived from the
fields' metadata). Unknown sections or keys, and values of the wrong type, are reported all at once (a typo is
never ignored). params.yaml lists every key with the value given here (a test keeps them equal): DVC sees them.

At run time params are plain data, ``{"section": {"key": value}}``: stages read them, DVC hashes them, Prefect
passes them between tasks and MLflow logs them flattened.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from deploy.compile.quantize import INT8_RECOVERY
from deploy.edge.graph_spec import GRAPH_MODES
from deploy.edge.precision import BUILDABLE, FALLBACK, PRECISIONS
from deploy.edge.precision import DEFAULT as DEFAULT_PRECISIONS
from spt_core.portable.errors import SensituneError, one_line
from spt_core.portable.metrics import BALANCE, SELECT

Params = dict[str, dict[str, Any]]
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _f(default: Any, help: str, *, verbs: tuple[str, ...] = (), flag: str | None = None, choices: Any = None) -> Any:
    """A config field: its default, its help text, and the verbs that get it as a flag (``--key`` by default)."""
    meta = {"help": help, "verbs": verbs, "flag": flag, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PathsSection:
    raw: str = _f("data/raw", "incoming images (ImageFolder); `dvc add data/raw` after new batches arrive")
    data: str = _f("data/prepared", "prepared train/val/test split")
    run: str = _f("runs/main", "sensitivity, plan, tuned weights, metrics, merged model, export, MLflow record")


@dataclass
class DemoSection:
    n_per_class: int = _f(100, "images per class", verbs=("demo",))
    size: int = _f(96, "image side in pixels", verbs=("demo",))
    seed: int = _f(0, "generator seed", verbs=("demo",))
    batch: int = _f(0, "data batch number (new batches = new defect data)", verbs=("demo",))
    counts: list[int] | None = _f([340, 24, 16, 10], "images of ok, scratch, spot, crack: a line's imbalance (null = "
                                  "n_per_class each)")  # fmt: skip
    bit_depth: int | None = _f(None, "null: 8-bit RGB PNGs; 10/12/16: mono 16-bit PNGs as a Mono10/12/16 camera",
                               verbs=("demo",))  # fmt: skip


@dataclass
class DataSection:
    source: str = _f("raw", "raw (= paths.raw) | demo-defects | digits | fashion-mnist | DIR | CSV/JSONL | VTAB dir",
                     verbs=("prepare",))  # fmt: skip
    split: list[float] | None = _f([0.7, 0.15, 0.15], "train/val/test fractions of every class, every image used "
                                   "(null = the count mode: n_train, n_val, n_test)")  # fmt: skip
    min_per_class: int = _f(2, "split: the fewest images of a class in val and in test", verbs=("prepare",))
    n_train: int | None = _f(None, "count mode (split: null): train images, class-balanced (null = all)",
                             verbs=("prepare",))  # fmt: skip
    n_val: int | None = _f(None, "count mode: validation images", verbs=("prepare",))
    n_test: int | None = _f(None, "count mode: test images (null = the rest)", verbs=("prepare",))
    ok_class: str | None = _f("ok", "the good class's name, checked against the classes (null = no good class: "
                              "plain classification, no escape/overkill/threshold)",
                              verbs=("prepare", "init"))  # fmt: skip
    bit_depth: int | None = _f(None, "bits of 16/32-bit frames, e.g. 12 for Mono12 in 16-bit files (null = measured "
                               "from the frames; a declared one must fit them)", verbs=("prepare",))  # fmt: skip
    seed: int = _f(0, "subset seed", verbs=("prepare",))
    file_size: int | None = _f(None, "resize the image files on disk to this side (null = keep)", verbs=("prepare",))
    skip_bad: bool = _f(False, "skip unreadable or non-image files instead of failing", verbs=("prepare",))


@dataclass
class ModelSection:
    name: str = _f("tf_efficientnet_lite0", "timm model name", verbs=("measure", "run"), flag="--model")
    weights: str = _f("embedded", "embedded | hub | none | PATH (.safetensors/.pth/.bin)", verbs=("measure", "run"))
    input_size: int | Literal["auto"] | None = _f(
        "auto", "input side in pixels (a ViT's: whole patches), or auto (the training images' median side on the "
        "model's grid, 32 px or a ViT's patch, 64..128: spt_core.model.input_size_for)", verbs=("measure", "run"))
    drop_path_rate: float = _f(0.1, "stochastic depth rate while tuning")


@dataclass
class SensitivitySection:
    batches: int = _f(16, "mini-batches to measure (as SPT)", verbs=("measure", "run"))
    batch_size: int = _f(32, "images per batch (as SPT)", verbs=("measure",))
    head: str = _f("probe", "probe (fit the head first) | random (SPT)", verbs=("measure", "run"),
                   choices=("probe", "random"))  # fmt: skip
    probe_epochs: int = _f(50, "linear-probe epochs before measuring")
    device: str = _f("auto", "auto | cpu | cuda[:N]", verbs=("measure",))
    amp: bool = _f(False, "bf16 autocast forward on CUDA, fp32 gradients and sums (less memory); CPU: fp32 always",
                   verbs=("measure",))  # fmt: skip
    include_stem: bool = _f(False, "measure the stem too (frozen otherwise, as in SPT): plan.whole: [stem] needs it")


@dataclass
class PlanSection:
    budget: str = _f("2%", "trainable values: 400000, 0.4M, 400k or 0.5%% of the backbone, or auto (the ladder's "
                     "budget with the best validation score)", verbs=("plan", "run"))  # fmt: skip
    ladder: list[str] = _f(["0.25%", "0.5%", "1%", "2%", "4%", "8%", "full"],
                           "budget: auto tries these, smallest first; full = every backbone value")  # fmt: skip
    search: str = _f("ladder", "how budget: auto chooses: ladder (one training per rung) | halving (every rung x "
                     "train.lr_grid, pruned on validation by successive halving: at most 2 trainings)",
                     choices=("ladder", "halving"))  # fmt: skip
    structured: str = _f("none", "none (sparse deltas only) | lora | adapter (allocation: global)",
                         verbs=("plan", "run"))  # fmt: skip
    rank: int = _f(8, "LoRA rank / adapter width", verbs=("plan", "run"))
    alpha: float = _f(10.0, "structured when >= module params/alpha entries are selected", verbs=("plan",))
    beta: float = _f(5.0, "vector trained whole when >= 1/beta of it is selected", verbs=("plan",))
    allocation: str = _f(
        "per_row", "per_row (every output row its top-k entries; structured: none) | global (one top-k, then the "
        "alpha/beta rule)", verbs=("plan", "run"), choices=("per_row", "global"),
    )  # fmt: skip
    whole: list[str] = _f([], "groups trained whole from the budget before the ranking (stem: with sensitivity."
                          "include_stem); spt_core.allocate's WHOLE_GROUPS", choices=("depthwise", "norm", "stem"))
    row_k: str = _f("count", "per_row: one count of every row's entries, or one share", choices=("count", "share"))


@dataclass
class TrainSection:
    epochs: int = _f(8, "epochs", verbs=("train", "run"))
    lr: float = _f(3e-3, "peak learning rate", verbs=("train", "run"))
    lr_grid: list[float] = _f([1.0], "plan.search: halving tries these multiples of train.lr")
    weight_decay: float = _f(1e-4, "AdamW weight decay (not on 1-D values)", verbs=("train",))
    warmup_epochs: int = _f(1, "linear warm-up epochs", verbs=("train",))
    warmup_lr: float = _f(1e-6, "learning rate at the start of warm-up")
    min_lr: float = _f(1e-5, "learning rate at the end of the cosine schedule")
    batch_size: int = _f(32, "batch size", verbs=("train",))
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing")
    freeze_bn_stats: bool = _f(True, "keep BatchNorm running statistics frozen while tuning")
    amp: bool = _f(True, "bf16/fp16 autocast on CUDA")
    device: str = _f("auto", "auto | cpu | cuda[:N]", verbs=("train",))
    seed: int = _f(0, "seed (also of the head and the sensitivity batch order)", verbs=("train",))
    grad_clip: float | None = _f(None, "clip the gradient norm (null = off)")
    balance: str = _f("auto", "none | loss (class-weighted) | sampler (class-balanced batches) | both | auto (sampler"
                      " on an imbalanced split: largest class >= 2x smallest)", verbs=("train", "run"), choices=BALANCE)
    select: str = _f(
        "balanced_accuracy", "validation metric that picks the epoch: accuracy | balanced_accuracy | "
        "overkill_at_escape (lowest overkill under evaluate.max_escape_rate) | loss (lowest val loss); ties: "
        "the lower val loss",
        verbs=("train",), choices=SELECT,
    )  # fmt: skip
    augment: bool = _f(False, "timm train-time augmentation: flips, small zoom/shift, colour jitter", verbs=("train",))
    aug_flip: float = _f(0.5, "augment: probability of a horizontal and of a vertical flip")
    aug_scale: list[float] = _f([0.85, 1.0], "augment: random-resized-crop area range")
    aug_color_jitter: float = _f(0.1, "augment: brightness/contrast/saturation jitter")
    head_init: str = _f("random", "probe (start from the linear-probe head, LP-FT) | random (as SPT)",
                        verbs=("train", "run"), choices=("probe", "random"))  # fmt: skip
    probe_baseline: bool = _f(True, "also fit a linear probe on the same split: the yardstick of "
                                "train.below_probe (metrics.json probe_*)")  # fmt: skip
    probe_epochs: int = _f(50, "linear-probe epochs")
    below_probe: str = _f(
        "export_probe", "when no candidate beats the linear probe on validation (train.probe_baseline): "
        "export_probe (the probe is the model: merged, exported, published, marked model: probe) | stop (exit 3, "
        "nothing exported)",
        verbs=("train", "run"), choices=("export_probe", "stop"),
    )  # fmt: skip


@dataclass
class EvaluateSection:
    max_escape_rate: float = _f(0.005, "escape ceiling: the reject threshold on P(good) is chosen on validation to "
                                "meet it with the least overkill", verbs=("train", "run"))  # fmt: skip


@dataclass
class ExportSection:
    precisions: list[str] = _f(list(DEFAULT_PRECISIONS), "precisions to export besides model.onnx (rows of "
                               "deploy.edge.precision; onnx_int8 is opt-in)", choices=BUILDABLE)  # fmt: skip
    calibration_size: int = _f(160, "INT8 calibration images", verbs=("export",))
    int8_max_drop: float = _f(PRECISIONS["int8"].max_drop, "max INT8 accuracy loss in points", verbs=("export",))
    int8_recovery: str = _f("ignored_scope", "INT8 over its max drop is retried before it is declared not "
                            "promotable: ignored_scope (stem and classifier in float) | accuracy_control (NNCF, on "
                            "the validation split) | none", verbs=("export",), choices=INT8_RECOVERY)  # fmt: skip
    opset: int = _f(18, "ONNX opset (the torch dynamo exporter implements >= 18)")
    model_version: str = _f("auto", "version label of the artifacts (auto = the plan hash)", verbs=("export",))
    graph_preprocess: str = _f("auto", "OpenVINO artifacts that take decoded frames (resize and normalise in the "
                               "graph): auto (where the parity gate on the test split passes, else host "
                               "preprocessing) | on (a failed gate fails the export) | off", verbs=("export",),
                               choices=GRAPH_MODES)  # fmt: skip
    graph_parity_min_agreement: float = _f(99.0, "the graph variant's top-1 agreement in percent with host "
                                           "preprocessing, at least", verbs=("export",))  # fmt: skip
    graph_parity_max_dp: float = _f(0.01, "the graph variant's largest |P(ok) difference| from host preprocessing",
                                    verbs=("export",))  # fmt: skip


@dataclass
class PublishSection:
    model_name: str | None = _f(None, "registered model name (null = sensitune-<model.name>)", verbs=("publish",))
    experiment: str = _f("sensitune", "MLflow experiment", verbs=("publish",))
    challenger: str = _f("publish", "publish (a new version becomes challenger, except in a `dvc exp run` sweep) | "
                         "always | never", verbs=("publish",), choices=("publish", "always", "never"))  # fmt: skip
    precision: str = _f("fp32", "the precision the boxes are set to (box.yaml registry.precision): the hand-over gate "
                        "judges what they will serve, it or the next promotable one down int8, fp16, fp32",
                        verbs=("publish",), choices=FALLBACK)  # fmt: skip


SECTIONS: dict[str, type] = {
    "paths": PathsSection, "demo": DemoSection, "data": DataSection, "model": ModelSection,
    "sensitivity": SensitivitySection, "plan": PlanSection, "train": TrainSection, "evaluate": EvaluateSection,
    "export": ExportSection, "publish": PublishSection,
}  # fmt: skip


@dataclass(frozen=True)
class Key:
    """One config key with what the CLI needs to offer it as a flag."""

    section: str
    name: str
    type: Any
    default: Any
    help: str
    verbs: tuple[str, ...]
    flag: str
    choices: Any

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def nullable(self) -> bool:
        return type(None) in typing.get_args(self.type)


def keys() -> list[Key]:
    """Every key of every section, in params.yaml order."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            m = f.metadata
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            flag = m.get("flag") or "--" + f.name.replace("_", "-")
            out.append(Key(section, f.name, hints[f.name], default, m.get("help", ""), m.get("verbs", ()), flag,
                           m.get("choices")))  # fmt: skip
    return out


def defaults() -> Params:
    """The default params: every section with every key."""
    return {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}


def load_params(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Params:
    """The defaults, updated with the YAML file at `path` (None: the defaults) and `overrides` (``"sec.key"``).

    Raises:
        SensituneError: the file is missing or not YAML, or any section, key or value is unknown or of the wrong
            type; every problem is listed in one line.
    """
    params = defaults()
    where = "params"
    if path is not None:
        path, where = Path(path), str(path)
        if not path.is_file():
            raise SensituneError(f"--config {path}: file not found; pass an existing params.yaml or omit --config")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise SensituneError(f"{path}: invalid YAML ({one_line(e)}); fix the file") from e
        if not isinstance(loaded, dict):
            raise SensituneError(f"{path}: expected a mapping of sections (data:, model:, ...) at the top level")
        problems = _merge(params, loaded)
        if problems:
            raise SensituneError(f"{path}: " + "; ".join(problems) + f" (valid sections: {', '.join(SECTIONS)})")
    problems = _merge(params, _nest(overrides or {}), what="flag")
    if problems:
        raise SensituneError("; ".join(problems))
    problems = validate(params)
    if problems:
        raise SensituneError(f"{where}: " + "; ".join(problems))
    return params


def parse_set(text: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``; the value is read as YAML (``null``, ``[fp32]``, ``8``)."""
    dotted, sep, raw = text.partition("=")
    if not sep or dotted.count(".") != 1:
        raise SensituneError(f"--set {text!r}: write section.key=value, e.g. --set train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise SensituneError(f"--set {text!r}: the value is not valid YAML ({one_line(e)})") from e
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 3e-4 as text
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan and .inf: no setting means them
        raise SensituneError(f"--set {text!r}: give a finite number")
    return dotted.strip(), value


def validate(params: Params) -> list[str]:
    """Type and choice problems of every key (empty when all is well)."""
    problems = _cross_problems(params)
    for k in keys():
        value = params[k.section][k.name]
        if not _is_instance(value, k.type):
            problems.append(f"{k.dotted}={value!r} is not {_type_name(k.type)}")
        elif k.choices is not None:
            values = value if isinstance(value, list) else [value]
            bad = [v for v in values if v not in k.choices]
            if bad:
                problems.append(f"{k.dotted}={value!r}: use {' | '.join(map(str, k.choices))}")
    if not problems and (params["plan"]["budget"], params["plan"]["search"]) == ("auto", "halving"):
        from .halving import search_problems  # lazy: torch is imported on this path only

        problems += search_problems(params)
    return problems


def _cross_problems(params: Params) -> list[str]:
    """Keys that are valid alone but not together."""
    d, out = params.get("data", {}), []
    counts = [k for k in ("n_train", "n_val", "n_test") if d.get(k) is not None]
    if d.get("split") is not None and counts:
        out.append(f"data.split and data.{counts[0]} are two split modes: set data.split: null to split by counts, "
                   f"or data.{counts[0]}: null to split proportionally")  # fmt: skip
    if type(size := params.get("model", {}).get("input_size")) is int and size < 1:  # the type takes 0 too
        out.append(f"model.input_size={size!r}: give the side in pixels (e.g. 96), auto or null (the model's own)")
    p = params.get("plan", {})
    if p.get("allocation") == "per_row" and p.get("structured") not in (None, "none"):
        from spt_core.api import structured_choices  # lazy: torch is imported on this path only

        if p["structured"] in structured_choices():  # an unknown kind gets the plan stage's "use one of" line
            out.append(f"plan.allocation=per_row trains single entries only (plan.structured: none); "
                       f"plan.structured={p['structured']} needs plan.allocation: global")  # fmt: skip
    if "stem" in (p.get("whole") or []) and not params.get("sensitivity", {}).get("include_stem"):
        out.append("plan.whole: [stem] needs sensitivity.include_stem: true (the stem is not measured otherwise)")
    if p.get("row_k") == "share" and p.get("allocation") != "per_row":
        out.append("plan.row_k=share shares each output row's entries: it needs plan.allocation: per_row")
    if d.get("ok_class") is None and params.get("train", {}).get("select") == "overkill_at_escape":
        out.append("train.select=overkill_at_escape needs data.ok_class (the good class)")
    return out


def _merge(params: Params, loaded: dict[str, Any], what: str = "key") -> list[str]:
    problems = []
    for section, values in loaded.items():
        if section not in params or not isinstance(values, dict):
            problems.append(f"section {section!r} must be a mapping" if section in params else
                            f"unknown section {section!r}")  # fmt: skip
            continue
        for key, value in values.items():
            if key not in params[section]:
                problems.append(f"unknown {what} {section}.{key}")
            else:
                params[section][key] = copy.deepcopy(value)
    return problems


def _nest(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dotted, value in flat.items():
        section, _, key = dotted.partition(".")
        out.setdefault(section, {})[key] = value
    return out


def _is_instance(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_is_instance(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:  # the named values only: `int | Literal["auto"]` takes 96 or auto, not 96.5 or "big"
        return isinstance(value, str) and value in typing.get_args(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is str:  # a YAML budget of 400000 or a version of 3 reads as a number: both are fine as text
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "text", bool: "true or false"}
    union = typing.get_origin(tp) in (Union, types.UnionType)
    parts = [" or ".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal else names.get(a, str(a))
             for a in (typing.get_args(tp) if union else (tp,)) if a is not type(None)]  # fmt: skip
    return " or ".join(parts) + " or null" * (type(None) in typing.get_args(tp))
