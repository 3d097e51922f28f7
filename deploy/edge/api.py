"""The HTTP API of the edge service: FastAPI routes with typed bodies (`deploy.edge.schemas`), the front door
(`deploy.edge.guard`), error bodies that are one line, and the API docs served from local files (no CDN)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from fastapi import BackgroundTasks, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.edge.auth import ADMIN, CAMERA, OPERATOR, AuthError
from deploy.edge.guard import Guard, allowed_hosts, principal_of
from deploy.edge.metrics import PROMETHEUS_CONTENT_TYPE
from deploy.edge.schemas import (
    AdminIn,
    DecisionOut,
    ErrorOut,
    FeedbackIn,
    FeedbackOut,
    HealthOut,
    MetricsOut,
    PredictOut,
    ReloadOut,
    ReportOut,
    StateOut,
)
from deploy.edge.sync import prometheus_lines, sync_status
from deploy.edge.ui import mount_ui
from spt_core.portable.errors import SensituneError

STATIC = Path(__file__).parent / "static"
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <token> (deploy/README.md, tokens file)")
SECURED = [Depends(_bearer)]  # for the OpenAPI schema only: deploy.edge.guard.Guard checks the token


ROUTE_ROLES = {
    ("POST", "/predict"): frozenset({CAMERA}),
    ("POST", "/feedback"): frozenset({OPERATOR}),
    ("GET", "/report"): frozenset({OPERATOR}),
    **{("POST", p): frozenset({ADMIN}) for p in ("/reload", "/decide", "/promote", "/rollback")},
}
ADMIN_ROUTES = frozenset(k for k, v in ROUTE_ROLES.items() if v == {ADMIN})


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorOut} for code in (401, 403, 413, 415, 422, 429, *codes)}


# what an open endpoint must not tell a stranger: where the box keeps its files, which registry it talks to
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_PATH = re.compile(r"(?<![\w.~-])(?:/|[A-Za-z]:\\)[^\s'\"(),;]*")


def redact(value: Any) -> Any:
    """`value` with every URL and absolute path in its strings replaced by ``<url>`` / ``<path>`` (nested)."""
    if isinstance(value, str):
        return _PATH.sub("<path>", _URL.sub("<url>", value))
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def build_api(service: Any, tokens: Any, lifespan: Any, hosts: Iterable[str] = ()) -> FastAPI:
    """The app for `service` (a `deploy.edge.service.EdgeService`); `tokens` None: open (loopback only); `hosts`:
    the names the box answers to besides the loopback ones (`deploy.edge.guard.allowed_hosts`)."""
    app = FastAPI(title="sensitune edge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(
        Guard,
        tokens=tokens,
        roles=ROUTE_ROLES,
        admin_routes=ADMIN_ROUTES,
        max_body=lambda: service.runtime.config.limits.max_body_bytes,
        hosts=allowed_hosts(hosts),
        count=service.metrics.count,
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    mount_ui(app, service, tokens=tokens)  # the operator pages (GET /); they take service.pages: the last frames

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # one line, never the offending input (it can be megabytes)
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5]]
        return JSONResponse({"error": "; ".join(parts)[:500]}, status_code=422)

    client_of = (lambda r, who: who.name) if tokens is not None else (lambda r, who: r.client.host if r.client else "?")

    # Plain `def` routes: FastAPI runs them in its thread pool, where OpenVINO releases the GIL.
    @app.post("/predict", response_model=PredictOut, responses=_errors(503, 500), dependencies=SECURED)
    def predict(
        background: BackgroundTasks,
        file: UploadFile = File(..., description="the frame: PNG, JPEG or TIFF (limits.formats)"),
        camera_id: str = Form(..., description="1..128 of [A-Za-z0-9._:-]"),
        frame_id: str | None = Form(None, description="the camera's own frame id (optional)"),
    ) -> Any:
        status, body = service.predict(file.file.read(), camera_id, frame_id, background.add_task)
        if status == 200:  # the shadow run and the pages' thumbnail (`service.pages`) follow the answer
            return body
        return JSONResponse(body, status_code=status, headers={"Retry-After": "1"} if status == 503 else None)

    @app.post("/feedback", response_model=FeedbackOut, responses=_errors(404), dependencies=SECURED)
    def feedback(item: FeedbackIn, request: Request) -> Any:
        who = principal_of(request.scope.get("state", {}))
        status, body, headers = service.feedback(item, who, client_of(request, who))
        return body if status == 200 else JSONResponse(body, status_code=status, headers=headers)

    @app.get("/healthz", response_model=HealthOut)
    def healthz() -> Any:
        """Alive, and the rollout state (what serves, challenger state, when it was loaded). Open: paths and URLs
        are redacted (GET /metrics, with a token, has them)."""
        return redact({"status": "alive", **service.runtime.state(), **sync_status(service)})

    @app.get("/readyz", response_model=StateOut, responses={503: {"model": StateOut}})
    def readyz() -> Any:
        state = service.runtime.state()
        return state if state["champion"] else JSONResponse(state, status_code=503)

    @app.get(
        "/metrics",
        response_model=MetricsOut,
        responses={**_errors(), 200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        dependencies=SECURED,
    )
    def metrics(format: Literal["json", "prometheus"] = "json") -> Any:
        if format == "prometheus":
            text = service.metrics.prometheus() + prometheus_lines(sync_status(service).get("sync")).encode()
            return Response(text, media_type=PROMETHEUS_CONTENT_TYPE)
        return {**service.metrics.snapshot(), **service.runtime.state(), **sync_status(service)}

    @app.get("/report", response_model=ReportOut, responses=_errors(), dependencies=SECURED)
    def report() -> Any:
        return service.report()

    @app.post("/reload", response_model=ReloadOut, responses={**_errors(), 400: {"model": ReloadOut}},
              dependencies=SECURED)  # fmt: skip
    def reload(body: AdminIn, request: Request) -> Any:
        who = principal_of(request.scope.get("state", {}))
        if tokens is not None:  # the tokens file first: a token taken out of it stops working now
            try:
                tokens.reload()
            except AuthError as e:
                service.metrics.count("reloads_refused")
                service.audit(who, "reload", "refused", error=str(e))
                error = f"{e}; nothing reloaded: the previous tokens and manifest stay in force"
                return JSONResponse({"ok": False, "error": error, **service.runtime.state()}, status_code=400)
        out = service.reload(who)
        return out if out["ok"] else JSONResponse(out, status_code=400)

    def decision_route(action: str) -> Any:
        def route(body: AdminIn, request: Request) -> Any:
            who = principal_of(request.scope.get("state", {}))
            try:
                if action == "decide":
                    return service.decide(who, body.reason)
                return service.force(action, who, body.reason)
            except SensituneError as e:
                return JSONResponse({"error": str(e)}, status_code=409)

        return route

    docs = {
        "decide": "Evaluate the promotion rule on the logs and carry it out (transactional).",
        "promote": "Promote the current challenger now, whatever the rule says (transactional).",
        "rollback": "Roll the current challenger back now (transactional).",
    }
    for action, summary in docs.items():
        app.post(f"/{action}", response_model=DecisionOut, responses=_errors(409), dependencies=SECURED,
                 summary=summary, name=action)(decision_route(action))  # fmt: skip

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="sensitune edge",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="sensitune edge",
            redoc_js_url="/static/redoc/redoc.standalone.js",
            redoc_favicon_url="/static/swagger-ui/favicon-32x32.png",
            with_google_fonts=False,
        )

    return app
