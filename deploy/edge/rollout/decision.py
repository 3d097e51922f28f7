"""The promotion rule, the one online rule that judges a challenger, and how its verdicts are carried out.

Offline (`decide` on a `deploy.edge.rollout.stats.compare` report, by `POST /decide` or the CLI): roll back on a
too-high error rate or an escape rate worse than the champion's beyond its interval (whatever its accuracy), wait
for enough labelled frames, then promote or roll back on accuracy and latency. A rollout judged in several looks
(the fleet's waves, `deploy.edge.fleet.evidence`) stops before its last look only on `worse_beyond_doubt`.
Online (the edge service, per request): `ChallengerHealth` disables a challenger the moment its error rate breaks
the same limit, and `roll_back` carries that out, as it does for a challenger that fails to load.
Every verdict goes through `apply_decision`: manifest rewrite, registry aliases, decisions.jsonl.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from deploy.edge.rollout.logs import JsonlLog, now_iso
from deploy.edge.rollout.manifest import (
    CHALLENGER,
    CHAMPION,
    DECISION_LOG,
    DecisionRule,
    RegistryRef,
    RolloutConfig,
    load_config,
    write_config,
)
from deploy.edge.rollout.stats import difference_interval, wilson_interval
from spt_core.portable.errors import one_line

PROMOTE, ROLLBACK, WAIT = "promote", "rollback", "wait"
# Haybittle-Peto: a look before the last stops on a difference only at 99.9 % (two-sided); the last look is `decide`.
# The fleet looks every round: in 2000 simulated rollouts of 10 boxes' waves (26 looks), 95 % a look stopped a version
# 4 % wrong against a champion 5 % wrong in 8 % of them on its escapes and 1.5 % on its accuracy; 99.9 %: 0.7 %, 0 %.
Z_INTERIM = 3.290526731491926
_EVIDENCE = ("labelled", "accuracy", "accuracy_ci95", "defect_recall", "escape_rate", "escape_rate_ci95", "overkill",
             "latency_ms")  # fmt: skip


@dataclass
class Decision:
    action: str  # promote | rollback | wait
    reasons: list[str]
    evidence: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def error_rate_exceeded(errors: int, attempts: int, limit: float) -> bool:
    """True when we are 95 % sure the error rate is above `limit` (Wilson lower bound > limit)."""
    ci = wilson_interval(errors, attempts)
    return ci is not None and ci[0] > limit


def escape_worse(challenger: dict[str, Any], champion: dict[str, Any]) -> str | None:
    """Why the challenger lets more defects through than the champion beyond doubt, or None.

    Worse beyond its interval: the lower end of the challenger's 95 % Wilson interval of the escape rate is above
    the champion's escape rate. Such a challenger is never promoted, whatever its accuracy.
    """
    ch, cp = challenger.get("escape_rate"), champion.get("escape_rate")
    ci = challenger.get("escape_rate_ci95")
    if ch is None or cp is None or not ci or not ci[0] > cp:
        return None
    return (
        f"challenger escape rate {ch:.4f} ({challenger['escaped']}/{challenger['defects']} defects passed, 95% CI "
        f"{ci[0]:.4f}-{ci[1]:.4f}) is worse than the champion's {cp:.4f} beyond its interval"
    )


def _errors_over(ch: dict[str, Any], rule: DecisionRule) -> str | None:
    if not error_rate_exceeded(ch["errors"], ch["requests"], rule.max_error_rate):
        return None
    lo = wilson_interval(ch["errors"], ch["requests"])[0]
    return f"challenger errors {ch['errors']}/{ch['requests']} (95% lower bound {lo:.3f}) > {rule.max_error_rate}"


def worse_beyond_doubt(report: dict[str, Any], rule: DecisionRule, z: float = Z_INTERIM) -> str | None:
    """Why a challenger must stop at a look before the last one (a fleet's earlier waves), or None.

    Only what is beyond doubt on a small sample: the error rate as in `decide`; the interval of the escape rate
    difference (`difference_interval` at `z`, 99.9 %: both arms' noise and many looks) above 0; the interval of the
    accuracy gain below `min_gain`. `decide`'s point estimates cannot see a 1-pt difference there (at 200 frames an
    arm the gain's standard deviation is ~2 pt), nor can `escape_worse`, which holds the challenger's interval
    against the champion's point estimate: both stop good versions by chance, look after look.
    """
    cp, ch = report["overall"][CHAMPION], report["overall"][CHALLENGER]
    if why := _errors_over(ch, rule):
        return why
    level = f"{1 - math.erfc(z / math.sqrt(2)):.1%}"
    esc = difference_interval(ch["escaped"], ch["defects"], cp["escaped"], cp["defects"], z)
    if esc is not None and esc[0] > 0:
        return (f"challenger escapes {ch['escaped']}/{ch['defects']} vs champion {cp['escaped']}/{cp['defects']}: "
                f"difference {level} CI {esc[0]:+.4f} to {esc[1]:+.4f} lies above 0")  # fmt: skip
    gain = difference_interval(ch["correct"], ch["labelled"], cp["correct"], cp["labelled"], z)
    if gain is not None and gain[1] < rule.min_gain:
        return (f"accuracy {ch['correct']}/{ch['labelled']} vs champion {cp['correct']}/{cp['labelled']}: gain "
                f"{level} CI {gain[0]:+.4f} to {gain[1]:+.4f} lies below min_gain {rule.min_gain}")  # fmt: skip
    return None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def decide(report: dict[str, Any], rule: DecisionRule) -> Decision:
    """The promotion rule, applied to a `deploy.edge.rollout.stats.compare` report.

    Roll back at once when the challenger's inference error rate is above `max_error_rate` with 95 % confidence, or
    when its escape rate is worse than the champion's beyond its interval (`escape_worse`). Otherwise wait until
    both arms have `min_samples` labelled frames (the champion too: its accuracy is the
    yardstick); then promote when accuracy gain >= `min_gain` and the relative p50 latency increase is at most
    `max_latency_increase`, else roll back.
    """
    cp, ch = report["overall"][CHAMPION], report["overall"][CHALLENGER]
    evidence = {
        "champion_version": report["versions"][CHAMPION],
        "challenger_version": report["versions"][CHALLENGER],
        "rule": asdict(rule),
        "ok_class": report.get("ok_class"),
        CHAMPION: {k: cp.get(k) for k in _EVIDENCE},
        CHALLENGER: {k: ch.get(k) for k in _EVIDENCE},
        "challenger_errors": {"errors": ch["errors"], "requests": ch["requests"]},
        "paired": report.get("paired"),
    }
    if report["versions"][CHALLENGER] is None:
        return Decision(WAIT, ["no challenger in the rollout manifest"], evidence)
    if why := _errors_over(ch, rule) or escape_worse(ch, cp):
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


@dataclass
class ChallengerHealth:
    """The online half of the rule: the serving challenger's inference attempts and errors; thread-safe.

    Judged as `decide` judges the logs (`error_rate_exceeded`, one error in the first attempt is enough), but
    per request, so that a broken challenger stops answering cameras at once rather than at the next decision.
    """

    max_error_rate: float
    attempts: int = 0
    errors: int = 0
    disabled: bool = False  # True: the champion answers every camera
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def note(self, ok: bool) -> bool:
        """Count one attempt; True exactly once, when the error rate first breaks the limit (then disabled)."""
        with self._lock:
            self.attempts += 1
            self.errors += not ok
            broken = error_rate_exceeded(self.errors, self.attempts, self.max_error_rate)
            if broken and not self.disabled:
                self.disabled = True
                return True
            return False


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


def apply_decision(
    config_path: Path,
    decision: Decision,
    *,
    source: str = "rule",
    actor: str = "cli",
    before_write: Callable[[RolloutConfig], Any] | None = None,
    registry_later: Callable[[RegistryRef, str, str], None] | None = None,
) -> dict[str, Any]:
    """Carry out a decision: rewrite the manifest, move the registry aliases, append to decisions.jsonl.

    Promote: challenger -> champion, challenger -> null, alias `champion` -> the new version, `challenger`
    deleted. Roll back: challenger -> null, alias `challenger` deleted. Only a change is logged: a wait, or a
    decision about a challenger that is no longer in the manifest, returns its record with ``applied: false`` and
    writes nothing. A registry failure never undoes the manifest change (the line must keep running); it is logged
    in the record.

    Args:
        before_write: Called with the new configuration under the manifest lock before anything is written (the
            service loads and smoke-tests the new runtime here); if it raises, nothing is written or logged and the
            exception propagates. Its result is returned as ``record["prepared"]`` (not logged).
        actor: Who asked (the token's name), for the audit trail.
        registry_later: The service's `deploy.edge.registry.AliasOutbox` submit: the alias moves are handed to it
            (``registry: pending`` in the record) instead of made here, so the caller's lock never waits on the
            network. None (the CLI): made here, their result in the record.

    Returns:
        The decisions.jsonl record.
    """
    config_path = Path(config_path)
    with manifest_lock(config_path):
        cfg = load_config(config_path)
        versions = {CHAMPION: cfg.champion.version, CHALLENGER: cfg.challenger.version if cfg.challenger else None}
        record: dict[str, Any] = {
            "ts": now_iso(),
            "source": source,
            "actor": actor,
            "line": cfg.line,
            **decision.to_dict(),
            "before": versions,
            "after": dict(versions),
            "applied": False,
            "alias_moves": [],
        }
        wanted = decision.evidence.get("challenger_version")
        if decision.action not in (PROMOTE, ROLLBACK):
            return record
        if cfg.challenger is None or cfg.challenger.version != wanted:
            record["not_applied"] = f"manifest challenger is {versions[CHALLENGER]}, decision is on {wanted}"
            return record
        new_cfg = replace(cfg, champion=cfg.challenger if decision.action == PROMOTE else cfg.champion, challenger=None)
        prepared = before_write(new_cfg) if before_write is not None else None
        write_config(new_cfg, config_path)
        record["applied"] = True
        record["after"] = {CHAMPION: new_cfg.champion.version, CHALLENGER: None}
        if cfg.registry is not None and registry_later is not None:
            record["registry"] = "pending"
        elif cfg.registry is not None:
            _move_aliases(cfg.registry, decision.action, cfg.challenger.version, record)
        log = JsonlLog(cfg.logs / DECISION_LOG)
        try:
            log.append(record)
        finally:
            log.close()
    if record.get("registry") == "pending":
        registry_later(cfg.registry, decision.action, cfg.challenger.version)
    return record | ({"prepared": prepared} if prepared is not None else {})


def roll_back(
    config_path: Path, cfg: RolloutConfig, reason: str, why: str, actor: str = "service",
    registry_later: Callable[[RegistryRef, str, str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The automatic roll-back of `cfg`'s challenger (it failed to load, or `ChallengerHealth` broke), source
    ``auto:<why>``; see `apply_decision`."""
    evidence = {"champion_version": cfg.champion.version, "challenger_version": cfg.challenger.version}
    return apply_decision(config_path, Decision(ROLLBACK, [reason], evidence), source=f"auto:{why}", actor=actor,
                          registry_later=registry_later)  # fmt: skip


def _move_aliases(reg: RegistryRef, action: str, version: str, record: dict[str, Any]) -> None:
    from deploy.edge.registry import MlflowRegistry  # lazy: mlflow is optional on the edge box

    try:
        registry = MlflowRegistry(reg.tracking_uri, reg.model_name)
        if action == PROMOTE:
            record["alias_moves"].append(registry.set_champion(version).to_dict())
        record["alias_moves"].append(registry.clear_challenger().to_dict())
    except Exception as e:  # the manifest already changed; the registry catches up by hand (logged)
        record["registry_error"] = f"{type(e).__name__}: {one_line(e)}"
