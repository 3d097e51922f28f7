"""The operator pages' HTTP routes: page shells, the htmx fragments they poll, labels, promote / roll back.

    GET  /                      -> /ui/line
    GET  /ui/{line,review,rollout,models}   page shells (no data: they load the fragments with the page's token)
    GET  /ui/f/{line,review,rollout,models,whoami,confirm}   the fragments            [operator; confirm: admin]
    POST /ui/review/label       form frame_id, label: feedback for that frame           [operator]
    POST /ui/rollout/{promote,rollback}   form version, reason, confirm=<action>        [admin]
    GET  /ui/img/{frame_id}?exp=...&sig=...   a frame's image (the link is signed, and expires: an <img> cannot send
                                a header)
    GET  /ui/static/...         htmx, CSS and JS, served by the service itself (no CDN)

Every data route needs the page's bearer token when the service has tokens (`deploy.edge.ui.auth`). Every page
and fragment is autoescaped Jinja (no ``|safe`` on data) under `CSP`: scripts, styles and requests from the box
itself only, no inline script, no framing, so a name that slips into a page stays text.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import logging
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image
from pydantic import ValidationError
from starlette.middleware.gzip import GZipMiddleware

import deploy.edge.ui.views as views
from deploy.edge.decoding import View
from deploy.edge.frame_store import FrameRule, FrameStore, GuardedFrames
from deploy.edge.limits import LimitError
from deploy.edge.rollout.decision import PROMOTE, ROLLBACK
from deploy.edge.schemas import FeedbackIn
from deploy.edge.ui.auth import ADMIN, NO_AUTH_NOTE, OPERATOR, SIGN_IN, Who, authorize, identify
from deploy.edge.ui.recent import RecentFrames, thumbnail
from spt_core.portable.errors import SensituneError

HERE = Path(__file__).parent
log = logging.getLogger("sensitune.edge.ui")
PAGES = ("line", "review", "rollout", "models")
# what a front door that wants a token on every path must leave open: page shells and assets carry no data, and an
# image link is signed (an <img> cannot send a header); everything else here checks the token itself
# (a path ending in "/" is a prefix, except "/" itself)
OPEN_PATHS = ("/", *(f"/ui/{p}" for p in PAGES), "/ui/static/", "/ui/img/")
POLL_S = {"line": 2, "rollout": 5, "models": 30}  # review is not polled: a card must not change under a finger
# htmx and ui.js are files of the box and need no eval (htmx-config allowEval: false) nor inline styles
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")  # fmt: skip
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store", "Vary": "Accept-Encoding"}  # fmt: skip
IMG_TTL_S, IMG_STEP_S = 3600, 600  # an image link lives 1-1h10: stable for 10 min so the polled pages' images cache


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def _num(x: Any, fmt: str = "%.2f") -> str:
    return fmt % x if isinstance(x, (int, float)) else "–"


def _ci(ci: tuple[float, float] | list[float] | None) -> str:
    return "" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


class LineUI:
    """The pages' state: the recent frames ring and the secret that signs image links. The review queue is the
    service's one frame store (``service.frame_store``: the box's, deploy.edge.sync.attach); a service without a box
    gets one under ``<log_dir>/frames`` here, which the service then offers its frames to and labels, as with a box.

    Args:
        service: The `deploy.edge.service.EdgeService`.
        quota_mb: Disk quota of the store made here (a box's store has the box's quota).
    """

    def __init__(self, service: Any, quota_mb: float = 200.0) -> None:
        self.service = service
        self.recent = RecentFrames()
        self._secret = secrets.token_bytes(16)
        if getattr(service, "frame_store", None) is None:
            service.frame_store = _own_store(service.runtime.config.logs / "frames", quota_mb, service.metrics.count)
        self.store = service.frame_store
        service.pages = self  # each answered frame's thumbnail comes here from its decode (`view`, `record`)

    def view(self) -> View:
        """The thumbnail each frame's decode makes for these pages (`deploy.edge.service.EdgeService.predict`): the
        ring's size, 8-bit as the serving champion sees it."""
        return View(self.recent.thumb_px, views.bit_depth(self.service))

    def record(self, thumb: Image.Image, body: dict[str, Any]) -> None:
        """One answered frame (the /predict body and its `view`) into the ring. Runs after the answer is sent; a
        failure here is logged and never reaches the camera."""
        try:
            self.recent.add(thumb, body, views.operating_point(self.service))
        except Exception:
            log.exception("operator pages: could not record frame %s", body.get("frame_id"))

    def label(self, frame_id: str, label: str, who: Who) -> tuple[int, dict[str, Any]]:
        """The operator's label: the service's feedback path (the rollout's log and the frame store)."""
        try:
            item = FeedbackIn(frame_id=frame_id, label=label)
        except ValidationError as e:  # the form's values over /feedback's own bounds (label 256, frame_id 1024)
            err = e.errors()[0]
            return 422, {"error": f"{'.'.join(map(str, err['loc']))}: {err['msg']}"}
        status, body, _ = self.service.feedback(item, who, who.name)
        if status == 200:
            self.recent.mark_labelled(frame_id, label)
        return status, body

    def sign(self, frame_id: str, expires: int) -> str:
        msg = f"{frame_id}|{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:32]

    def img(self, frame_id: str, now: float | None = None) -> str:
        """A signed link to a frame's image that stops working `IMG_TTL_S` (+ up to `IMG_STEP_S`) from now."""
        now = time.time() if now is None else now
        expires = int(now // IMG_STEP_S + 1) * IMG_STEP_S + IMG_TTL_S
        return f"/ui/img/{frame_id}?exp={expires}&sig={self.sign(frame_id, expires)}"

    def signed(self, frame_id: str, exp: int, sig: str, now: float | None = None) -> bool:
        """`sig` is this box's signature of (`frame_id`, `exp`) and `exp` has not passed."""
        good = hmac.compare_digest(sig.encode(), self.sign(frame_id, exp).encode())
        return good and (time.time() if now is None else now) < exp

    def image(self, frame_id: str, px: int = 480) -> bytes | None:
        got = self.store.get(frame_id) if self.store is not None else None
        if got is not None:
            with self.service.runtime.decoding.hold():  # a stored frame is decoded at full size for its thumbnail
                return thumbnail(got[1], px, quality=85, bit_depth=views.bit_depth(self.service))
        shot = self.recent.get(frame_id)
        return shot.thumb if shot else None

    def force(self, action: str, version: str, reason: str, who: Who) -> dict[str, Any]:
        """Promote or roll back the challenger ``version`` now (the quality engineer's sign-off).

        The service's own transaction (`deploy.edge.runtime.RuntimeControl.force`), as ``POST /promote`` is: the new
        champion is loaded and smoke-tested before the manifest changes, and the registry's alias moves go to its
        outbox, so the page never waits on the registry while it holds the service's control lock."""
        cfg = self.service.runtime.config
        if cfg.challenger is None or cfg.challenger.version != version:
            now = cfg.challenger.version if cfg.challenger else "none"
            raise HTTPException(409, f"the challenger is now {now}, not {version}; reload the page and decide again")
        try:
            return self.service.force(action, who, reason, source=f"ui:{who.name}")
        except SensituneError as e:
            raise HTTPException(409, str(e)) from None


def _own_store(root: Path, quota_mb: float, count: Any) -> GuardedFrames | None:
    """A frame store for a service without a box (nothing leaves it: no sync); None when it cannot be opened
    (the line runs without it; rejects are still listed from the recent frames)."""
    try:
        return GuardedFrames(FrameStore(root, FrameRule(), quota_mb=quota_mb, count=count))
    except (OSError, sqlite3.Error) as e:
        log.error("operator pages: no frame store under %s (%s)", root, e)
        return None


def mount_ui(app: FastAPI, service: Any, tokens: Any = None) -> LineUI:
    """Serve the operator pages on ``app``; returns the `LineUI` whose `record` the /predict route calls.

    ``tokens``: the service's token store (``authenticate(header) -> principal``); default ``service.auth``."""
    ui = LineUI(service)
    if tokens is not None:
        app.state.ui_tokens = tokens
    templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    templates.globals.update(pct=_pct, ci=_ci, num=_num, img=ui.img, poll=POLL_S)
    router = APIRouter(include_in_schema=False)

    def render(request: Request, name: str, status: int = 200, **ctx: Any) -> Response:
        html = templates.get_template(name).render(**ctx).encode()
        headers = dict(PAGE_HEADERS)
        if len(html) > 1400 and "gzip" in request.headers.get("accept-encoding", ""):  # a 20 KB fragment -> ~3 KB
            html, headers["Content-Encoding"] = gzip.compress(html, 5), "gzip"
        return Response(html, status_code=status, media_type="text/html; charset=utf-8", headers=headers)

    def denied(request: Request, e: HTTPException) -> Response:
        if e.status_code in (401, 403):
            service.metrics.count("refused_unauthorized")
        return render(request, "_denied.html", e.status_code, code=e.status_code, error=e.detail, sign_in=SIGN_IN)

    def fragment(request: Request, role: str, name: str, build: Any, **extra: Any) -> Response:
        try:
            who = authorize(request, role)
        except HTTPException as e:
            return denied(request, e)
        return render(request, name, who=who, **build(), **extra)

    @router.get("/")
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/line")

    def page_route(page: str) -> Any:
        def route(request: Request) -> Response:
            return render(request, "page.html", page=page, pages=PAGES)

        return route

    for page in PAGES:
        router.get(f"/ui/{page}", name=f"ui-{page}")(page_route(page))

    @router.get("/ui/f/whoami")
    def whoami(request: Request) -> Response:
        return render(request, "_whoami.html", who=identify(request), signed="authorization" in request.headers)

    @router.get("/ui/f/line")
    def line(request: Request) -> Response:
        return fragment(request, OPERATOR, "_line.html", lambda: views.line_view(service, ui.recent))

    def review_ctx() -> dict[str, Any]:
        items = views.review_items(service, ui.recent, ui.store)
        return {"items": items, "classes": views.class_names(service), "store": ui.store is not None}

    @router.get("/ui/f/review")
    def review(request: Request) -> Response:
        return fragment(request, OPERATOR, "_review.html", review_ctx, flash=None)

    @router.post("/ui/review/label")
    def label(request: Request, frame_id: str = Form(...), label: str = Form(...)) -> Response:
        try:
            who = authorize(request, OPERATOR)
        except HTTPException as e:
            return denied(request, e)
        status, body = ui.label(frame_id, label, who)
        flash = {"ok": status == 200, "text": f"frame {frame_id[:8]} labelled {label}" if status == 200 else
                 body.get("error", str(body))}  # fmt: skip
        if status == 200 and not body.get("frame_kept"):  # counted for the rollout, but no training image
            flash["text"] += ": the box no longer holds this frame, so it is not kept for training"
        return render(request, "_review.html", status, who=who, flash=flash, **review_ctx())

    @router.get("/ui/f/rollout")
    def rollout(request: Request) -> Response:
        return fragment(request, OPERATOR, "_rollout.html", lambda: views.rollout_view(service), no_auth=NO_AUTH_NOTE)

    @router.get("/ui/f/confirm")
    def confirm(request: Request, action: str) -> Response:
        if action not in (PROMOTE, ROLLBACK):
            return denied(request, HTTPException(422, f"action={action[:20]!r}: use promote or rollback"))
        try:
            authorize(request, ADMIN)
        except HTTPException as e:
            return denied(request, e)
        return render(request, "_confirm.html", action=action, state=service.runtime.state())

    @router.post("/ui/rollout/{action}")
    def act(
        request: Request, action: str, version: str = Form(...), reason: str = Form(...), confirm: str = Form("")
    ) -> Response:
        try:
            who = authorize(request, ADMIN)
            if action not in (PROMOTE, ROLLBACK):
                raise HTTPException(422, f"action={action[:20]!r}: use promote or rollback")
            if confirm != action:
                raise HTTPException(422, f"confirm={confirm[:20]!r}: confirm with {action!r}")
            if not reason.strip():
                raise HTTPException(422, "reason: say why, for the audit trail")
            record = ui.force(action, version, reason.strip()[:500], who)
        except HTTPException as e:
            return denied(request, e)
        ok = record.get("applied", True)
        flash = {"ok": ok, "text": f"{action} of v{version} " + ("done" if ok else f"not applied: {record}")}
        return render(
            request, "_rollout.html", who=who, flash=flash, no_auth=NO_AUTH_NOTE, **views.rollout_view(service)
        )

    @router.get("/ui/f/models")
    def models(request: Request) -> Response:
        return fragment(request, OPERATOR, "_models.html", lambda: views.models_view(service), now=time.time())

    @router.get("/ui/img/{frame_id}")
    def image(frame_id: str, exp: int = 0, sig: str = "") -> Response:
        if not ui.signed(frame_id, exp, sig):
            return Response("bad, missing or expired signature: reload the page", status_code=403,
                            media_type="text/plain")  # fmt: skip
        try:
            data = ui.image(frame_id)
        except LimitError as e:
            return Response(str(e), status_code=e.status, media_type="text/plain", headers={"Retry-After": "1"})
        if data is None:
            return Response("frame no longer kept", status_code=404, media_type="text/plain")
        age = max(0, min(IMG_TTL_S, exp - int(time.time())))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": f"private, max-age={age}"})

    app.include_router(router)
    static = GZipMiddleware(StaticFiles(directory=str(HERE / "static")), minimum_size=1000)  # htmx: 52 -> 16 KB
    app.mount("/ui/static", static, name="ui-static")
    return ui


__all__ = ["OPEN_PATHS", "LineUI", "mount_ui"]
