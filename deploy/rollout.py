"""The rollout manifest, the sticky camera split, the champion/challenger comparison and the promote/roll-back rule.

Edge side: numpy + PyYAML only (no torch; from spt_core only the errors). MLflow is reached through
`deploy.registry`, imported lazily, and only when the manifest names a registry.

The manifest (YAML; paths are relative to the manifest's folder; unknown keys are refused)::

    line: line-7
    champion: {version: "3", path: artifacts/v3/fp32}
    challenger: {version: "4", path: artifacts/v4/fp32}   # or null
    challenger_share: 0.25        # fraction of *cameras* on the challenger (sticky per camera)
    cameras: {pinned: {cam-3: challenger}}
    shadow: false                 # true: the challenger also runs, unserved, on champion frames (paired test)
    ok_class: ok                  # every other class is a defect (defect recall)
    log_dir: logs                 # predictions.jsonl, feedback.jsonl, decisions.jsonl
    openvino: {PERFORMANCE_HINT: THROUGHPUT}   # optional: OpenVINO CPU properties over each artifact's runtime_config
    decision: {min_samples: 200, min_gain: 0.0, max_latency_increase: 0.2, max_error_rate: 0.05}
    registry: {tracking_uri: "sqlite:///mlflow.db", model_name: defect-inspector}   # or null

CLI: ``python -m deploy.rollout decide --config rollout.yaml [--dry-run] [--reload-url http://127.0.0.1:8080]``
and ``python -m deploy.rollout report --config rollout.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from spt_core.errors import SensituneError

CHAMPION, CHALLENGER = "champion", "challenger"
PROMOTE, ROLLBACK, WAIT = "promote", "rollback", "wait"
Z95 = 1.959963984540054  # two-sided 95 % normal quantile
PRED_LOG, FEEDBACK_LOG, DECISION_LOG = "predictions.jsonl", "feedback.jsonl", "decisions.jsonl"


class RolloutError(SensituneError):
    """A rollout manifest, log or decision that cannot be used (one line: what, where, how to fix)."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class ModelRef:
    """One model version on the line: its registry version and its artifact directory."""

    version: str
    path: str


@dataclass(frozen=True)
class DecisionRule:
    """When a challenger is promoted or rolled back (see `decide`)."""

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
    ok_class: str = "ok"
    log_dir: str = "logs"
    openvino: dict[str, Any] = field(default_factory=dict)  # compile properties over the artifact's runtime_config
    decision: DecisionRule = field(default_factory=DecisionRule)
    registry: RegistryRef | None = None
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
            "cameras": {"pinned": dict(self.pinned)},
            "shadow": self.shadow,
            "ok_class": self.ok_class,
            "log_dir": self.log_dir,
            "openvino": dict(self.openvino),
            "decision": asdict(self.decision),
            "registry": asdict(self.registry) if self.registry else None,
        }


