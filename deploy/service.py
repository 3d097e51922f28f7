"""Edge inference service: an OpenVINO champion (and challenger) behind one HTTP API for the line's cameras.

Start (one command): ``sensitune-edge --config rollout.yaml --host 127.0.0.1 --port 8080``

Endpoints: POST /predict (multipart `file` + form `camera_id`, optional `frame_id`), POST /feedback
{frame_id, label}, GET /healthz, GET /readyz, GET /metrics[?format=prometheus], GET /report, POST /reload,
POST /decide. The rollout manifest (`deploy.rollout`) says which model serves which camera.

Edge-only dependencies: OpenVINO, numpy, Pillow, FastAPI/uvicorn, PyYAML. No torch; from spt_core only the shared
torch-free preprocessing and the error type.

Concurrency: requests run in uvicorn's thread pool; each model owns a pool of OpenVINO infer requests (one
request per thread at a time). A reload builds a complete new `Runtime` and swaps one reference: a request
reads `service.runtime` once, so in-flight requests finish on the runtime they started with.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import queue
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import BackgroundTasks, FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from PIL import Image
from pydantic import BaseModel

from deploy.rollout import (
    CHALLENGER,
    CHAMPION,
    FEEDBACK_LOG,
    PRED_LOG,
    ROLLBACK,
    Decision,
    JsonlLog,
    RolloutConfig,
    RolloutError,
    apply_decision,
    assign_arm,
    decide,
    error_rate_exceeded,
    load_config,
    now_iso,
    report_for,
)
from spt_core.errors import SensituneError
from spt_core.preprocess import Preprocess, preprocess_image

log = logging.getLogger("sensitune.edge")
_core_lock = threading.Lock()
_core: Any = None


class ArtifactError(SensituneError):
    """An artifact directory that cannot be served (missing file, checksum mismatch, wrong version, bad IR)."""


def _ov_core() -> Any:
    global _core
    with _core_lock:
        if _core is None:
            import openvino as ov

            _core = ov.Core()
        return _core


def _sha256(path: Path) -> str:
    h = sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class OvModel:
    """One artifact directory (model.xml/.bin + manifest.json), verified and compiled on CPU; thread-safe.

    Args:
        artifact_dir: the export directory.
        expected_version: the rollout manifest's version; the artifact's `model_version` must equal it.
        openvino: compile properties laid over the manifest's `runtime_config` (e.g. PERFORMANCE_HINT).
    """

    def __init__(
        self, artifact_dir: Path, expected_version: str | None = None, openvino: dict[str, Any] | None = None
    ) -> None:
        d = Path(artifact_dir)
        mpath = d / "manifest.json"
        try:
            m = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{mpath}: cannot read the artifact manifest ({_first_line(e)}); re-export") from None
        if m.get("format") != "openvino":
            raise ArtifactError(f"{mpath}: format={m.get('format')!r}; the edge serves OpenVINO IR (format openvino)")
        if m.get("promotable") is False:  # deploy.export's verification gate failed for this artifact
            raise ArtifactError(f"{mpath}: promotable=false (see its 'verification'); fix the export or pick another")
        files = m.get("files") or {}
        for name in ("model.xml", "model.bin"):
            if name not in files:
                raise ArtifactError(f"{mpath}: no sha256 for {name} in 'files'; re-export the artifact")
        for name, digest in files.items():
            path = d / name
            if not path.is_file():
                raise ArtifactError(f"{path}: missing; re-export or point the rollout manifest elsewhere")
            if _sha256(path) != digest:
                raise ArtifactError(
                    f"{path}: sha256 differs from manifest.json (corrupt or changed in place); publish a new version"
                )
        self.dir, self.manifest = d, m
        self.version = str(m.get("model_version"))
        if expected_version is not None and self.version != expected_version:
            raise ArtifactError(
                f"{mpath}: model_version={self.version!r} but the rollout manifest says {expected_version!r}"
            )
        self.class_names = [str(c) for c in m["class_names"]]
        self.pre = Preprocess.from_dict(m["preprocess"])
        if self.pre.color != "RGB" or self.pre.layout != "NCHW":
            raise ArtifactError(f"{mpath}: preprocess color/layout {self.pre.color}/{self.pre.layout}; need RGB/NCHW")
        core = _ov_core()
        try:
            model = core.read_model(d / "model.xml", d / "model.bin")
            self.ov_config = dict(m.get("runtime_config") or {}) | dict(openvino or {})
            compiled = core.compile_model(model, "CPU", self.ov_config)
            self._input = compiled.input(m["input_name"]) if m.get("input_name") else compiled.input(0)
            self._output = compiled.output(m["output_name"]) if m.get("output_name") else compiled.output(0)
        except Exception as e:  # OpenVINO raises RuntimeError for bad IR, unknown names, bad config
            raise ArtifactError(f"{d}: OpenVINO cannot load it ({_first_line(e)})") from None
        shape = self._input.get_partial_shape()
        want = [None, 3, *self.pre.size]
        if (
            shape.rank.is_dynamic
            or len(shape) != 4
            or any(w is not None and shape[i].is_static and shape[i].get_length() != w for i, w in enumerate(want))
        ):
            raise ArtifactError(
                f"{d}: input shape {shape} does not take (N, 3, {self.pre.size[0]}, {self.pre.size[1]})"
            )
        self.n_requests = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.n_requests):
            self._pool.put(compiled.create_infer_request())
        self._compiled = compiled

    def predict(self, image: Image.Image, gate: threading.Semaphore | None = None) -> dict[str, Any]:
        """One image -> {class, class_index, score (softmax), latency_ms, queue_ms}.

        Args:
            image: RGB image.
            gate: shared by all models of a runtime: at most that many inferences run at once on the box.
                Without it, the model with less traffic (the challenger) would mostly run while the other one
                runs too and look slower than it is; with it, every inference meets the same contention.

        `latency_ms` is preprocessing + inference without the wait for the gate and a free infer request
        (`queue_ms`), which grows with a model's share of the traffic; latency_ms is what the rule compares.
        """
        t0 = time.perf_counter()
        x = preprocess_image(image, self.pre)[None]  # (1, 3, H, W)
        t1 = time.perf_counter()
        with gate or contextlib.nullcontext():
            req = self._pool.get()
            t2 = time.perf_counter()
            try:
                logits = np.array(req.infer({self._input: x})[self._output][0], dtype=np.float64)  # copy first
            finally:
                self._pool.put(req)
            t3 = time.perf_counter()
        p = np.exp(logits - logits.max())
        p /= p.sum()
        i = int(p.argmax())
        ms, queue_ms = (t1 - t0 + t3 - t2) * 1e3, (t2 - t1) * 1e3
        return {
            "class": self.class_names[i],
            "class_index": i,
            "score": float(p[i]),
            "latency_ms": ms,
            "queue_ms": queue_ms,
        }


class Metrics:
    """Counters and recent latencies (bounded window) for /metrics; thread-safe."""

    def __init__(self, window: int = 20000) -> None:
        self._lock = threading.Lock()
        self._window = window
        self.counts = {"requests": 0, "errors": 0, "bad_requests": 0, "fallbacks": 0, "log_errors": 0, "reloads": 0}
        self.counts |= {"reloads_refused": 0, "shadow_runs": 0}
        self._latency: deque[float] = deque(maxlen=window)
        self._models: dict[tuple[str, str], dict[str, Any]] = {}

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def request(self, ms: float | None, status: str = "ok") -> None:
        with self._lock:
            self.counts["requests"] += 1
            if status != "ok":
                self.counts["errors" if status == "error" else "bad_requests"] += 1
            if ms is not None:
                self._latency.append(ms)

    def model(self, role: str, version: str, ms: float | None) -> None:
        with self._lock:
            m = self._models.setdefault(
                (role, version), {"requests": 0, "errors": 0, "lat": deque(maxlen=self._window)}
            )
            m["requests"] += 1
            if ms is None:
                m["errors"] += 1
            else:
                m["lat"].append(ms)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                **self.counts,
                "latency_ms": _quantiles(self._latency),
                "models": {
                    f"{role}:{version}": {
                        "role": role,
                        "version": version,
                        "requests": m["requests"],
                        "errors": m["errors"],
                        "latency_ms": _quantiles(m["lat"]),
                    }
                    for (role, version), m in self._models.items()
                },
            }

    def prometheus(self) -> str:
        s = self.snapshot()
        out = [f"# TYPE sensitune_{k}_total counter\nsensitune_{k}_total {s[k]}" for k in self.counts]
        out.append("# TYPE sensitune_request_latency_ms summary")
        out += [f'sensitune_request_latency_ms{{quantile="0.{q[1:]}"}} {v}' for q, v in s["latency_ms"].items() if v]
        out.append("# TYPE sensitune_model_requests_total counter")
        for m in s["models"].values():
            lab = f'role="{m["role"]}",version="{m["version"]}"'
            out.append(f"sensitune_model_requests_total{{{lab}}} {m['requests']}")
            out.append(f"sensitune_model_errors_total{{{lab}}} {m['errors']}")
            out += [
                f'sensitune_model_latency_ms{{{lab},quantile="0.{q[1:]}"}} {v}' for q, v in m["latency_ms"].items() if v
            ]
        return "\n".join(out) + "\n"


def _quantiles(values: Any) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    q = np.percentile(np.fromiter(values, dtype=np.float64), [50, 90, 99])
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2])}


@dataclass
class Runtime:
    """What serves now: a config and its loaded models. Immutable after the swap except the challenger health."""

    config: RolloutConfig
    champion: OvModel | None
    challenger: OvModel | None
    pred_log: JsonlLog
    feedback_log: JsonlLog
    champion_error: str | None = None
    challenger_error: str | None = None
    loaded_at: str = field(default_factory=now_iso)
    challenger_attempts: int = 0
    challenger_errors: int = 0
    challenger_disabled: bool = False
    gate: threading.Semaphore = field(default_factory=lambda: threading.BoundedSemaphore(1))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def arm(self, camera_id: str) -> str:
        if self.challenger is None or self.challenger_disabled:
            return CHAMPION
        return assign_arm(camera_id, self.config)

    def note_challenger(self, ok: bool) -> bool:
        """Count one challenger attempt; True exactly once, when the error rate first breaks the limit."""
        with self._lock:
            self.challenger_attempts += 1
            self.challenger_errors += not ok
            broken = error_rate_exceeded(
                self.challenger_errors, self.challenger_attempts, self.config.decision.max_error_rate
            )
            if broken and not self.challenger_disabled:
                self.challenger_disabled = True  # from now on the champion answers every camera
                return True
            return False

    @property
    def challenger_state(self) -> str:
        """none (no challenger), failed (load or error-rate failure; rolled back), serving."""
        if self.challenger_error or self.challenger_disabled:
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
            champion = OvModel(cfg.resolve(cfg.champion.path), cfg.champion.version, cfg.openvino)
        except Exception as e:
            champion_error = str(e) if isinstance(e, SensituneError) else _first_line(e)
        if champion is None and previous is not None and previous.champion is not None:
            raise ArtifactError(f"champion {cfg.champion.version} failed to load ({champion_error}); nothing changed")
        if cfg.challenger is not None and champion is not None:
            try:
                challenger = OvModel(cfg.resolve(cfg.challenger.path), cfg.challenger.version, cfg.openvino)
            except Exception as e:
                challenger_error = str(e) if isinstance(e, SensituneError) else _first_line(e)
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
        evidence = {"champion_version": rt.config.champion.version, "challenger_version": rt.config.challenger.version}
        record = None
        try:
            record = apply_decision(self.config_path, Decision(ROLLBACK, [reason], evidence), source=f"auto:{why}")
            cfg = load_config(self.config_path)
        except SensituneError as e:  # manifest unusable now: keep serving the champion from memory
            log.error("automatic rollback could not rewrite %s: %s", self.config_path, e)
            cfg = rt.config
        log.warning("rolled back challenger %s: %s (%s)", evidence["challenger_version"], reason, record)
        return Runtime(
            cfg,
            rt.champion,
            None,
            rt.pred_log,
            rt.feedback_log,
            challenger_error=reason,
            challenger_disabled=True,
            gate=rt.gate,
        )

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
            return 400, {"error": f"file: not a readable image ({_first_line(e)}); send a PNG or JPEG frame"}
        frame_id = frame_id or uuid.uuid4().hex
        base = {"ts": now_iso(), "frame_id": frame_id, "camera_id": camera_id}
        role, fallback, out = rt.arm(camera_id), False, None
        if role == CHALLENGER:
            try:
                out = rt.challenger.predict(image, rt.gate)
                rt.note_challenger(ok=True)
            except Exception as e:  # the champion answers instead; counted against the challenger
                err = _first_line(e)
                self.metrics.model(CHALLENGER, rt.challenger.version, None)
                self._write(
                    rt.pred_log,
                    {**base, "role": CHALLENGER, "model_version": rt.challenger.version, "error": err, "served": False},
                )
                if rt.note_challenger(ok=False):
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
                return 500, {"error": f"inference failed: {_first_line(e)}"}
        ms = (time.perf_counter() - t0) * 1e3
        self.metrics.model(role, model.version, out["latency_ms"])
        self.metrics.request(ms)
        rec = {**base, "role": role, "model_version": model.version, **out, "request_ms": ms, "served": True}
        self._write(rt.pred_log, {**rec, "fallback": fallback})
        if rt.config.shadow and role == CHAMPION and rt.challenger is not None and not rt.challenger_disabled:
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
            self._write(rt.pred_log, {**rec, "error": _first_line(e)})
            if rt.note_challenger(ok=False):
                self._auto_rollback_async(rt, f"challenger {rt.challenger.version} error rate over the limit (shadow)")
            return
        rt.note_challenger(ok=True)
        self.metrics.count("shadow_runs")
        self.metrics.model(CHALLENGER, rt.challenger.version, out["latency_ms"])
        self._write(rt.pred_log, {**rec, **out})

    def feedback(self, frame_id: str, label: str) -> tuple[int, dict[str, Any]]:
        rt = self.runtime
        known = {c for m in (rt.champion, rt.challenger) if m for c in m.class_names}
        if known and label not in known:
            return 422, {"error": f"label={label!r}: not a class of the served models; use one of {sorted(known)}"}
        if not frame_id:
            return 422, {"error": "frame_id: give the frame_id returned by /predict"}
        self._write(rt.feedback_log, {"ts": now_iso(), "frame_id": frame_id, "label": label})
        return 200, {"ok": True, "frame_id": frame_id, "label": label}

    def close(self) -> None:
        for lg in self._logs.values():
            lg.close()


class FeedbackIn(BaseModel):
    """The operator's true label for a served frame."""

    frame_id: str
    label: str


def create_app(config_path: Path) -> FastAPI:
    """The FastAPI app for one rollout manifest; raises RolloutError when the manifest is malformed."""
    service = EdgeService(config_path)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
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
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        state = service.runtime.state()
        return JSONResponse(state, status_code=200 if state["champion"] else 503)

    @app.get("/metrics")
    def metrics(format: str = "json") -> Any:
        if format == "prometheus":
            return PlainTextResponse(service.metrics.prometheus(), media_type="text/plain; version=0.0.4")
        return {**service.metrics.snapshot(), **service.runtime.state()}

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
    """`sensitune-edge --config rollout.yaml --host 127.0.0.1 --port 8080`."""
    ap = argparse.ArgumentParser(prog="sensitune-edge", description="Edge inference service (OpenVINO).")
    ap.add_argument("--config", type=Path, required=True, help="rollout manifest (YAML)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to serve the cameras' network)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(args.config)
    except SensituneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
