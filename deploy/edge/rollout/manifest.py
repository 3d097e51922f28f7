"""The rollout manifest: which model version serves which cameras of a line, and the rule that judges them.

The manifest (YAML; paths are relative to the manifest's folder; unknown keys are refused)::

    line: line-7
    champion: {version: "3", path: artifacts/v3/fp32}
    challenger: {version: "4", path: artifacts/v4/fp32}   # or null
    challenger_share: 0.25        # fraction of *cameras* on the challenger (sticky per camera)
    cameras: {count: 8, pinned: {cam-3: challenger}}   # count: cameras feeding the box (deploy.edge.serving)
    shadow: false                 # true: the challenger also runs, unserved, on champion frames (paired test)
    ok_class: ok                  # optional: only restates the champion artifact's manifest ok_class (its default)
    log_dir: logs                 # predictions.jsonl, feedback.jsonl, decisions.jsonl
    openvino: {PERFORMANCE_HINT: THROUGHPUT}   # optional: OpenVINO CPU properties over each artifact's runtime_config
    decision: {min_samples: 200, min_gain: 0.0, max_latency_increase: 0.2, max_error_rate: 0.05}
    registry: {tracking_uri: "sqlite:///mlflow.db", model_name: defect-inspector}   # or null
    limits: {max_body_bytes: 16777216, max_pixels: 25000000, formats: [PNG, JPEG, TIFF], ...}   # deploy.edge.limits
    challenger_retry_s: 300       # a challenger missing at start is retried this long before it is rolled back
    device: CPU                   # CPU | GPU | NPU | AUTO; batching: {max_batch: 4} (deploy.edge.serving)
    preprocess: auto              # auto | host | graph: the input variant served (deploy.edge.serving)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.edge.limits import Limits, parse_limits
from deploy.edge.serving import Serving, parse_serving
from spt_core.portable.errors import SensituneError
from spt_core.portable.io import write_text

CHAMPION, CHALLENGER = "champion", "challenger"
PRED_LOG, FEEDBACK_LOG, DECISION_LOG = "predictions.jsonl", "feedback.jsonl", "decisions.jsonl"  # in log_dir
# The share of cameras a newly handed-over challenger gets when nobody names one: the server's retrain flow and a
# box's sync both use it. A manifest without `challenger_share` reads 0 (no camera moves until it says so).
CHALLENGER_SHARE = 0.25


class RolloutError(SensituneError):
    """A rollout manifest, log or decision that cannot be used (one line: what, where, how to fix)."""


@dataclass(frozen=True)
class ModelRef:
    """One model version on the line: its registry version and its artifact directory."""

    version: str
    path: str


@dataclass(frozen=True)
class DecisionRule:
    """When a challenger is promoted or rolled back (see `deploy.edge.rollout.decision.decide`)."""

    min_samples: int = 200  # labelled frames per arm before judging accuracy
    min_gain: float = 0.0  # challenger accuracy - champion accuracy needed to promote
    max_latency_increase: float = 0.2  # allowed relative p50 latency increase (0.2 = +20 %)
    max_error_rate: float = 0.05  # challenger inference errors / attempts (judged by its 95 % lower bound)


@dataclass(frozen=True)
class RegistryRef:
    tracking_uri: str
    model_name: str


@dataclass(frozen=True)
class RolloutConfig:
    """The parsed rollout manifest. `base_dir` (the manifest's folder) resolves relative paths."""

    line: str
    champion: ModelRef
    challenger: ModelRef | None = None
    challenger_share: float = 0.0
    pinned: dict[str, str] = field(default_factory=dict)
    shadow: bool = False
    ok_class: str | None = None  # None: the champion artifact's ok_class (`stats.resolve_operating_point`)
    log_dir: str = "logs"
    openvino: dict[str, Any] = field(default_factory=dict)  # compile properties over the artifact's runtime_config
    decision: DecisionRule = field(default_factory=DecisionRule)
    registry: RegistryRef | None = None
    limits: Limits = field(default_factory=Limits)
    challenger_retry_s: float = 300.0
    serving: Serving = field(default_factory=Serving)  # device, cameras.count, batching, preprocess
    base_dir: Path = Path(".")

    def resolve(self, path: str) -> Path:
        return (self.base_dir / path).resolve()

    @property
    def logs(self) -> Path:
        return self.resolve(self.log_dir)

    def to_dict(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "champion": asdict(self.champion),
            "challenger": asdict(self.challenger) if self.challenger else None,
            "challenger_share": self.challenger_share,
            "cameras": {"pinned": dict(self.pinned)}
            | ({"count": self.serving.cameras} if self.serving.cameras else {}),
            "shadow": self.shadow,
            "ok_class": self.ok_class,
            "log_dir": self.log_dir,
            "openvino": dict(self.openvino),
            "decision": asdict(self.decision),
            "registry": asdict(self.registry) if self.registry else None,
            "limits": self.limits.to_dict(),
            "challenger_retry_s": self.challenger_retry_s,
            **self.serving.to_manifest(),
        }


_TOP_KEYS = ("line", "champion", "challenger", "challenger_share", "cameras", "shadow", "ok_class", "log_dir")
_TOP_KEYS += ("openvino", "decision", "registry", "limits", "challenger_retry_s", "device", "batching", "preprocess")


def _model_ref(value: Any, key: str, errors: list[str]) -> ModelRef | None:
    if not isinstance(value, dict) or set(value) != {"version", "path"}:
        errors.append(f"{key}: give {{version: <registry version>, path: <artifact dir>}}, got {value!r}")
        return None
    version, path = value["version"], value["path"]
    if not isinstance(version, (str, int)) or isinstance(version, bool) or not str(version):
        errors.append(f"{key}.version={version!r}: give the registry version as a string, e.g. '3'")
        return None
    if not isinstance(path, str) or not path:
        errors.append(f"{key}.path={path!r}: give the artifact directory (model.xml, model.bin, manifest.json)")
        return None
    return ModelRef(str(version), path)


def _number(value: Any, key: str, lo: float, hi: float, errors: list[str], integer: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        errors.append(f"{key}={value!r}: give a{'n integer' if integer else ' number'} in [{lo}, {hi}]")
        return None
    return value


def parse_config(data: Any, base_dir: Path, source: str = "rollout manifest") -> RolloutConfig:
    """Validate a loaded YAML mapping; every problem is reported at once, in one line."""
    if not isinstance(data, dict):
        raise RolloutError(f"{source}: expected a YAML mapping with line/champion/challenger/...; got {data!r:.60}")
    errors: list[str] = []
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        errors.append(f"unknown key(s) {unknown}; allowed: {list(_TOP_KEYS)}")
    line = data.get("line")
    if not isinstance(line, str) or not line:
        errors.append(f"line={line!r}: name the production line, e.g. line: line-7")
    champion = _model_ref(data.get("champion"), "champion", errors)
    challenger = None
    if data.get("challenger") is not None:
        challenger = _model_ref(data["challenger"], "challenger", errors)
    if champion and challenger and champion.version == challenger.version:
        errors.append(f"challenger.version={challenger.version!r} equals the champion's: publish a new version")
    share = _number(data.get("challenger_share", 0.0), "challenger_share", 0.0, 1.0, errors)
    cameras = data.get("cameras") or {}
    pinned = cameras.get("pinned") or {} if isinstance(cameras, dict) else None
    if not isinstance(cameras, dict) or set(cameras) - {"pinned", "count"} or not isinstance(pinned, dict):
        errors.append(f"cameras={cameras!r}: give {{count: <cameras>, pinned: {{<camera id>: champion|challenger}}}}")
        pinned = {}
    bad_pins = {k: v for k, v in pinned.items() if v not in (CHAMPION, CHALLENGER)}
    if bad_pins:
        errors.append(f"cameras.pinned {bad_pins}: each camera is pinned to 'champion' or 'challenger'")
    shadow = data.get("shadow", False)
    if not isinstance(shadow, bool):
        errors.append(f"shadow={shadow!r}: give true or false")
    ok_class, log_dir = data.get("ok_class"), data.get("log_dir", "logs")
    for key, value in (("ok_class", ok_class), ("log_dir", log_dir)):
        if (value is not None or key == "log_dir") and (not isinstance(value, str) or not value):
            errors.append(f"{key}={value!r}: give a non-empty string")
    openvino = data.get("openvino") or {}
    if not isinstance(openvino, dict) or not all(
        isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in openvino.items()
    ):
        errors.append(f"openvino={openvino!r}: give OpenVINO properties, e.g. {{PERFORMANCE_HINT: THROUGHPUT}}")
        openvino = {}
    rule_in = data.get("decision") or {}
    rule_keys = list(DecisionRule.__dataclass_fields__)
    if not isinstance(rule_in, dict) or set(rule_in) - set(rule_keys):
        errors.append(f"decision={rule_in!r}: allowed keys {rule_keys}")
        rule_in = {}
    rule = DecisionRule(**rule_in)
    _number(rule.min_samples, "decision.min_samples", 1, 10**9, errors, integer=True)
    _number(rule.min_gain, "decision.min_gain", -1.0, 1.0, errors)
    _number(rule.max_latency_increase, "decision.max_latency_increase", 0.0, 1000.0, errors)
    _number(rule.max_error_rate, "decision.max_error_rate", 0.0, 1.0, errors)
    registry = None
    reg = data.get("registry")
    if reg is not None:
        if (
            not isinstance(reg, dict)
            or set(reg) != {"tracking_uri", "model_name"}
            or not all(isinstance(v, str) and v for v in reg.values())
        ):
            errors.append(f"registry={reg!r}: give {{tracking_uri: ..., model_name: ...}} or null")
        else:
            registry = RegistryRef(reg["tracking_uri"], reg["model_name"])
    limits = parse_limits(data.get("limits"), errors)
    retry_s = _number(data.get("challenger_retry_s", 300.0), "challenger_retry_s", 0.0, 86400.0, errors)
    serving = parse_serving(data, errors)
    if errors:
        raise RolloutError(f"{source}: " + "; ".join(errors))
    return RolloutConfig(
        line=line,
        champion=champion,
        challenger=challenger,
        challenger_share=float(share),
        pinned={str(k): v for k, v in pinned.items()},
        shadow=shadow,
        ok_class=ok_class,
        log_dir=log_dir,
        openvino=dict(openvino),
        decision=rule,
        registry=registry,
        limits=limits,
        challenger_retry_s=float(retry_s),
        serving=serving,
        base_dir=base_dir,
    )


def load_config(path: Path) -> RolloutConfig:
    """Read and validate a rollout manifest; raises RolloutError with a one-line message."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RolloutError(f"{path}: cannot read the rollout manifest ({e.strerror}); check --config") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise RolloutError(f"{path}: not valid YAML{at}; fix the syntax") from None
    return parse_config(data, path.resolve().parent, source=str(path))


def write_config(cfg: RolloutConfig, path: Path) -> None:
    """Rewrite the manifest atomically and durably (fsync before the rename); YAML comments are not kept.

    An unset ``ok_class`` is left out, never written as ``null``: absent, the champion artifact's good class
    applies, and a ``null`` on disk reads as "this line has no good class" to a person (and once did to the pages)."""
    d = cfg.to_dict()
    if d["ok_class"] is None:
        del d["ok_class"]
    write_text(Path(path), yaml.safe_dump(d, sort_keys=False))
