"""Edge inference service: an OpenVINO champion (and challenger) behind one HTTP API for the line's cameras.

Start (one command): ``sensitune-edge --config rollout.yaml --tokens tokens.yaml --host 0.0.0.0 --allow-host NAME``

Endpoints (roles in brackets, `deploy.edge.auth`): POST /predict [camera] (multipart `file` + form `camera_id`,
optional `frame_id`), POST /feedback [operator] {frame_id, label}, GET /report [operator], GET /metrics [any
token], POST /reload /decide /promote /rollback [admin, JSON body], GET /healthz /readyz /docs /redoc (open).

Edge-only dependencies: OpenVINO, numpy, Pillow, FastAPI/uvicorn, PyYAML, prometheus_client. No torch; from
spt_core only its torch-free leaves. This module is the data path (`EdgeService.predict`, `feedback`) and the HTTP
API; `deploy.edge.runtime` owns the runtime and its changes, `deploy.edge.guard` the front door, `deploy.edge.limits`
the limits.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from deploy.edge.api import build_api
from deploy.edge.artifact import ArtifactError
from deploy.edge.auth import AuthError, Principal, TokenStore, load_tokens
from deploy.edge.decoding import VIEW, DecodePool, Input, Wanted, draft, wanted
from deploy.edge.frames import ServedFrame, ServedFrames
from deploy.edge.lane import LargeFrameLane, lane_inputs
from deploy.edge.limits import LimitError, check_id, decoded_bytes, open_header
from deploy.edge.rollout.logs import JsonlLog, now_iso
from deploy.edge.rollout.manifest import CHALLENGER, CHAMPION
from deploy.edge.runtime import Runtime, RuntimeControl, load_model
from deploy.edge.schemas import FeedbackIn
from deploy.edge.sync import BoxConfig, attach, first_sync
from deploy.edge.sync import main as sync_main
from spt_core.portable.errors import SensituneError, one_line

__all__ = ["EdgeService", "Runtime", "create_app", "load_model", "main"]
log = logging.getLogger("sensitune.edge")

Reply = tuple[int, dict[str, Any]]
HOSTS_ENV = "SENSITUNE_EDGE_ALLOWED_HOSTS"


class EdgeService(RuntimeControl):
    """The service behind the HTTP routes (usable without HTTP, e.g. in tests)."""

    frame_store: Any = None  # frame_store.FrameStore and sync.Sync with --box (sync.attach)
    sync: Any = None
    pages: Any = None  # the operator pages (deploy.edge.ui.LineUI): each answered frame's thumbnail, from its decode

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lane = LargeFrameLane()  # frames over limits.large_frame_bytes: a low-priority process (lane.py)
        self.decoder = DecodePool()  # every other frame: decoded and made the models' inputs here (decoding.py)

    def close(self) -> None:
        super().close()
        self.lane.close()
        self.decoder.close()

    def _write(self, target: JsonlLog, record: dict[str, Any]) -> None:
        try:
            target.append(record)
        except OSError as e:  # a full disk must not stop the line; it shows in /metrics
            self.metrics.count("log_errors")
            log.error("cannot append to %s: %s", target.path, e)

    def predict(
        self, data: bytes, camera_id: str, frame_id: str | None, defer: Callable[..., Any] | None = None
    ) -> Reply:
        """One frame -> (HTTP status, body). `frame_id` is the camera's own id (optional); the answer carries a
        server-issued ``frame_id`` for feedback. `defer(fn, *args)` runs the shadow challenger after the response.

        The frame is decoded and made each model's input by a decode worker inside a slot of ``rt.decoding`` (at
        most ``limits.decode_concurrency`` frames at full size at once; a JPEG at the smallest scale its models
        allow), and only the model-sized inputs go on to inference (`deploy.edge.decoding`). A frame that gets no
        slot in time is 503. A frame over ``limits.large_frame_bytes`` is decoded and made each model's input in the
        large-frame lane instead (`LargeFrameLane`, a process): the same inputs, at low priority, one at a time.
        With the operator pages, the same decode makes the frame's thumbnail (`View`), and `defer` records it after
        the answer: a frame is decoded once."""
        t0 = time.perf_counter()
        rt = self.runtime  # read once: this request finishes on this runtime even if a reload swaps it
        if rt.champion is None:
            self.metrics.request(None, "error")
            return 503, {"error": f"not ready: champion not loaded ({rt.champion_error})"}
        limits = rt.config.limits
        view = self.pages.view() if self.pages is not None else None
        try:
            check_id(camera_id, "camera_id", limits)
            client_frame_id = check_id(frame_id, "frame_id", limits) if frame_id else None
            # format, pixels and decoded bytes checked on the header as sent; a JPEG then decodes at the smallest
            # scale its models allow (`draft`)
            header = draft(open_header(data, limits), preprocesses(rt).values())
            if decoded_bytes(header) > limits.large_frame_bytes:
                want: Wanted = {}
                inputs = self.lane.run(lane_inputs, limits.large_frame_bytes, data, limits, preprocesses(rt), view)
                reply, shadow = self._answer(rt, inputs, data, camera_id, client_frame_id, t0)
            else:
                want = wanted(rt, camera_id)
                line = self.lane.yielding.line_frame()  # the lane's worker waits while this frame is served
                with self.decoder.inputs(rt.decoding, header, want, during=line, view=view) as inputs:
                    reply, shadow = self._answer(rt, inputs, data, camera_id, client_frame_id, t0)
            del header
            if shadow is not None:  # the challenger's model-sized input (a frame it was given whole: no shadow run)
                shadow_in, shadow["prep_ms"] = inputs.get(CHALLENGER, (None, 0.0))
                if shadow_in is None or want.get(CHALLENGER, (None, False))[1]:
                    shadow = None
                elif isinstance(shadow_in, Exception):
                    self._shadow_prep_failed(rt, shadow, shadow_in)
                    shadow = None
            thumb = inputs.get(VIEW, (None, 0.0))[0]
            del inputs  # a graph model's full-size frame is not kept past its slot
        except LimitError as e:
            self.metrics.request(None, "bad")
            self.metrics.count("refused_limits")
            return e.status, {"error": str(e)}
        later = defer or (lambda fn, *a: fn(*a))
        if shadow is not None:
            later(self._shadow, rt, shadow_in, shadow)
        if reply[0] == 200 and isinstance(thumb, Image.Image):
            later(self.pages.record, thumb, reply[1])
        return reply

    def _shadow_prep_failed(self, rt: Runtime, shadow: dict[str, Any], e: Exception) -> None:
        """The challenger's input could not be made (in a decode slot or in the lane): counted against the
        challenger, as a failed shadow run is; the caller then drops the shadow run."""
        self.metrics.model(CHALLENGER, rt.challenger.version, None)
        log.error("shadow preprocessing failed for %s: %s", shadow["frame_id"], one_line(e))

    def _answer(
        self, rt: Runtime, inputs: dict[str, Input], data: bytes, camera_id: str, client_frame_id: str | None,
        t0: float,
    ) -> tuple[Reply, dict[str, Any] | None]:
        """The served answer for a decoded frame, and the record base for a shadow run (None: no shadow run).
        `inputs`: role -> the frame that role's model is given (the full-size frame, or its model input made in the
        large-frame lane)."""
        served_id = ServedFrames.new_id()
        base = {"ts": now_iso(), "frame_id": served_id, "client_frame_id": client_frame_id, "camera_id": camera_id}
        sha = hashlib.sha256(data).hexdigest()  # ~1 ms per MB: lets a late label bring this exact frame along
        role, fallback, out = rt.arm(camera_id), False, None
        if role == CHALLENGER:
            try:
                out = run_model(rt.challenger, inputs[CHALLENGER], rt)
                rt.health.note(ok=True)
            except Exception as e:  # the champion answers instead; counted against the challenger
                err = one_line(e)
                self.metrics.model(CHALLENGER, rt.challenger.version, None)
                self._write(
                    rt.pred_log,
                    {**base, "role": CHALLENGER, "model_version": rt.challenger.version, "error": err, "served": False},
                )
                if rt.health.note(ok=False):
                    why = f"challenger {rt.challenger.version} error rate over the limit: {err}"
                    self._auto_rollback_async(rt, why)
                role, fallback = CHAMPION, True
                self.metrics.count("fallbacks")
        model = rt.challenger if role == CHALLENGER else rt.champion
        if out is None:
            try:
                out = run_model(rt.champion, inputs[CHAMPION], rt)
            except Exception as e:
                self.metrics.model(CHAMPION, model.version, None)
                self.metrics.request(None, "error")
                log.exception("champion failed on frame %s", served_id)
                return (500, {"error": f"inference failed: {one_line(e)}"}), None
        ms = (time.perf_counter() - t0) * 1e3
        self.metrics.model(role, model.version, out["latency_ms"])
        self.metrics.request(ms)
        rec = {**base, "role": role, "model_version": model.version, **out, "request_ms": ms, "served": True}
        self._write(rt.pred_log, {**rec, "sha256": sha, "fallback": fallback})
        self.frames.add(ServedFrame(served_id, camera_id, client_frame_id, sha, str(out["class"]), model.version))
        if self.frame_store is not None:
            self.frame_store.offer({**rec, "line": rt.config.line}, data)
        shadow = rt.config.shadow and role == CHAMPION and rt.challenger is not None and not rt.health.disabled
        return (200, {
            **{k: rec.get(k) for k in ("frame_id", "client_frame_id", "camera_id", "class", "class_index", "score")},
            "p_good": rec.get("p_good"),  # P(good) and the decision at the manifest's threshold
            "decision": rec.get("decision"),
            "model_version": model.version,
            "role": role,
            "latency_ms": ms,
        }), (base if shadow else None)  # fmt: skip

    def _shadow(self, rt: Runtime, image: Image.Image, base: dict[str, Any]) -> None:
        """Challenger on a champion frame, logged only (paired comparison); errors count against it."""
        base = dict(base)
        prep_ms = base.pop("prep_ms", 0.0)  # `image` is model-sized: its full-size part ran in `predict`'s slot
        rec = {**base, "role": CHALLENGER, "model_version": rt.challenger.version, "served": False, "shadow": True}
        try:
            out = rt.challenger.predict(image, rt.gate)
            out["latency_ms"] += prep_ms
        except Exception as e:
            self.metrics.model(CHALLENGER, rt.challenger.version, None)
            self._write(rt.pred_log, {**rec, "error": one_line(e)})
            if rt.health.note(ok=False):
                self._auto_rollback_async(rt, f"challenger {rt.challenger.version} error rate over the limit (shadow)")
            return
        rt.health.note(ok=True)
        if self.frame_store is not None:
            self.frame_store.offer_other(base["frame_id"], out["class"])
        self.metrics.count("shadow_runs")
        self.metrics.model(CHALLENGER, rt.challenger.version, out["latency_ms"])
        self._write(rt.pred_log, {**rec, **out})

    def feedback(self, item: FeedbackIn, who: Principal, client: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        """The operator's label for a frame this service served -> (status, body, headers).

        The frame is named by its server ``frame_id``, or by ``camera_id`` + ``client_frame_id``; an unknown frame
        is 404, a label no served model knows 422, a client over ``limits.feedback_per_minute`` 429.
        """
        rt = self.runtime
        limits = rt.config.limits
        try:
            self.rate.take(client, limits.feedback_per_minute)
            if item.frame_id is not None:
                frame = self.frames.get(check_id(item.frame_id, "frame_id", limits))
                named = f"frame_id={item.frame_id!r}"
            elif item.camera_id is not None and item.client_frame_id is not None:
                cam = check_id(item.camera_id, "camera_id", limits)
                frame = self.frames.by_client(cam, check_id(item.client_frame_id, "client_frame_id", limits))
                named = f"camera_id={item.camera_id!r}, client_frame_id={item.client_frame_id!r}"
            else:
                raise LimitError(422, "give frame_id (returned by /predict), or camera_id and client_frame_id")
        except LimitError as e:
            self.metrics.count("feedback_refused")
            retry = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after else {}
            return e.status, {"error": str(e)}, retry
        # the champion's classes: acceptance gives a challenger the same ones, so a label means one thing per line
        known = set(rt.champion.class_names) if rt.champion else set()
        if known and item.label not in known:
            self.metrics.count("feedback_refused")
            shown = item.label[:40]
            return 422, {"error": f"label={shown!r}: not a class of the champion; use one of {sorted(known)}"}, {}
        if frame is None:
            self.metrics.count("feedback_refused")
            why = f"{named}: this service served no such frame (or it is older than the last {self.frames.capacity} "
            return 404, {"error": why + "frames); label frames by the frame_id /predict returned"}, {}
        try:
            served = None if item.image is None else (frame.record(), carried_frame(item.image, frame, rt))
        except LimitError as e:
            self.metrics.count("feedback_refused")
            return e.status, {"error": str(e)}, {}
        record = {"ts": now_iso(), "frame_id": frame.frame_id, "camera_id": frame.camera_id}
        record |= {"client_frame_id": frame.client_frame_id, "label": item.label, "by": who.name}
        self._write(rt.feedback_log, record)
        kept = None
        if self.frame_store is not None:
            kept = self.frame_store.label(frame.frame_id, item.label, who.name, served=served)
        body = {"ok": True, "frame_id": frame.frame_id, "camera_id": frame.camera_id, "label": item.label}
        return 200, {**body, "frame_kept": kept is not None}, {}


def preprocesses(rt: Runtime) -> dict[str, Any]:
    """Each served model's preprocess spec by role: what the large-frame lane (`lane_inputs`) makes each model's
    input by (`model_image`, as `predict` makes it itself, so the answer is the same)."""
    models = ((CHAMPION, rt.champion), (CHALLENGER, rt.challenger))
    return {role: model.artifact.preprocess for role, model in models if model is not None}


def run_model(model: Any, given: Input, rt: Runtime) -> dict[str, Any]:
    """`model.predict` of a frame or of its model input; `latency_ms` counts the preprocessing the lane did for it."""
    image, prep_ms = given
    if isinstance(image, Exception):
        raise image
    out = model.predict(image, rt.gate)
    out["latency_ms"] += prep_ms
    return out


def carried_frame(image_b64: str, frame: ServedFrame, rt: Runtime) -> bytes:
    """The frame bytes a label brought along (`FeedbackIn.image`), once they are shown to be the very bytes served
    as ``frame`` and to pass the decode limits a /predict upload passes; `LimitError` 422/413/415/503 otherwise."""
    try:
        data = base64.b64decode(image_b64, validate=True)
    except ValueError:
        raise LimitError(422, "image: not base64; send the frame's bytes base64-encoded, or leave image out") from None
    if frame.sha256 is None or hashlib.sha256(data).hexdigest() != frame.sha256:
        raise LimitError(422, f"image: not the bytes /predict received as frame {frame.frame_id}; send exactly those "
                              "bytes, or leave image out (the label still counts)")  # fmt: skip
    # the limits may have changed since it was served; the bytes themselves decoded then (they were answered), so
    # checking the header against today's limits is the whole check: no second full-size decode per label
    open_header(data, rt.config.limits).close()
    return data


def create_app(
    config_path: Path, tokens: TokenStore | None = None, box: Path | None = None, hosts: Sequence[str] = ()
) -> Any:
    """The FastAPI app for one rollout manifest, behind `deploy.edge.guard.Guard`; raises RolloutError when the manifest
    is malformed. `tokens` None: no authentication (the caller must only bind loopback; `main` enforces it).
    `box`: box.yaml, the registry sync and frame store (`deploy.edge.sync`; a new box gets its manifest from it).
    `hosts`: the names the box answers to besides the loopback ones (``--allow-host``)."""
    first_sync(config_path, box)
    trust = None if box is None else BoxConfig.load(box).trust()  # the box's keys; else $SENSITUNE_TRUSTED_KEYS
    service = attach(EdgeService(config_path, trust=trust), box)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        service.lane.start()  # the large-frame worker process, before the first 25 MP frame would wait for it
        if service.sync is not None:
            service.sync.start()
        yield
        if service.sync is not None:
            service.sync.stop()
        service.close()  # fsync the logs on shutdown

    return build_api(service, tokens, lifespan, hosts)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """`sensitune-edge --config rollout.yaml [--tokens tokens.yaml] [--box box.yaml] --host 127.0.0.1 --port 8080`;
    `sensitune-edge sync|promote ...` are `deploy.edge.sync`'s."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["sync"], ["promote"]):
        return sync_main(argv)
    ap = argparse.ArgumentParser(prog="sensitune-edge", description="Edge inference service (OpenVINO).")
    ap.add_argument("--config", type=Path, required=True, help="rollout manifest (YAML)")
    ap.add_argument(
        "--tokens", type=Path, help="tokens file (deploy/README.md); default $SENSITUNE_EDGE_TOKENS_FILE or "
        "$SENSITUNE_EDGE_TOKENS; required unless --host is loopback"
    )  # fmt: skip
    ap.add_argument("--host", default="127.0.0.1", help="bind address; any non-loopback address needs tokens")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="a name clients reach the box by (Host/Origin); repeat; loopback names and a specific --host "
                    f"are allowed already; '*' allows any (a proxy checks them); also ${HOSTS_ENV}, comma-separated")
    ap.add_argument("--ssl-keyfile", help="TLS private key (PEM), passed to uvicorn")
    ap.add_argument("--ssl-certfile", help="TLS certificate chain (PEM), passed to uvicorn")
    ap.add_argument("--box", type=Path, help="box.yaml: registry sync + frame store (docs/from-images-to-line.md)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tokens = load_tokens(args.tokens)
        if tokens is None and not is_loopback(args.host):
            raise AuthError(
                f"--host {args.host} is not a loopback address and no tokens are configured: give --tokens FILE "
                "(python -m deploy.edge.auth new NAME ROLE), or bind 127.0.0.1 behind a reverse proxy"
            )
        if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
            raise AuthError("give both --ssl-keyfile and --ssl-certfile, or neither")
        hosts = [*args.allow_host, *os.environ.get(HOSTS_ENV, "").split(",")]
        hosts += [] if args.host in ("0.0.0.0", "::") else [args.host]  # a specific bind address is a name too
        app = create_app(args.config, tokens, args.box, hosts)
    except (SensituneError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokens is None:
        log.warning("no tokens configured: every loopback caller acts as admin (development only)")
    import uvicorn

    tls = {"ssl_keyfile": args.ssl_keyfile, "ssl_certfile": args.ssl_certfile} if args.ssl_keyfile else {}
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, **tls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