_TOP_KEYS = ("line", "champion", "challenger", "challenger_share", "cameras", "shadow", "ok_class", "log_dir")
_TOP_KEYS += ("openvino", "decision", "registry")


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
    if not isinstance(cameras, dict) or set(cameras) - {"pinned"} or not isinstance(pinned, dict):
        errors.append(f"cameras={cameras!r}: give {{pinned: {{<camera id>: champion|challenger}}}}")
        pinned = {}
    bad_pins = {k: v for k, v in pinned.items() if v not in (CHAMPION, CHALLENGER)}
    if bad_pins:
        errors.append(f"cameras.pinned {bad_pins}: each camera is pinned to 'champion' or 'challenger'")
    shadow = data.get("shadow", False)
    if not isinstance(shadow, bool):
        errors.append(f"shadow={shadow!r}: give true or false")
    ok_class, log_dir = data.get("ok_class", "ok"), data.get("log_dir", "logs")
    for key, value in (("ok_class", ok_class), ("log_dir", log_dir)):
        if not isinstance(value, str) or not value:
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


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder + fsync + rename: readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_config(cfg: RolloutConfig, path: Path) -> None:
    """Rewrite the manifest atomically (YAML comments are not kept)."""
    write_text_atomic(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------------- split
def camera_bucket(camera_id: str, challenger_version: str) -> float:
    """Uniform in [0, 1), fixed for a (camera, challenger version): a new challenger reshuffles the cameras."""
    digest = hashlib.sha256(f"{camera_id}\x00{challenger_version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_arm(camera_id: str, cfg: RolloutConfig) -> str:
    """Which model serves this camera: pinned cameras first, then the sticky hash against the share."""
    if cfg.challenger is None:
        return CHAMPION
    if camera_id in cfg.pinned:
        return cfg.pinned[camera_id]
    return CHALLENGER if camera_bucket(camera_id, cfg.challenger.version) < cfg.challenger_share else CHAMPION


# ---------------------------------------------------------------------------------------------------- JSONL logs
class JsonlLog:
    """Append-only JSON-lines file; one write() per record so concurrent writers never interleave a line.

    Records reach the OS on every append; fsync runs every `fsync_every` records or `fsync_interval_s` seconds,
    whichever comes first (group commit: a power cut loses at most that much, a process crash nothing).
    """

    def __init__(self, path: Path, fsync_every: int = 1, fsync_interval_s: float = 0.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._every, self._interval = max(1, fsync_every), fsync_interval_s
        self._pending, self._last_sync = 0, time.monotonic()
        size = os.fstat(self._fd).st_size
        if size:  # a crash may have torn the last line: end it so the next record starts clean
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise RolloutError(f"{self.path}: log already closed")
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self._pending += 1
            now = time.monotonic()
            if self._pending >= self._every or now - self._last_sync >= self._interval:
                os.fsync(self._fd)
                self._pending, self._last_sync = 0, now

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """All records of a JSONL file and the number of unreadable lines skipped (a torn tail after a crash)."""
    records: list[dict[str, Any]] = []
    skipped = 0
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                skipped += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                skipped += 1
    return records, skipped


# ---------------------------------------------------------------------------------------------------- statistics
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for k successes in n trials (good near 0 and 1, unlike the normal interval)."""
    if n == 0:
        return None
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def error_rate_exceeded(errors: int, attempts: int, limit: float) -> bool:
    """True when we are 95 % sure the error rate is above `limit` (Wilson lower bound > limit)."""
    ci = wilson_interval(errors, attempts)
    return ci is not None and ci[0] > limit


def mcnemar(b: int, c: int) -> dict[str, Any]:
    """Paired test on discordant frames: b = only the champion right, c = only the challenger right.

    Exact two-sided binomial test (b ~ Bin(b + c, 1/2)) up to 1000 discordant pairs, chi-square with continuity
    correction above (the exact sum's big integers get slow, and the two agree there).
    """
    n = b + c
    if n == 0:
        return {"b": b, "c": c, "p_value": 1.0, "method": "exact"}
    if n <= 1000:
        tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
        return {"b": b, "c": c, "p_value": min(1.0, 2 * tail / 2**n), "method": "exact"}
    stat = (abs(b - c) - 1) ** 2 / n
    return {"b": b, "c": c, "statistic": stat, "p_value": math.erfc(math.sqrt(stat / 2)), "method": "chi2-cc"}


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    q = np.percentile(np.asarray(values, dtype=np.float64), [50, 90, 99])
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2])}


def _arm_stats(recs: list[dict[str, Any]], labels: dict[str, str], ok_class: str) -> dict[str, Any]:
    good = [r for r in recs if not r.get("error")]
    pairs = [(r.get("class"), labels[r["frame_id"]]) for r in good if r.get("frame_id") in labels]
    correct = sum(p == t for p, t in pairs)
    defects = [(p, t) for p, t in pairs if t != ok_class]
    caught = sum(p != ok_class for p, _ in defects)  # a defect flagged as any defect class gets the part off the line
    per_class: dict[str, list[int]] = {}
    for p, t in pairs:
        per_class.setdefault(t, [0, 0])[0] += p == t
        per_class[t][1] += 1
    errors = len(recs) - len(good)
    return {
        "versions": sorted({str(r.get("model_version")) for r in recs}),
        "requests": len(recs),
        "served": sum(bool(r.get("served", True)) for r in good),
        "shadow": sum(not r.get("served", True) for r in good),
        "errors": errors,
        "error_rate": errors / len(recs) if recs else None,
        "labelled": len(pairs),
        "correct": correct,
        "accuracy": correct / len(pairs) if pairs else None,
        "accuracy_ci95": wilson_interval(correct, len(pairs)),
        "defects": len(defects),
        "defect_recall": caught / len(defects) if defects else None,
        "defect_recall_ci95": wilson_interval(caught, len(defects)),
        "recall_per_class": {k: v[0] / v[1] for k, v in sorted(per_class.items())},
        "latency_ms": _quantiles([r["latency_ms"] for r in good if "latency_ms" in r]),
    }


def compare(
    pred_log: Path,
    feedback_log: Path,
    *,
    champion_version: str | None = None,
    challenger_version: str | None = None,
    ok_class: str = "ok",
) -> dict[str, Any]:
    """Champion vs challenger from the prediction and feedback logs, overall and per camera.

    Only records of the given (role, version) count when versions are given, so that a promoted model's history
    as challenger does not leak into its record as champion. Feedback joins on frame_id (last label wins).

    Returns:
        {"versions", "ok_class", "overall": {role: stats}, "per_camera": {camera: {role: stats}},
        "paired": McNemar on frames both models answered (shadow mode) or None, "log": line counts}.
    """
    preds, skipped_p = read_jsonl(Path(pred_log))
    feedback, skipped_f = read_jsonl(Path(feedback_log))
    labels = {str(r["frame_id"]): str(r["label"]) for r in feedback if "frame_id" in r and "label" in r}
    wanted = {CHAMPION: champion_version, CHALLENGER: challenger_version}
    overall: dict[str, list[dict[str, Any]]] = {CHAMPION: [], CHALLENGER: []}
    per_camera: dict[str, dict[str, list[dict[str, Any]]]] = {}
    by_frame: dict[str, dict[str, str]] = {}
    for r in preds:
        role = r.get("role")
        if role not in wanted or (wanted[role] is not None and str(r.get("model_version")) != wanted[role]):
            continue
        overall[role].append(r)
        per_camera.setdefault(str(r.get("camera_id")), {CHAMPION: [], CHALLENGER: []})[role].append(r)
        if not r.get("error") and "frame_id" in r:
            by_frame.setdefault(str(r["frame_id"]), {})[role] = r.get("class")
    both = {f: v for f, v in by_frame.items() if len(v) == 2}
    paired = None
    if both:
        lab = [(v[CHAMPION] == labels[f], v[CHALLENGER] == labels[f]) for f, v in both.items() if f in labels]
        only_champion = sum(cp and not ch for cp, ch in lab)
        only_challenger = sum(ch and not cp for cp, ch in lab)
        agree = sum(v[CHAMPION] == v[CHALLENGER] for v in both.values())
        paired = {"frames": len(both), "labelled": len(lab), "agreement": agree / len(both)}
        paired |= mcnemar(only_champion, only_challenger)
    return {
        "versions": {CHAMPION: champion_version, CHALLENGER: challenger_version},
        "ok_class": ok_class,
        "overall": {role: _arm_stats(recs, labels, ok_class) for role, recs in overall.items()},
        "per_camera": {
            cam: {role: _arm_stats(recs, labels, ok_class) for role, recs in arms.items() if recs}
            for cam, arms in sorted(per_camera.items())
        },
        "paired": paired,
        "log": {"predictions": len(preds), "feedback": len(feedback), "skipped_lines": skipped_p + skipped_f},
    }


def report_for(cfg: RolloutConfig) -> dict[str, Any]:
    """`compare` over the manifest's logs for its current champion and challenger."""
    return compare(
        cfg.logs / PRED_LOG,
        cfg.logs / FEEDBACK_LOG,
        champion_version=cfg.champion.version,
        challenger_version=cfg.challenger.version if cfg.challenger else None,
        ok_class=cfg.ok_class,
    )


# ---------------------------------------------------------------------------------------------------- decision
@dataclass
class Decision:
    action: str  # promote | rollback | wait
    reasons: list[str]
    evidence: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def decide(report: dict[str, Any], rule: DecisionRule) -> Decision:
    """Apply the rule to a `compare` report.

    Roll back at once when the challenger's inference error rate is above `max_error_rate` with 95 % confidence.
    Otherwise wait until both arms have `min_samples` labelled frames (the champion too: its accuracy is the
    yardstick); then promote when accuracy gain >= `min_gain` and the relative p50 latency increase is at most
    `max_latency_increase`, else roll back.
    """
    cp, ch = report["overall"][CHAMPION], report["overall"][CHALLENGER]
    evidence = {
        "champion_version": report["versions"][CHAMPION],
        "challenger_version": report["versions"][CHALLENGER],
        "rule": asdict(rule),
        CHAMPION: {k: cp[k] for k in ("labelled", "accuracy", "accuracy_ci95", "defect_recall", "latency_ms")},
        CHALLENGER: {k: ch[k] for k in ("labelled", "accuracy", "accuracy_ci95", "defect_recall", "latency_ms")},
        "challenger_errors": {"errors": ch["errors"], "requests": ch["requests"]},
        "paired": report.get("paired"),
    }
    if report["versions"][CHALLENGER] is None:
        return Decision(WAIT, ["no challenger in the rollout manifest"], evidence)
    if error_rate_exceeded(ch["errors"], ch["requests"], rule.max_error_rate):
        lo = wilson_interval(ch["errors"], ch["requests"])[0]
        why = f"challenger errors {ch['errors']}/{ch['requests']} (95% lower bound {lo:.3f}) > {rule.max_error_rate}"
        return Decision(ROLLBACK, [why], evidence)
    if min(ch["labelled"], cp["labelled"]) < rule.min_samples:
        why = f"labelled frames challenger {ch['labelled']}, champion {cp['labelled']}; need {rule.min_samples} each"
        return Decision(WAIT, [why], evidence)
    gain = ch["accuracy"] - cp["accuracy"]
    p50_cp, p50_ch = cp["latency_ms"]["p50"], ch["latency_ms"]["p50"]
    lat_inc = p50_ch / p50_cp - 1 if p50_cp else 0.0
    evidence.update(accuracy_gain=gain, latency_increase=lat_inc)
    gain_msg = f"accuracy {_fmt(ch['accuracy'])} vs {_fmt(cp['accuracy'])} (gain {gain:+.4f}, min {rule.min_gain})"
    lat_msg = f"p50 latency {p50_ch:.2f} vs {p50_cp:.2f} ms ({lat_inc:+.1%}, max +{rule.max_latency_increase:.0%})"
    failed = []
    if gain < rule.min_gain:
        failed.append(gain_msg)
    if lat_inc > rule.max_latency_increase:
        failed.append(lat_msg)
    if failed:
        return Decision(ROLLBACK, failed, evidence)
    return Decision(PROMOTE, [gain_msg, lat_msg], evidence)


@contextlib.contextmanager
def manifest_lock(config_path: Path) -> Iterator[None]:
    """Serialise manifest rewrites between the service and the CLI (advisory lock file beside the manifest)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still protects readers
        yield
        return
    with open(f"{config_path}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def apply_decision(config_path: Path, decision: Decision, *, source: str = "rule") -> dict[str, Any]:
    """Carry out a decision: rewrite the manifest, move the registry aliases, append to decisions.jsonl.

    Promote: challenger -> champion, challenger -> null, alias `champion` -> the new version, `challenger`
    deleted. Roll back: challenger -> null, alias `challenger` deleted. A decision about a challenger that is
    no longer in the manifest is logged as not applied. A registry failure never undoes the manifest change
    (the line must keep running); it is logged in the record.

    Returns:
        The decisions.jsonl record.
    """
    config_path = Path(config_path)
    with manifest_lock(config_path):
        cfg = load_config(config_path)
        record: dict[str, Any] = {
            "ts": now_iso(),
            "source": source,
            "line": cfg.line,
            **decision.to_dict(),
            "before": {CHAMPION: cfg.champion.version, CHALLENGER: cfg.challenger.version if cfg.challenger else None},
            "applied": False,
            "alias_moves": [],
        }
        wanted = decision.evidence.get("challenger_version")
        if decision.action in (PROMOTE, ROLLBACK):
            if cfg.challenger is None or cfg.challenger.version != wanted:
                record["not_applied"] = (
                    f"manifest challenger is {record['before'][CHALLENGER]}, decision is on {wanted}"
                )
            else:
                new_champion = cfg.challenger if decision.action == PROMOTE else cfg.champion
                write_config(replace(cfg, champion=new_champion, challenger=None), config_path)
                record["applied"] = True
                if cfg.registry is not None:
                    _move_aliases(cfg.registry, decision.action, cfg.challenger.version, record)
        after = load_config(config_path)
        record["after"] = {
            CHAMPION: after.champion.version,
            CHALLENGER: after.challenger.version if after.challenger else None,
        }
        log = JsonlLog(cfg.logs / DECISION_LOG)
        try:
            log.append(record)
        finally:
            log.close()
    return record


def _move_aliases(reg: RegistryRef, action: str, version: str, record: dict[str, Any]) -> None:
    from deploy.registry import MlflowRegistry  # lazy: mlflow is optional on the edge box

    try:
        registry = MlflowRegistry(reg.tracking_uri, reg.model_name)
        if action == PROMOTE:
            record["alias_moves"].append(registry.set_champion(version).to_dict())
        record["alias_moves"].append(registry.clear_challenger().to_dict())
    except Exception as e:  # the manifest already changed; the registry catches up by hand (logged)
        record["registry_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """`python -m deploy.rollout {decide,report} --config rollout.yaml`."""
    ap = argparse.ArgumentParser(prog="python -m deploy.rollout", description=__doc__.splitlines()[0])
    ap.add_argument("verb", choices=["decide", "report"])
    ap.add_argument("--config", type=Path, required=True, help="rollout manifest (YAML)")
    ap.add_argument("--dry-run", action="store_true", help="decide: print the decision, change nothing")
    ap.add_argument("--reload-url", help="decide: POST <url>/reload afterwards, e.g. http://127.0.0.1:8080")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        report = report_for(cfg)
        if args.verb == "report":
            print(json.dumps(report, indent=2))
            return 0
        decision = decide(report, cfg.decision)
        out = decision.to_dict() if args.dry_run else apply_decision(args.config, decision, source="cli")
        print(json.dumps(out, indent=2))
        if args.reload_url and not args.dry_run:
            import urllib.request

            with urllib.request.urlopen(urllib.request.Request(args.reload_url.rstrip("/") + "/reload", b"")) as r:
                print(r.read().decode())
        return 0
    except SensituneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
