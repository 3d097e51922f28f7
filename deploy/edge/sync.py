"""Fleet sync: an edge box follows the registry's `champion` and `challenger`, and sends its labelled frames back.

    sensitune-edge sync --box box.yaml [--once]                 the loop (the service runs it too: --box)
    sensitune-edge promote --box box.yaml --version 4 --who alice --evidence "QA sign-off 2026-11-29"

One sync, outbound only (`deploy.edge.mlflow_rest`, plain HTTP):
1. push: this box's applied promote/rollback decisions (rollout decisions.jsonl) move the registry aliases,
   each with an audit record (who, when, from, to, evidence, box) as a registered-model tag;
2. pull: the versions behind `champion` and `challenger`; each missing one is downloaded from its run's sealed
   export (``export/openvino/<precision>/``), checked (`deploy.edge.artifact.load_artifact`, sha256 + version) and
   renamed into ``store/<version>/<precision>/`` (a new folder per version; an existing good one is never
   rewritten, a damaged one is moved aside);
3. the rollout manifest's champion/challenger follow the aliases (the box's own cameras, share, pins and
   decision rule stay), and the service hot-reloads;
4. upload: labelled frames (unlabelled ones only with ``sync.upload_unlabelled: true``) go to the server's
   artifact store under ``incoming/<line>/<label>/<sha256>.<ext>`` with ``<sha256>.json`` provenance (line,
   camera, box, model version, time, who labelled); the content hash de-duplicates.

When the server cannot be reached the box keeps serving what it has; `status()` (in /healthz and /metrics) says
how stale it is. Torch-free: stdlib, PyYAML, deploy.edge.artifact/rollout/frames.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from deploy.edge.artifact import MANIFEST, ArtifactError, load_artifact
from deploy.edge.frame_store import FrameRule, FrameStore, GuardedFrames
from deploy.edge.mlflow_rest import RestRegistry
from deploy.edge.registry import CHALLENGER_ALIAS, CHAMPION_ALIAS
from deploy.edge.rollout.decision import manifest_lock
from deploy.edge.rollout.logs import JsonlLog
from deploy.edge.rollout.manifest import DECISION_LOG, ModelRef, RolloutError, load_config, parse_config, write_config
from spt_core.portable.errors import SensituneError, one_line
from spt_core.portable.io import write_json

STATE_FILE, AUDIT_LOG = "sync_state.json", "audit.jsonl"
log = logging.getLogger("sensitune.sync")


@dataclass
class BoxConfig:
    """box.yaml: one edge box. Relative paths are relative to the file."""

    box: str
    line: str
    rollout: Path
    store: Path
    url: str
    model_name: str
    precision: str = "fp32"
    timeout_s: float = 10.0
    interval_s: float = 60.0
    stale_after_s: float = 300.0
    challenger_share: float = 0.25  # for a challenger arriving at a box whose manifest has share 0
    upload_unlabelled: bool = False
    frames_dir: Path | None = None
    frames_quota_mb: float = 500.0
    frame_rule: FrameRule = field(default_factory=FrameRule)

    @classmethod
    def load(cls, path: str | Path) -> BoxConfig:
        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
            base = path.resolve().parent
            reg, sync, frames = d["registry"], d.get("sync") or {}, d.get("frames")
            return cls(
                box=str(d["box"]), line=str(d["line"]), rollout=base / d.get("rollout", "rollout.yaml"),
                store=base / d.get("store", "store"), url=str(reg["url"]), model_name=str(reg["model_name"]),
                precision=str(reg.get("precision", "fp32")), timeout_s=float(reg.get("timeout_s", 10.0)),
                interval_s=float(sync.get("interval_s", 60.0)), stale_after_s=float(sync.get("stale_after_s", 300)),
                challenger_share=float(sync.get("challenger_share", 0.25)),
                upload_unlabelled=bool(sync.get("upload_unlabelled", False)),
                frames_dir=None if frames is None else base / frames.pop("dir", "frames"),
                frames_quota_mb=float((frames or {}).pop("quota_mb", 500.0)),
                frame_rule=FrameRule.from_dict(frames),
            )  # fmt: skip
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
            raise SensituneError(
                f"{path}: not a usable box config ({one_line(e)}); see docs/from-images-to-line.md"
            ) from None

    def frame_store(self) -> FrameStore | None:
        return None if self.frames_dir is None else FrameStore(self.frames_dir, self.frame_rule, self.frames_quota_mb)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Sync:
    """One box's sync; `run_once` is one round, `start` a background loop. ``on_change`` hot-reloads the service."""

    def __init__(self, box: BoxConfig, frames: FrameStore | None = None, on_change: Any = None) -> None:
        self.box, self.frames, self.on_change = box, frames, on_change
        self.reg = RestRegistry(box.url, box.model_name, box.timeout_s)
        box.store.mkdir(parents=True, exist_ok=True)
        self.state_path = box.store / STATE_FILE
        try:
            self.state: dict[str, Any] = json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError):
            self.state = {"last_ok": None, "last_attempt": None, "error": None, "decisions_pushed": 0}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        """Staleness for /healthz and /metrics: seconds since the last good sync (None: never synced)."""
        s = dict(self.state)
        last = s.get("last_ok_epoch")
        s["stale_s"] = None if last is None else round(time.time() - last, 1)
        s["stale"] = last is None or s["stale_s"] > self.box.stale_after_s or s.get("error") is not None
        s["box"] = self.box.box
        return {k: v for k, v in s.items() if k != "last_ok_epoch"}

    # ----------------------------------------------------------------------------------------------- rounds
    def run_once(self) -> dict[str, Any]:
        """One round (push, pull, manifest, upload); never raises for registry trouble (it is in the status)."""
        with self._lock:
            self.state["last_attempt"] = _now()
            out: dict[str, Any] = {"changed": False}
            try:
                out["pushed"] = self._push_decisions()
                versions = {a: self.reg.alias(a) for a in (CHAMPION_ALIAS, CHALLENGER_ALIAS)}
                if versions[CHAMPION_ALIAS] is None:
                    raise SensituneError(f"{self.box.model_name}@champion is not set in the registry yet")
                paths = {a: self._fetch(mv) for a, mv in versions.items() if mv is not None}
                out["changed"] = self._update_manifest(versions, paths)
                out["versions"] = {a: (mv or {}).get("version") for a, mv in versions.items()}
                out["uploaded"] = self._upload_frames()
                self.state.update(last_ok=_now(), last_ok_epoch=time.time(), error=None, **out["versions"])
            except (SensituneError, OSError) as e:
                self.state["error"] = one_line(e)
                out["error"] = self.state["error"]
            write_json(self.state_path, self.state)
        if out["changed"] and self.on_change is not None:
            out["reload"] = self.on_change()
        return out

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.run_once()
                self._stop.wait(self.box.interval_s)

        self._thread = threading.Thread(target=loop, name="sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.box.timeout_s * 4)

    # ------------------------------------------------------------------------------------------------- pull
    def _fetch(self, mv: dict[str, Any]) -> Path:
        """store/<version>/<precision>/, downloaded and verified unless already there and intact."""
        version, prec = mv["version"], self.box.precision
        target = self.box.store / version / prec
        if target.is_dir():
            try:
                load_artifact(target, expected_version=version)
                return target
            except ArtifactError:  # damaged on disk: keep it aside for inspection, fetch again
                target.rename(target.with_name(f".damaged-{prec}-{int(time.time())}"))
        where = f"export/openvino/{prec}"
        manifest = json.loads(self.reg.read_run_file(mv["run_id"], f"{where}/{MANIFEST}"))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{prec}.tmp-", dir=target.parent))
        try:
            for name in manifest.get("files", {}):
                if Path(name).name != name:
                    raise ArtifactError(f"v{version}: file name {name!r} leaves the artifact dir; re-publish it")
                self.reg.download(mv["run_id"], f"{where}/{name}", tmp / name)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            load_artifact(tmp, expected_version=version)  # sha256 of every file + the registry version
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _update_manifest(self, versions: dict[str, Any], paths: dict[str, Path]) -> bool:
        """Point this box's champion/challenger at the registry's; True when the manifest changed."""
        path, base = self.box.rollout, self.box.rollout.resolve().parent

        def ref(alias: str) -> ModelRef | None:
            mv = versions.get(alias)
            if mv is None or (alias == CHALLENGER_ALIAS and mv["version"] == versions[CHAMPION_ALIAS]["version"]):
                return None
            return ModelRef(mv["version"], str(Path(_rel(paths[alias], base))))

        with manifest_lock(path):
            champion, challenger = ref(CHAMPION_ALIAS), ref(CHALLENGER_ALIAS)
            if path.is_file():
                cfg = load_config(path)
            else:
                cfg = parse_config({"line": self.box.line, "champion": vars(champion)}, base, source=str(path))
            share = cfg.challenger_share or (self.box.challenger_share if challenger else 0.0)
            new = replace(cfg, champion=champion, challenger=challenger, challenger_share=share, registry=None)
            if path.is_file() and new.to_dict() == cfg.to_dict():
                return False
            write_config(new, path)
            return True

    # ------------------------------------------------------------------------------------------------- push
    def _push_decisions(self) -> int:
        """Applied decisions of this box not yet in the registry -> alias moves with an audit record."""
        try:
            cfg = load_config(self.box.rollout)
        except RolloutError:
            return 0
        log_path = cfg.logs / DECISION_LOG
        lines = log_path.read_text().splitlines() if log_path.is_file() else []
        done, pushed = int(self.state.get("decisions_pushed", 0)), 0
        for i, line in enumerate(lines[done:], start=done):
            rec = json.loads(line)
            if rec.get("applied") and rec.get("action") in ("promote", "rollback"):
                version = rec.get("evidence", {}).get("challenger_version")
                who = f"{self.box.box}:{rec.get('actor') or rec.get('source', 'rule')}"
                evidence = {k: rec.get(k) for k in ("source", "reasons", "evidence")}
                if rec["action"] == "promote":
                    move(self.reg, version, who=who, evidence=evidence, box=self.box.box, log_to=self._audit)
                elif (self.reg.alias(CHALLENGER_ALIAS) or {}).get("version") == version:  # not moved on meanwhile
                    self.reg.delete_alias(CHALLENGER_ALIAS)
                    self._audit(audit(self.reg, CHALLENGER_ALIAS, version, None, who, evidence, self.box.box))
                pushed += 1
            self.state["decisions_pushed"] = i + 1
        return pushed

    def _audit(self, record: dict[str, Any]) -> None:
        log = JsonlLog(self.box.store / AUDIT_LOG)
        try:
            log.append(record)
        finally:
            log.close()

    # ----------------------------------------------------------------------------------------------- upload
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


def _rel(p: Path, base: Path) -> str:
    return os.path.relpath(p.resolve(), base)


def audit(reg: RestRegistry, alias: str, before: str | None, after: str | None, who: str, evidence: Any,
          box: str | None) -> dict[str, Any]:  # fmt: skip
    """Write one alias move's audit record to the registry (model tag ``audit.<time>``); returns it."""
    rec = {"ts": _now(), "model_name": reg.model_name, "alias": alias, "from_version": before, "to_version": after,
           "who": who, "evidence": evidence, "box": box}  # fmt: skip
    stamp = "".join(ch for ch in rec["ts"][:23] if ch.isdigit())  # tag keys allow [\w.\- /] only
    reg.set_model_tag(f"audit.{stamp}.{alias}", json.dumps(rec)[:4900])
    if after is not None:
        reg.set_version_tag(after, f"audit.{alias}", json.dumps(rec)[:4900])
    return rec


def move(
    reg: RestRegistry, version: str, *, who: str, evidence: Any, box: str | None = None, log_to: Any = None
) -> list:
    """Promote `version` in the registry: `champion` -> it, `challenger` cleared if it pointed there; audited."""
    before = (reg.alias(CHAMPION_ALIAS) or {}).get("version")
    records = []
    if before != str(version):
        reg.set_alias(CHAMPION_ALIAS, str(version))
        records.append(audit(reg, CHAMPION_ALIAS, before, str(version), who, evidence, box))
    if (reg.alias(CHALLENGER_ALIAS) or {}).get("version") == str(version):
        reg.delete_alias(CHALLENGER_ALIAS)
        records.append(audit(reg, CHALLENGER_ALIAS, str(version), None, who, evidence, box))
    for r in records:
        if log_to is not None:
            log_to(r)
    return records


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
            reg = RestRegistry(box.url, box.model_name, box.timeout_s)
            print(json.dumps(move(reg, a.version, who=a.who, evidence=a.evidence, box=box.box), indent=2))
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
    store = box.frame_store()
    service.frame_store = None if store is None else GuardedFrames(store)
    service.sync = Sync(box, store, on_change=lambda: service.reload(Principal(f"sync:{box.box}", ADMIN)))
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
