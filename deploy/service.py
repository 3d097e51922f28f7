"""Edge inference service: an OpenVINO champion (and challenger) behind one HTTP API for the line's cameras.

Start (one command): ``sensitune-edge --config rollout.yaml --host 127.0.0.1 --port 8080``

Endpoints: POST /predict (multipart `file` + form `camera_id`, optional `frame_id`), POST /feedback
{frame_id, label}, GET /healthz, GET /readyz, GET /metrics[?format=prometheus], GET /report, POST /reload,
POST /decide. The rollout manifest (`deploy.rollout`) says which model serves which camera.

Edge-only dependencies: OpenVINO, numpy, Pillow, FastAPI/uvicorn, PyYAML. No torch; from spt_core only its
torch-free leaves (preprocessing, errors, io). Artifacts are read through `deploy.artifact`, run through
`deploy.inferencer`, judged by `deploy.rollout.decision`; this module is the HTTP API and the runtime swap.

Concurrency: requests run in uvicorn's thread pool; each model owns a pool of OpenVINO infer requests (one
request per thread at a time). A reload builds a complete new `Runtime` and swaps one reference: a request
reads `service.runtime` once, so in-flight requests finish on the runtime they started with.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import BackgroundTasks, FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image
from pydantic import BaseModel

from deploy.artifact import MANIFEST, ArtifactError, load_artifact
from deploy.inferencer import Inferencer
from deploy.metrics import Metrics
from deploy.rollout.decision import ChallengerHealth, apply_decision, decide, roll_back
from deploy.rollout.logs import JsonlLog, now_iso
from deploy.rollout.manifest import (
    CHALLENGER,
    CHAMPION,
    FEEDBACK_LOG,
    PRED_LOG,
    RolloutConfig,
    RolloutError,
    load_config,
)
from deploy.rollout.split import assign_arm
from deploy.rollout.stats import report_for
from deploy.sync import attach, first_sync, prometheus_lines
from deploy.sync import main as sync_main
from spt_core.errors import SensituneError, one_line

log = logging.getLogger("sensitune.edge")


def load_model(artifact_dir: Path, version: str | None = None, openvino: dict[str, Any] | None = None) -> Inferencer:
    """A model the rollout manifest names: its artifact verified (`load_artifact`, ``model_version`` must equal
    ``version``), refused when export's gate failed for it (``promotable: false``), compiled with ``openvino`` laid
    over its ``runtime_config`` (`Inferencer.from_artifact`). Raises `ArtifactError`."""
    artifact = load_artifact(artifact_dir, expected_version=version)
    if artifact.promotable is False:  # deploy.export's verification gate failed for this artifact
        raise ArtifactError(
            f"{artifact.dir / MANIFEST}: promotable=false (see its 'verification'); fix the export or pick another"
        )
    return Inferencer.from_artifact(artifact, openvino)


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
    gate: threading.Semaphore = field(default_factory=lambda: threading.BoundedSemaphore(1))

    def __post_init__(self) -> None:
        if self.health is None:
            self.health = ChallengerHealth(self.config.decision.max_error_rate)

    def arm(self, camera_id: str) -> str:
        if self.challenger is None or self.health.disabled:
            return CHAMPION
        return assign_arm(camera_id, self.config)

    @property
    def challenger_state(self) -> str:
        """none (no challenger), failed (load or error-rate failure; rolled back), serving."""
        if self.challenger_error or self.health.disabled:
            return "failed"
        return "serving" if self.challenger is not None else "none"

    def state(self) -> dict[str, Any]:
        ch = self.config.challenger
        return {
            "line": self.config.line,
            "champion": self.champion.version if self.champion else None,
            "champion_error": self.champion_error,
            "challenger": ch.version if ch else None,
            "challenger_state": self.challenger_state,
            "challenger_error": self.challenger_error,
            "challenger_share": self.config.challenger_share,
            "shadow": self.config.shadow,
            "openvino": self.champion.ov_config if self.champion else None,
            "loaded_at": self.loaded_at,
        }


class EdgeService:
    """The service behind the HTTP routes (usable without HTTP, e.g. in tests)."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = Path(config_path).resolve()
        self.metrics = Metrics()
        self._control = threading.Lock()  # one reload / decision at a time
        self._logs: dict[Path, JsonlLog] = {}  # kept open for the process: old runtimes may still write
        self.frames: Any = None  # deploy.frame_store.FrameStore and deploy.sync.Sync when started with --box
        self.sync: Any = None
        with self._control:
            self.runtime = self._load(load_config(self.config_path), previous=None)

    # ---------------------------------------------------------------------------------------------- control
    def _log(self, path: Path, fsync_every: int) -> JsonlLog:
        if path not in self._logs:
            # predictions: group fsync (64 records / 0.5 s); feedback is rarer and precious: fsync each
            try:
                self._logs[path] = JsonlLog(path, fsync_every=fsync_every, fsync_interval_s=0.5)
            except OSError as e:
                raise RolloutError(
                    f"log_dir {path.parent}: cannot open {path.name} ({e.strerror}); fix log_dir"
                ) from None
        return self._logs[path]

    def _load(self, cfg: RolloutConfig, previous: Runtime | None) -> Runtime:
        champion = challenger = None
        champion_error = challenger_error = None
        try:
            champion = load_model(cfg.resolve(cfg.champion.path), cfg.champion.version, cfg.openvino)
        except Exception as e:
            champion_error = str(e) if isinstance(e, SensituneError) else one_line(e)
        if champion is None and previous is not None and previous.champion is not None:
            raise ArtifactError(f"champion {cfg.champion.version} failed to load ({champion_error}); nothing changed")
        if cfg.challenger is not None and champion is not None:
            try:
                challenger = load_model(cfg.resolve(cfg.challenger.path), cfg.challenger.version, cfg.openvino)
            except Exception as e:
                challenger_error = str(e) if isinstance(e, SensituneError) else one_line(e)
        logs = (self._log(cfg.logs / PRED_LOG, 64), self._log(cfg.logs / FEEDBACK_LOG, 1))
        # inferences at once = the champion's optimal number of requests (1 per stream: LATENCY 1, THROUGHPUT ~cores)
        gate = threading.BoundedSemaphore(champion.n_requests if champion else 1)
        rt = Runtime(cfg, champion, challenger, *logs, champion_error=champion_error, gate=gate)
        if champion_error:
            log.error("champion not loaded, not ready: %s", champion_error)
        if challenger_error:
            log.error("challenger %s failed to load, rolling back: %s", cfg.challenger.version, challenger_error)
            rt = self._rollback(rt, f"challenger {cfg.challenger.version} failed to load: {challenger_error}", "load")
        return rt

    def _rollback(self, rt: Runtime, reason: str, why: str) -> Runtime:
        """Automatic rollback (caller holds the control lock): manifest, registry, decision log; champion serves."""
        record = None
        try:
            record = roll_back(self.config_path, rt.config, reason, why)
            cfg = load_config(self.config_path)
        except SensituneError as e:  # manifest unusable now: keep serving the champion from memory
            log.error("automatic rollback could not rewrite %s: %s", self.config_path, e)
            cfg = rt.config
        log.warning("rolled back challenger %s: %s (%s)", rt.config.challenger.version, reason, record)
        health = ChallengerHealth(cfg.decision.max_error_rate, disabled=True)  # the champion answers every camera
        return replace(rt, config=cfg, challenger=None, challenger_error=reason, health=health, loaded_at=now_iso())

    def reload(self) -> dict[str, Any]:
        """Re-read the manifest; a malformed one (or an unloadable champion) is refused and nothing changes."""
        with self._control:
            try:
                rt = self._load(load_config(self.config_path), previous=self.runtime)
            except SensituneError as e:
                self.metrics.count("reloads_refused")
                log.error("reload refused: %s", e)
                return {"ok": False, "error": str(e), **self.runtime.state()}
            self.runtime = rt  # atomic swap; in-flight requests keep their old runtime
            self.metrics.count("reloads")
            return {"ok": True, **rt.state()}

    def _auto_rollback_async(self, rt: Runtime, reason: str) -> None:
        def run() -> None:
            with self._control:
                if self.runtime is rt:  # not replaced meanwhile by a reload or decision
                    self.runtime = self._rollback(rt, reason, "error-rate")

        threading.Thread(target=run, name="auto-rollback", daemon=True).start()

    def decide(self) -> dict[str, Any]:
        """Evaluate the manifest's rule on the logs and apply it; the new manifest is loaded at once."""
        with self._control:
            cfg = self.runtime.config
            decision = decide(report_for(cfg), cfg.decision)
            record = apply_decision(self.config_path, decision, source="rule")
            if record["applied"]:
                self.runtime = self._load(load_config(self.config_path), previous=self.runtime)
            return {**record, "state": self.runtime.state()}

    def report(self) -> dict[str, Any]:
        rt = self.runtime
        rep = report_for(rt.config)
        return {**rep, "state": rt.state(), "decision_preview": decide(rep, rt.config.decision).to_dict()}

    # ---------------------------------------------------------------------------------------------- data path
    def _write(self, target: JsonlLog, record: dict[str, Any]) -> None:
        try:
            target.append(record)
        except OSError as e:  # a full disk must not stop the line; it shows in /metrics
            self.metrics.count("log_errors")
            log.error("cannot append to %s: %s", target.path, e)

    def predict(
        self, data: bytes, camera_id: str, frame_id: str | None, defer: Callable[..., Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One frame -> (HTTP status, body). `defer(fn, *args)` runs the shadow challenger after the response."""
        t0 = time.perf_counter()
        rt = self.runtime  # read once: this request finishes on this runtime even if a reload swaps it
        if rt.champion is None:
            self.metrics.request(None, "error")
            return 503, {"error": f"not ready: champion not loaded ({rt.champion_error})"}
        if not camera_id or len(camera_id) > 128:
            self.metrics.request(None, "bad")
            return 400, {"error": f"camera_id={camera_id[:40]!r}: give a non-empty id of at most 128 characters"}
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = im.convert("RGB")
        except Exception as e:
            self.metrics.request(None, "bad")
            return 400, {"error": f"file: not a readable image ({one_line(e)}); send a PNG or JPEG frame"}
        frame_id = frame_id or uuid.uuid4().hex
        base = {"ts": now_iso(), "frame_id": frame_id, "camera_id": camera_id}
        role, fallback, out = rt.arm(camera_id), False, None
        if role == CHALLENGER:
            try:
                out = rt.challenger.predict(image, rt.gate)
                rt.health.note(ok=True)
            except Exception as e:  # the champion answers instead; counted against the challenger
                err = one_line(e)
                self.metrics.model(CHALLENGER, rt.challenger.version, None)
                self._write(
                    rt.pred_log,
                    {**base, "role": CHALLENGER, "model_version": rt.challenger.version, "error": err, "served": False},
                )
                if rt.health.note(ok=False):
                    self._auto_rollback_async(
                        rt, f"challenger {rt.challenger.version} error rate over the limit: {err}"
                    )
                role, fallback = CHAMPION, True
                self.metrics.count("fallbacks")
        model = rt.challenger if role == CHALLENGER else rt.champion
        if out is None:
            try:
                out = rt.champion.predict(image, rt.gate)
            except Exception as e:
                self.metrics.model(CHAMPION, model.version, None)
                self.metrics.request(None, "error")
                log.exception("champion failed on frame %s", frame_id)
                return 500, {"error": f"inference failed: {one_line(e)}"}
        ms = (time.perf_counter() - t0) * 1e3
        self.metrics.model(role, model.version, out["latency_ms"])
        self.metrics.request(ms)
        rec = {**base, "role": role, "model_version": model.version, **out, "request_ms": ms, "served": True}
        self._write(rt.pred_log, {**rec, "fallback": fallback})
        if self.frames is not None:
            self.frames.offer({**rec, "line": rt.config.line}, data)
        if rt.config.shadow and role == CHAMPION and rt.challenger is not None and not rt.health.disabled:
            (defer or (lambda fn, *a: fn(*a)))(self._shadow, rt, image, base)
        return 200, {
            **{k: rec[k] for k in ("frame_id", "camera_id", "class", "class_index", "score")},
            "model_version": model.version,
            "role": role,
            "latency_ms": ms,
        }

    def _shadow(self, rt: Runtime, image: Image.Image, base: dict[str, Any]) -> None:
        """Challenger on a champion frame, logged only (paired comparison); errors count against it."""
        rec = {**base, "role": CHALLENGER, "model_version": rt.challenger.version, "served": False, "shadow": True}
        try:
            out = rt.challenger.predict(image, rt.gate)
        except Exception as e:
            self.metrics.model(CHALLENGER, rt.challenger.version, None)
            self._write(rt.pred_log, {**rec, "error": one_line(e)})
            if rt.health.note(ok=False):
                self._auto_rollback_async(rt, f"challenger {rt.challenger.version} error rate over the limit (shadow)")
            return
        rt.health.note(ok=True)
        if self.frames is not None:
            self.frames.offer_other(base["frame_id"], out["class"])
        self.metrics.count("shadow_runs")
        self.metrics.model(CHALLENGER, rt.challenger.version, out["latency_ms"])
        self._write(rt.pred_log, {**rec, **out})

    def feedback(self, frame_id: str, label: str, who: str = "operator") -> tuple[int, dict[str, Any]]:
        rt = self.runtime
        known = {c for m in (rt.champion, rt.challenger) if m for c in m.class_names}
        if known and label not in known:
            return 422, {"error": f"label={label!r}: not a class of the served models; use one of {sorted(known)}"}
        if not frame_id:
            return 422, {"error": "frame_id: give the frame_id returned by /predict"}
        self._write(rt.feedback_log, {"ts": now_iso(), "frame_id": frame_id, "label": label})
        kept = self.frames.label(frame_id, label, who) if self.frames is not None else None
        return 200, {"ok": True, "frame_id": frame_id, "label": label, "frame_kept": kept is not None}

    def close(self) -> None:
        for lg in self._logs.values():
            lg.close()


class FeedbackIn(BaseModel):
    """The operator's true label for a served frame."""

    frame_id: str
    label: str


def create_app(config_path: Path, box: Path | None = None) -> FastAPI:
    """The FastAPI app for one rollout manifest (+ the box's sync and frame store with `box`); raises
    RolloutError when the manifest is malformed."""
    first_sync(config_path, box)  # with a box.yaml, a new box gets its manifest and models from the registry
    service = attach(EdgeService(config_path), box)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if service.sync is not None:
            service.sync.start()
        yield
        if service.sync is not None:
            service.sync.stop()
        service.close()  # fsync the logs on shutdown

    app = FastAPI(title="sensitune edge", lifespan=lifespan)
    app.state.service = service

    # Plain `def` routes: FastAPI runs them in its thread pool, where OpenVINO releases the GIL.
    @app.post("/predict")
    def predict(
        background: BackgroundTasks,
        file: UploadFile = File(...),
        camera_id: str = Form(...),
        frame_id: str | None = Form(None),
    ) -> JSONResponse:
        status, body = service.predict(file.file.read(), camera_id, frame_id, background.add_task)
        return JSONResponse(body, status_code=status)

    @app.post("/feedback")
    def feedback(item: FeedbackIn) -> JSONResponse:
        status, body = service.feedback(item.frame_id, item.label)
        return JSONResponse(body, status_code=status)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "alive", **({"sync": service.sync.status()} if service.sync is not None else {})}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        state = service.runtime.state()
        return JSONResponse(state, status_code=200 if state["champion"] else 503)

    @app.get("/metrics")
    def metrics(format: str = "json") -> Any:
        sync = service.sync.status() if service.sync is not None else None
        if format == "prometheus":
            text = service.metrics.prometheus() + (prometheus_lines(sync) if sync else "")
            return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
        return {**service.metrics.snapshot(), **service.runtime.state(), **({"sync": sync} if sync else {})}

    @app.get("/report")
    def report() -> dict[str, Any]:
        return service.report()

    @app.post("/reload")
    def reload() -> JSONResponse:
        body = service.reload()
        return JSONResponse(body, status_code=200 if body["ok"] else 400)

    @app.post("/decide")
    def decide_route() -> JSONResponse:
        try:
            return JSONResponse(service.decide())
        except SensituneError as e:
            return JSONResponse({"error": str(e)}, status_code=409)

    return app


def main(argv: list[str] | None = None) -> int:
    """`sensitune-edge --config rollout.yaml --host 127.0.0.1 --port 8080 [--box box.yaml]`; `sensitune-edge
    sync|promote ...` are `deploy.sync`'s."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["sync"], ["promote"]):
        return sync_main(argv)
    ap = argparse.ArgumentParser(prog="sensitune-edge", description="Edge inference service (OpenVINO).")
    ap.add_argument("--config", type=Path, required=True, help="rollout manifest (YAML)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to serve the cameras' network)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--box", type=Path, help="box.yaml: registry sync + frame store (docs/from-images-to-line.md)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(args.config, args.box)
    except SensituneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
