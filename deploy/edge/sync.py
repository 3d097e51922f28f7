"""Fleet sync: an edge box follows the registry's `champion` and `challenger`, and sends its labelled frames back.

    sensitune-edge sync --box box.yaml [--once]                 the loop (the service runs it too: --box)
    sensitune-edge promote --box box.yaml --version 4 --who alice --evidence "QA sign-off 2026-11-29"

One sync, outbound only (`deploy.edge.mlflow_rest`, plain HTTP):
1. push: this box's applied promote/rollback decisions (rollout decisions.jsonl) move the registry aliases,
   each with an audit record (who, when, from, to, evidence, box) as a registered-model tag; in a fleet
   (``sync.fleet: true``, or a version under a fleet plan) they stay on the box and are reported instead;
2. pull: the versions behind `champion` and `challenger` (safe ids, never paths), each through
   `deploy.edge.acceptance.Intake` (staged download, sha256, signature, compile, smoke test, compatibility with the
   serving champion) into ``store/<version>/<precision>/``, the precision the box is set to or, where export
   refused it, the next promotable one down (int8 -> fp16 -> fp32; ``serving`` in the status says which and why);
   a refused version is named in the status (``refused``) and the audit log, and the box keeps what it serves;
3. the rollout manifest's champion/challenger follow the accepted versions (the box's own cameras, share, pins and
   decision rule stay), written atomically, and the service hot-reloads;
4. upload: labelled frames (unlabelled ones only with ``sync.upload_unlabelled: true``) go to the server's
   artifact store under ``incoming/<line>/<label>/<sha256>.<ext>`` with ``<sha256>.json`` provenance (line,
   camera, box, model version, time, who labelled); the content hash de-duplicates.

In a fleet rollout (`deploy.edge.fleet.member`) the box serves the challenger only in the plan's current wave,
reports its counts after the pull, and drops a plan's challenger it has not confirmed for ``stale_after_s``.
When the server cannot be reached, answers garbage or drips, the box keeps serving what it has; the loop never dies
(every failure is the round's ``error``, counted); `status()` (in /healthz and /metrics) says how stale it is.
Torch-free: stdlib, PyYAML, deploy.edge.artifact/acceptance/rollout/frames.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from deploy.edge.acceptance import Intake
from deploy.edge.artifact import ArtifactError, load_artifact
from deploy.edge.box import BoxConfig
from deploy.edge.fleet.member import FleetMember
from deploy.edge.frame_store import FrameStore, GuardedFrames
from deploy.edge.mlflow_rest import audit, move
from deploy.edge.registry import CHALLENGER_ALIAS, CHAMPION_ALIAS
from deploy.edge.rollout.decision import manifest_lock
from deploy.edge.rollout.logs import JsonlLog
from deploy.edge.rollout.logs import now_iso as _now
from deploy.edge.rollout.manifest import DECISION_LOG, ModelRef, RolloutError, load_config, parse_config, write_config
from spt_core.portable.errors import SensituneError, one_line
from spt_core.portable.io import write_json

STATE_FILE, AUDIT_LOG = "sync_state.json", "audit.jsonl"
COUNTERS = {"errors_total": "sync_errors", "bad_replies": "registry_bad_replies", "refused_total": "models_refused",
            "skipped_log_lines": "sync_errors"}  # status key -> deploy.edge.metrics count  # fmt: skip
log = logging.getLogger("sensitune.sync")


class Sync:
    """One box's sync; `run_once` is one round, `start` a background loop that never dies. ``on_change`` hot-reloads
    the service; ``metrics`` (the service's `deploy.edge.metrics.Metrics`) counts errors, bad replies, refusals."""

    def __init__(self, box: BoxConfig, frames: FrameStore | None = None, on_change: Any = None,
                 metrics: Any = None) -> None:  # fmt: skip
        self.box, self.frames, self.on_change, self.metrics = box, frames, on_change, metrics
        self.reg, self.trust = box.registry(), box.trust()
        self.intake = Intake(self.reg, box.store, box.precision, self.trust, on_refuse=self._refused)
        self.state_path = box.store / STATE_FILE
        self.state: dict[str, Any] = {"last_ok": None, "last_attempt": None, "error": None, "decisions_pushed": 0,
                                      "refused": {}, **dict.fromkeys(COUNTERS, 0)}  # fmt: skip
        with contextlib.suppress(OSError, ValueError, TypeError):
            self.state.update(json.loads(self.state_path.read_text()))
        self.fleet = FleetMember(box, self.state)
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread: threading.Thread | None = None

    def status(self) -> dict[str, Any]:
        """Staleness for /healthz and /metrics: seconds since the last good sync (None: never synced), the last
        error, the refused versions and why, the counters, and the keys this box trusts."""
        s = dict(self.state)
        last = s.get("last_ok_epoch")
        s["stale_s"] = None if last is None else round(time.time() - last, 1)
        s["stale"] = last is None or s["stale_s"] > self.box.stale_after_s or s.get("error") is not None
        s["box"] = self.box.box
        s["trust"] = self.trust.describe()
        return {k: v for k, v in s.items() if k != "last_ok_epoch"}

    def _refused(self, role: str, version: str, reason: str) -> None:
        """A version refused by acceptance (first time only): counted, logged, audited."""
        self._count("refused_total")
        log.error("%s v%s refused: %s", role, version, reason)
        self._audit({"ts": _now(), "action": "refuse", "role": role, "version": version, "reason": reason,
                     "box": self.box.box})  # fmt: skip

    def _count(self, key: str, n: int = 1) -> None:
        self.state[key] = int(self.state.get(key, 0)) + n
        for _ in range(n if self.metrics is not None else 0):
            self.metrics.count(COUNTERS[key])

    def run_once(self) -> dict[str, Any]:
        """One round (push, pull, manifest, upload); never raises: any failure is the round's ``error``."""
        with self._lock:
            self.state["last_attempt"] = _now()
            out: dict[str, Any] = {"changed": False}
            bad_before = self.reg.bad_replies
            try:
                out["pushed"] = self._push_decisions()
                versions = {a: self.reg.alias(a) for a in (CHAMPION_ALIAS, CHALLENGER_ALIAS)}
                if versions[CHAMPION_ALIAS] is None:
                    raise SensituneError(f"{self.box.model_name}@champion is not set in the registry yet")
                versions[CHALLENGER_ALIAS] = self.fleet.challenger(versions[CHALLENGER_ALIAS])  # its wave, if a plan
                out["changed"], refused = self._pull(versions)
                out["versions"] = {a: (mv or {}).get("version") for a, mv in versions.items()}
                self.state["serving"] = {a: {"version": v, **self.intake.serving.get(v, {})}  # which precision, why
                                         for a, v in out["versions"].items() if v is not None}  # fmt: skip
                out["uploaded"] = self._upload_frames()
                out["reported"] = self.fleet.report(self.reg, self.box.rollout)
                self.state.update(last_ok=_now(), last_ok_epoch=time.time(), error=None, refused=refused,
                                  **out["versions"])  # fmt: skip
                if champion_refused := refused.get(out["versions"][CHAMPION_ALIAS]):
                    self.state["error"] = f"champion v{out['versions'][CHAMPION_ALIAS]} refused: {champion_refused}"
                    out["error"] = self.state["error"]
            except Exception as e:  # the loop must outlive any reply: the error is the round's, and counted
                if not isinstance(e, (SensituneError, OSError)):
                    log.exception("sync round failed")
                self.state["error"] = str(e) if isinstance(e, SensituneError) else one_line(e, None)
                out["error"] = self.state["error"]
                self._count("errors_total")
                out["changed"] = self._lapse()
            self._count("bad_replies", self.reg.bad_replies - bad_before)
            try:
                write_json(self.state_path, self.state)
            except OSError as e:
                log.error("cannot write %s: %s", self.state_path, e)
        if out["changed"] and self.on_change is not None:
            try:
                out["reload"] = self.on_change()
            except Exception as e:
                out["error"] = self.state["error"] = f"reload after sync failed: {one_line(e, None)}"
        return out

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except Exception:  # run_once catches everything; the last line of defence
                    log.exception("sync round failed outside its guard")
                self._stop.wait(self.box.interval_s)

        self._thread = threading.Thread(target=loop, name="sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.box.timeout_s * 4)

    def _pull(self, versions: dict[str, Any]) -> tuple[bool, dict[str, str]]:
        """Fetch and accept the registry's champion and challenger; write the manifest for those accepted.
        Returns (manifest changed, {refused version: why})."""
        cfg = load_config(self.box.rollout) if self.box.rollout.is_file() else None
        serving = None  # the serving champion's artifact; None: no manifest yet, or its files are gone
        with contextlib.suppress(ArtifactError, AttributeError):
            serving = load_artifact(cfg.resolve(cfg.champion.path), expected_version=cfg.champion.version)
        refused: dict[str, str] = {}
        champ_mv, chall_mv = versions[CHAMPION_ALIAS], versions[CHALLENGER_ALIAS]
        champion = None
        try:
            path, champ_art = self.intake.fetch(champ_mv, serving, CHAMPION_ALIAS)
            champion = ModelRef(champ_mv["version"], self._rel(path))
        except ArtifactError as e:
            refused[champ_mv["version"]] = str(e)
            if cfg is None:
                raise SensituneError(f"champion v{champ_mv['version']} refused: {e}") from None
            champ_art = serving
        challenger = None
        if chall_mv is not None and chall_mv["version"] != (champion or cfg.champion).version:
            try:
                path, _ = self.intake.fetch(chall_mv, champ_art, CHALLENGER_ALIAS)
                challenger = ModelRef(chall_mv["version"], self._rel(path))
            except ArtifactError as e:
                refused[chall_mv["version"]] = str(e)
        return self._update_manifest(champion, challenger), refused

    def _rel(self, folder: Path) -> str:
        """`folder` relative to the rollout manifest's folder (the manifest stays valid when the box moves)."""
        return os.path.relpath(folder.resolve(), self.box.rollout.resolve().parent)

    def _update_manifest(self, champion: ModelRef | None, challenger: ModelRef | None) -> bool:
        """Point this box's champion (None: keep it) and challenger at the accepted versions; True when changed."""
        path, base = self.box.rollout, self.box.rollout.resolve().parent
        with manifest_lock(path):
            if path.is_file():
                cfg = load_config(path)
            else:
                cfg = parse_config({"line": self.box.line, "champion": vars(champion)}, base, source=str(path))
            share = cfg.challenger_share or (self.box.challenger_share if challenger else 0.0)
            new = self.fleet.adjust(replace(cfg, champion=champion or cfg.champion, challenger=challenger,
                                            challenger_share=share, registry=None))  # fmt: skip
            if path.is_file() and new.to_dict() == cfg.to_dict():
                return False
            write_config(new, path)
            return True

    def _lapse(self) -> bool:
        """After a failed round: drop a plan's challenger this box has not confirmed for ``stale_after_s`` (an abort
        it cannot hear must not keep reaching its line); True when the manifest changed."""
        if not self.fleet.lapsed() or not self.box.rollout.is_file():
            return False
        self.fleet.dropped()
        log.warning("no registry for %.0f s: the fleet challenger is dropped until it answers", self.box.stale_after_s)
        try:
            return self._update_manifest(None, None)
        except (RolloutError, OSError) as e:
            log.error("cannot drop the challenger from %s: %s", self.box.rollout, e)
            return False

    def _push_decisions(self) -> int:
        """Applied decisions of this box not yet in the registry -> alias moves with an audit record. A line that is
        not JSON (torn by a crash) is skipped and counted; a line still being written (no newline yet) waits."""
        try:
            cfg = load_config(self.box.rollout)
        except RolloutError:
            return 0
        log_path = cfg.logs / DECISION_LOG
        lines = log_path.read_bytes().split(b"\n")[:-1] if log_path.is_file() else []
        done, pushed = int(self.state.get("decisions_pushed", 0)), 0
        for i, line in enumerate(lines[done:], start=done):
            try:
                rec = json.loads(line)
                assert isinstance(rec, dict)
            except (ValueError, AssertionError):
                if line.strip():
                    self._count("skipped_log_lines")
                    log.warning("%s line %d is not a JSON record (torn by a crash?): skipped", log_path, i + 1)
                self.state["decisions_pushed"] = i + 1
                continue
            if rec.get("applied") and rec.get("action") in ("promote", "rollback"):
                version = (rec.get("evidence") or {}).get("challenger_version")
                who = f"{self.box.box}:{rec.get('actor') or rec.get('source', 'rule')}"
                evidence = {k: rec.get(k) for k in ("source", "reasons", "evidence")}
                if self.fleet.owns(self.reg, version):  # the fleet decides on its versions: this stays local
                    self.fleet.note_local(rec)
                elif rec["action"] == "promote":
                    move(self.reg, version, who=who, evidence=evidence, box=self.box.box, log_to=self._audit)
                elif (self.reg.alias(CHALLENGER_ALIAS) or {}).get("version") == version:  # not moved on meanwhile
                    self.reg.delete_alias(CHALLENGER_ALIAS)
                    self._audit(audit(self.reg, CHALLENGER_ALIAS, version, None, who, evidence, self.box.box))
                pushed += 1
            self.state["decisions_pushed"] = i + 1
        return pushed

    def _audit(self, record: dict[str, Any]) -> None:
        with contextlib.closing(JsonlLog(self.box.store / AUDIT_LOG)) as audit_log:
            audit_log.append(record)

    def _upload_frames(self) -> int:
        if self.frames is None:
            return 0
        frames = self.frames.labelled_since(0, not_uploaded=True)
        if self.box.upload_unlabelled:
            frames += self.frames.unlabelled()
        done = []
        for f in frames:
            folder = f"incoming/{self.box.line}/{f.label or '_unlabelled'}"
            prov = {**f.to_dict(), "box": self.box.box, "line": f.line or self.box.line, "uploaded_at": _now()}
            data = self.frames.image_path(f).read_bytes()
            self.reg.put_file(f"{folder}/{f.sha256}{f.suffix}", data)  # same bytes, same name: de-duplicated
            self.reg.put_file(f"{folder}/{f.sha256}.json", json.dumps(prov, indent=2).encode())
            done.append(f.frame_id)
        self.frames.mark_uploaded(done)
        return len(done)


def main(argv: list[str] | None = None) -> int:
    """`sensitune-edge sync|promote ...`; returns the exit code."""
    ap = argparse.ArgumentParser(prog="sensitune-edge", description="Fleet sync with the MLflow registry.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sync", help="follow the registry's champion/challenger; upload labelled frames")
    s.add_argument("--box", type=Path, required=True, help="box.yaml")
    s.add_argument("--once", action="store_true", help="one round, print it, exit (1 when the server failed)")
    p = sub.add_parser("promote", help="a person's promotion: move the registry aliases, audited")
    p.add_argument("--box", type=Path, required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--who", required=True)
    p.add_argument("--evidence", required=True, help="what the decision rests on (report, sign-off)")
    a = ap.parse_args(argv)
    try:
        box = BoxConfig.load(a.box)
        if a.cmd == "promote":
            print(json.dumps(move(box.registry(), a.version, who=a.who, evidence=a.evidence, box=box.box), indent=2))
            return 0
        sync = Sync(box, box.frame_store())
        if a.once:
            out = sync.run_once()
            print(json.dumps({**out, "status": sync.status()}, indent=2))
            return 1 if "error" in out else 0
        sync.start()
        while True:
            time.sleep(3600)
    except SensituneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())


def first_sync(config_path: str | Path, box_path: str | Path | None) -> None:
    """A box without a rollout manifest yet: one sync round writes it (and fetches the models) before serving."""
    if box_path is None or Path(config_path).is_file():
        return
    box = replace(BoxConfig.load(box_path), rollout=Path(config_path).resolve())
    out = Sync(box).run_once()
    if "error" in out:
        raise SensituneError(f"{config_path} does not exist and the first sync failed ({out['error']}); retry")


def attach(service: Any, box_path: str | Path | None) -> Any:
    """Give an `EdgeService` this box's frame store and sync (hot-reload on change; started by the app), and
    return the service. The box's rollout manifest is the service's (``--config``). No box: unchanged."""
    if box_path is None:
        return service
    from deploy.edge.auth import ADMIN, Principal

    box = replace(BoxConfig.load(box_path), rollout=service.config_path)
    store = box.frame_store(service.metrics.count)
    service.frame_store = None if store is None else GuardedFrames(store)
    reload = lambda: service.reload(Principal(f"sync:{box.box}", ADMIN))  # noqa: E731
    service.sync = Sync(box, store, on_change=reload, metrics=service.metrics)
    return service


def sync_status(service: Any) -> dict[str, Any]:
    """``{"sync": status}`` for /healthz and /metrics, ``{}`` for a service without a box."""
    return {} if getattr(service, "sync", None) is None else {"sync": service.sync.status()}


def prometheus_lines(status: dict[str, Any] | None) -> str:
    """The sync status as Prometheus gauges (stale seconds, -1 = never synced; ok 0/1); "" without a box."""
    if status is None:
        return ""
    stale = -1 if status.get("stale_s") is None else status["stale_s"]
    ok = 0 if status.get("error") else 1
    return (f"# TYPE sensitune_sync_stale_seconds gauge\nsensitune_sync_stale_seconds {stale}\n"
            f"# TYPE sensitune_sync_ok gauge\nsensitune_sync_ok {ok}\n")  # fmt: skip
