"""What serves now, and how it changes: load the rollout manifest's models, swap them as one reference, promote or
roll back as a transaction, retry a challenger that was missing at start, write the audit trail.

Concurrency: requests run in uvicorn's thread pool and read `EdgeService.runtime` once, so a request finishes on
the runtime it started with. Changes (reload, decisions, automatic rollbacks, the start-up retry) take one control
lock and build a complete new `Runtime` before the swap.

Every change that moves a model is a transaction: the new runtime passes acceptance first (`deploy.edge.acceptance`:
hash, signature, compile, smoke test, the challenger's compatibility with the champion), then the manifest is
rewritten atomically, then the reference is swapped. When acceptance fails, the manifest stays byte-identical,
nothing is logged as a decision, and the old runtime serves. Registry alias moves follow on `AliasOutbox`'s thread,
never under the control lock.

Never dark: at start, a champion that fails acceptance is replaced by the last champion that passed
(``<log_dir>/last-good``); /healthz says so (``champion_source: last-good`` and the refusal in ``champion_error``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deploy.edge.acceptance import Accepted, accept, last_good, remember
from deploy.edge.artifact import ArtifactError
from deploy.edge.auth import ADMIN, Principal
from deploy.edge.frames import ServedFrames
from deploy.edge.inferencer import Inferencer
from deploy.edge.limits import DecodeGate, Limits, RateLimiter
from deploy.edge.metrics import Metrics
from deploy.edge.registry import AliasOutbox
from deploy.edge.rollout.decision import ChallengerHealth, Decision, apply_decision, decide, roll_back
from deploy.edge.rollout.logs import JsonlLog, now_iso
from deploy.edge.rollout.manifest import (
    CHALLENGER,
    CHAMPION,
    FEEDBACK_LOG,
    PRED_LOG,
    ModelRef,
    RegistryRef,
    RolloutConfig,
    RolloutError,
    load_config,
)
from deploy.edge.rollout.split import assign_arm
from deploy.edge.rollout.stats import report_for
from deploy.edge.signing import Trust
from spt_core.portable.errors import SensituneError, one_line

log = logging.getLogger("sensitune.edge")
AUDIT_LOG = "audit.jsonl"  # in log_dir: every admin action, who asked, what came of it


def load_model(
    artifact_dir: Path, version: str | None = None, openvino: dict[str, Any] | None = None, trust: Trust | None = None
) -> Inferencer:
    """A model the rollout manifest names, through `deploy.edge.acceptance.accept` (hash and ``model_version``,
    signature, ``promotable``, compile from the verified bytes with ``openvino`` over its ``runtime_config``, smoke
    test). Raises `ArtifactError`."""
    return accept(artifact_dir, version, trust=trust, openvino=openvino).model


def _error_text(e: Exception) -> str:
    return str(e) if isinstance(e, SensituneError) else one_line(e)


@dataclass
class Runtime:
    """What serves now: a config and its loaded models. Immutable after the swap except the challenger health."""

    config: RolloutConfig
    champion: Inferencer | None
    challenger: Inferencer | None
    pred_log: JsonlLog
    feedback_log: JsonlLog
    champion_error: str | None = None
    challenger_error: str | None = None
    loaded_at: str = field(default_factory=now_iso)
    health: ChallengerHealth | None = None  # None: a fresh one for config.decision.max_error_rate
    champion_source: str = "manifest"  # or "last-good": the manifest's champion failed acceptance at start
    signatures: dict[str, str] = field(default_factory=dict)  # role -> what acceptance said of its signature
    gate: threading.Semaphore = field(default_factory=lambda: threading.BoundedSemaphore(1))
    pending: bool = False  # the challenger was missing at start and is being retried
    # frames decoded at full size at once (limits.decode_concurrency): predict, its shadow run, the pages' thumbnails
    decoding: DecodeGate = field(default_factory=lambda: DecodeGate(Limits().decode_concurrency))

    def __post_init__(self) -> None:
        if self.health is None:
            self.health = ChallengerHealth(self.config.decision.max_error_rate)

    def arm(self, camera_id: str) -> str:
        if self.challenger is None or self.health.disabled:
            return CHAMPION
        return assign_arm(camera_id, self.config)

    @property
    def challenger_state(self) -> str:
        """none (no challenger), pending (missing at start, retried), failed (rolled back), serving."""
        if self.pending:
            return "pending"
        if self.challenger_error or self.health.disabled:
            return "failed"
        return "serving" if self.challenger is not None else "none"

    def state(self) -> dict[str, Any]:
        ch = self.config.challenger
        return {
            "line": self.config.line,
            "champion": self.champion.version if self.champion else None,
            "champion_error": self.champion_error,
            "champion_source": self.champion_source if self.champion else None,
            "challenger": ch.version if ch else None,
            "challenger_state": self.challenger_state,
            "challenger_error": self.challenger_error,
            "challenger_share": self.config.challenger_share,
            "shadow": self.config.shadow,
            "openvino": self.champion.config if self.champion else None,
            "loaded_at": self.loaded_at,
            "signatures": dict(self.signatures),
            "input_variant": {  # which input each model is fed, and why (`deploy.edge.serving.Serving.variant_choice`)
                role: {"variant": m.input_variant, "why": m.variant_why or ""}
                for role, m in ((CHAMPION, self.champion), (CHALLENGER, self.challenger))
                if m is not None
            },
        }


class RuntimeControl:
    """The control half of the edge service: the current `Runtime` and every change to it. `deploy.edge.service.
    EdgeService` adds the data path (`predict`, `feedback`) and the HTTP API on top."""

    def __init__(self, config_path: Path, trust: Trust | None = None) -> None:
        self.config_path = Path(config_path).resolve()
        self.trust = Trust.from_env() if trust is None else trust
        self.metrics = Metrics()
        self.outbox = AliasOutbox(self._registry_result)
        self.rate = RateLimiter()
        self._control = threading.Lock()  # one reload / decision at a time
        self._logs: dict[Path, JsonlLog] = {}  # kept open for the process: old runtimes may still write
        with self._control:
            cfg = load_config(self.config_path)
            self.frames = ServedFrames(cfg.limits.served_frames)
            self.frames.load(cfg.logs / PRED_LOG)  # feedback for frames served before a restart still joins
            self.runtime = self._load(cfg, previous=None, fallback=True)

    # ------------------------------------------------------------------------------------------------ loading
    def _log(self, path: Path, fsync_every: int) -> JsonlLog:
        if path not in self._logs:
            # predictions: group fsync (64 records / 0.5 s); feedback and audit are rarer and precious: fsync each
            try:
                self._logs[path] = JsonlLog(path, fsync_every=fsync_every, fsync_interval_s=0.5)
            except OSError as e:
                raise RolloutError(
                    f"log_dir {path.parent}: cannot open {path.name} ({e.strerror}); fix log_dir"
                ) from None
        return self._logs[path]

    def _accept(self, cfg: RolloutConfig, ref: ModelRef, role: str, champion: Accepted | None = None) -> Accepted:
        against = champion.artifact if champion is not None else None
        return accept(cfg.resolve(ref.path), ref.version, trust=self.trust, openvino=cfg.openvino, champion=against,
                      role=role, serving=cfg.serving)  # fmt: skip

    def _last_good(self, cfg: RolloutConfig, why: str) -> tuple[RolloutConfig, Accepted] | None:
        """The kept last-good champion, through acceptance again, and `cfg` pointing at it without a challenger."""
        kept = last_good(cfg.logs)
        if kept is None:
            return None
        ref = ModelRef(kept[0], str(kept[1]))
        try:
            accepted = self._accept(cfg, ref, CHAMPION)
        except Exception as e:
            log.error("last-good champion %s failed acceptance too: %s", ref.version, _error_text(e))
            return None
        log.error("champion %s refused (%s): serving the last-good champion %s", cfg.champion.version, why, ref.version)
        return replace(cfg, champion=ref, challenger=None), accepted

    def _build(self, cfg: RolloutConfig, with_challenger: bool = True, fallback: bool = False) -> Runtime:
        """A complete runtime for `cfg` with no side effect on the manifest; load errors are kept in the runtime.
        `fallback` (at start): a champion that fails acceptance is replaced by the last-good one (`_last_good`)."""
        champion = challenger = accepted = None
        champion_error = challenger_error = None
        source, signatures = "manifest", {}
        try:
            accepted = self._accept(cfg, cfg.champion, CHAMPION)
        except Exception as e:
            champion_error = _error_text(e)
            kept = self._last_good(cfg, champion_error) if fallback else None
            if kept is not None:
                (cfg, accepted), source = kept, "last-good"
        if accepted is not None:
            champion, signatures[CHAMPION] = accepted.model, accepted.signature
            if source == "manifest":
                try:
                    remember(accepted, cfg.logs)
                except OSError as e:  # a full disk must not stop the line
                    log.error("cannot keep the last-good champion in %s: %s", cfg.logs, e)
        if with_challenger and cfg.challenger is not None and champion is not None:
            try:
                ch = self._accept(cfg, cfg.challenger, CHALLENGER, champion=accepted)
                challenger, signatures[CHALLENGER] = ch.model, ch.signature
            except Exception as e:
                challenger_error = _error_text(e)
        logs = (self._log(cfg.logs / PRED_LOG, 64), self._log(cfg.logs / FEEDBACK_LOG, 1))
        # inferences at once = the champion's optimal number of requests (1 per stream: LATENCY 1, THROUGHPUT ~cores);
        # with micro-batching, frames at once: each request's batch fills from the frames waiting at the gate
        per_request = cfg.serving.batching.max_batch
        gate = threading.BoundedSemaphore((champion.n_requests if champion else 1) * per_request)
        return Runtime(cfg, champion, challenger, *logs, champion_error, challenger_error, gate=gate,
                       champion_source=source, signatures=signatures,
                       decoding=DecodeGate(cfg.limits.decode_concurrency))  # fmt: skip

    def _load(self, cfg: RolloutConfig, previous: Runtime | None, fallback: bool = False) -> Runtime:
        rt = self._build(cfg, fallback=fallback)
        if rt.champion is None:
            if previous is not None and previous.champion is not None:
                why = f"champion {cfg.champion.version} failed to load ({rt.champion_error}); nothing changed"
                raise ArtifactError(why)
            log.error("champion not loaded, not ready: %s", rt.champion_error)
        if rt.challenger_error:
            version, error = cfg.challenger.version, rt.challenger_error
            missing = not cfg.resolve(cfg.challenger.path).is_dir()
            if previous is None and missing and cfg.challenger_retry_s > 0:
                # missing at start (a mount or a copy not there yet): retried, not dropped for good
                log.warning("challenger %s missing at start, retrying: %s", version, error)
                rt = replace(rt, pending=True, health=ChallengerHealth(cfg.decision.max_error_rate, disabled=True))
                retry = threading.Thread(target=self._retry_challenger, args=(rt,), name="challenger-retry")
                retry.daemon = True
                retry.start()
                return rt
            log.error("challenger %s failed to load, rolling back: %s", version, error)
            rt = self._rollback(rt, f"challenger {version} failed to load: {error}", "load")
        return rt

    def _retry_challenger(self, rt: Runtime) -> None:
        cfg = rt.config
        deadline = time.monotonic() + cfg.challenger_retry_s
        interval = min(10.0, max(0.2, cfg.challenger_retry_s / 30))
        while True:
            time.sleep(interval)
            with self._control:
                if self.runtime is not rt:  # replaced by a reload or a decision: that one decides
                    return
                try:
                    against = None if rt.champion is None else rt.champion.artifact
                    challenger = accept(cfg.resolve(cfg.challenger.path), cfg.challenger.version, trust=self.trust,
                                        openvino=cfg.openvino, champion=against, role=CHALLENGER,
                                        serving=cfg.serving).model  # fmt: skip
                except Exception as e:
                    if time.monotonic() < deadline and not cfg.resolve(cfg.challenger.path).is_dir():
                        continue
                    reason = f"challenger {cfg.challenger.version} failed to load: {_error_text(e)}"
                    self.runtime = self._rollback(replace(rt, pending=False), reason, "load")
                    return
                log.info("challenger %s loaded after a retry", cfg.challenger.version)
                health = ChallengerHealth(cfg.decision.max_error_rate)
                self.runtime = replace(
                    rt, challenger=challenger, challenger_error=None, pending=False, health=health, loaded_at=now_iso()
                )
                return

    def _rollback(self, rt: Runtime, reason: str, why: str) -> Runtime:
        """Automatic rollback (caller holds the control lock): manifest, registry, decision log; champion serves."""
        record = None
        try:
            record = roll_back(self.config_path, rt.config, reason, why, registry_later=self._registry_later)
            cfg = load_config(self.config_path)
        except SensituneError as e:  # manifest unusable now: keep serving the champion from memory
            log.error("automatic rollback could not rewrite %s: %s", self.config_path, e)
            cfg = rt.config
        log.warning("rolled back challenger %s: %s (%s)", rt.config.challenger.version, reason, record)
        health = ChallengerHealth(cfg.decision.max_error_rate, disabled=True)  # the champion answers every camera
        return replace(rt, config=cfg, challenger=None, challenger_error=reason, health=health, loaded_at=now_iso())

    def _auto_rollback_async(self, rt: Runtime, reason: str) -> None:
        def run() -> None:
            with self._control:
                if self.runtime is rt:  # not replaced meanwhile by a reload or decision
                    self.runtime = self._rollback(rt, reason, "error-rate")

        threading.Thread(target=run, name="auto-rollback", daemon=True).start()

    # ------------------------------------------------------------------------------------------ admin actions
    def audit(self, who: Principal, action: str, outcome: str, **detail: Any) -> None:
        """One line per admin action in ``audit.jsonl``: who (token name and role), what, and what came of it."""
        record = {"ts": now_iso(), "actor": who.name, "role": who.role, "action": action, "outcome": outcome, **detail}
        try:
            self._log(self.runtime.config.logs / AUDIT_LOG, 1).append(record)
        except (OSError, SensituneError) as e:  # a full disk must not stop the line; it shows in /metrics
            self.metrics.count("log_errors")
            log.error("cannot append to the audit log: %s", e)

    def _registry_later(self, reg: RegistryRef, action: str, version: str) -> None:
        self.outbox.submit(reg.tracking_uri, reg.model_name, action, version)

    def _registry_result(self, result: dict[str, Any]) -> None:
        """The registry's side of a decision, from the outbox's thread: into the audit log (and the log on failure)."""
        if result["outcome"] != "ok":
            log.error("registry alias moves for %s %s failed: %s", result["action"], result["version"], result["error"])
        detail = {k: v for k, v in result.items() if k not in ("outcome", "action")}
        self.audit(Principal("registry-outbox", ADMIN), "registry", result["outcome"], decision=result["action"],
                   **detail)  # fmt: skip

    def reload(self, who: Principal) -> dict[str, Any]:
        """Re-read the manifest; a malformed one (or an unloadable champion) is refused and nothing changes."""
        with self._control:
            try:
                rt = self._load(load_config(self.config_path), previous=self.runtime)
            except SensituneError as e:
                self.metrics.count("reloads_refused")
                log.error("reload refused: %s", e)
                self.audit(who, "reload", "refused", error=str(e))
                return {"ok": False, "error": str(e), **self.runtime.state()}
            self.runtime = rt  # atomic swap; in-flight requests keep their old runtime
            self.frames.capacity = rt.config.limits.served_frames
            self.metrics.count("reloads")
            self.audit(who, "reload", "ok", state=rt.state())
            return {"ok": True, **rt.state()}

    def decide(self, who: Principal, reason: str | None = None) -> dict[str, Any]:
        """Evaluate the manifest's rule on the logs and carry it out as a transaction (`_apply`)."""
        with self._control:
            cfg = self.runtime.config
            return self._apply(decide(report_for(cfg), cfg.decision), "rule", who, "decide", reason)

    def force(self, action: str, who: Principal, reason: str | None = None, source: str = "admin") -> dict[str, Any]:
        """An admin's promote or rollback of the current challenger, whatever the rule says (still transactional);
        `source` names the door in decisions.jsonl (``admin``: the API, ``ui:<name>``: the operator page)."""
        with self._control:
            cfg = self.runtime.config
            evidence = {"champion_version": cfg.champion.version}
            evidence["challenger_version"] = cfg.challenger.version if cfg.challenger else None
            why = reason or f"{action} by {who.name}"
            return self._apply(Decision(action, [why], evidence), source, who, action, reason)

    def _apply(self, decision: Decision, source: str, who: Principal, action: str, reason: str | None) -> dict:
        """Load + smoke-test the new runtime, then write the manifest (atomically), then swap (caller holds the lock).

        Raises:
            ArtifactError: The new champion does not load or fails its smoke test; nothing was written.
        """

        def prepare(new_cfg: RolloutConfig) -> Runtime:
            rt = self._build(new_cfg, with_challenger=False)
            if rt.champion is None:
                raise ArtifactError(f"champion {new_cfg.champion.version} failed to load ({rt.champion_error})")
            return rt

        try:
            record = apply_decision(self.config_path, decision, source=source, actor=who.name, before_write=prepare,
                                    registry_later=self._registry_later)  # fmt: skip
        except SensituneError as e:
            self.audit(who, action, "refused", reason=reason, error=str(e))
            raise ArtifactError(f"{e}; nothing changed: the manifest and the serving models are as they were") from e
        prepared = record.pop("prepared", None)
        if prepared is not None:
            self.runtime = prepared  # the swap, after the manifest says the same
        self.audit(who, action, "applied" if record["applied"] else "not applied", reason=reason,
                   decision=decision.action, before=record["before"], after=record["after"])  # fmt: skip
        return {**record, "state": self.runtime.state()}

    def report(self) -> dict[str, Any]:
        rt = self.runtime
        rep = report_for(rt.config)
        return {**rep, "state": rt.state(), "decision_preview": decide(rep, rt.config.decision).to_dict()}

    def close(self) -> None:
        for lg in self._logs.values():
            lg.close()
