"""The service's front door, a plain ASGI middleware: who may call which route, how admin calls must look, and how
many body bytes any request may send, all decided before a route reads a byte of the body.

    0. every request, in every mode, must name this box in ``Host`` (421 otherwise: a DNS-rebinding page reaches the
       box under its own name), and an ``Origin``, when a browser sends one, must be one of those names too (403: a
       cross-origin page, or a form on one, cannot act even on a box without tokens);
    1. open paths (probes, docs) pass; every other path needs a valid bearer token (401) of an allowed role (403);
    2. admin routes need ``Content-Type: application/json`` (415): a cross-origin HTML form cannot send it;
    3. ``Content-Length`` over the limit is 413 at once; a body without one (chunked) is counted while it streams in
       and cut off with 413 at the limit, so an upload never costs more than ``limits.max_body_bytes`` of memory.

The names this box answers to are the loopback ones (`LOOPBACK_HOSTS`) and those configured (``sensitune-edge
--allow-host NAME``, or ``*`` for any, e.g. behind a proxy that checks them). Every refusal of 0 and 1 counts as
``refused_unauthorized``. The principal is left in ``scope["state"]["principal"]`` for the route (audit log, rate
limit).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from fastapi import HTTPException

from deploy.edge.auth import LOCAL, Principal, TokenStore
from deploy.edge.ui import OPEN_PATHS as UI_OPEN_PATHS

OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/static/", *UI_OPEN_PATHS)
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def allowed_hosts(configured: Iterable[str] = ()) -> frozenset[str]:
    """The host names the box answers to: the loopback ones and `configured` (lower case, ports and brackets off)."""
    return LOOPBACK_HOSTS | {host_name(h) for h in configured if h.strip()}


def host_name(value: str) -> str:
    """``"Edge-7.plant:8080"`` -> ``"edge-7.plant"``, ``"[::1]:8080"`` -> ``"::1"``; the name a Host header gives."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _origin_host(origin: str) -> str:
    """The host name of an ``Origin`` header; "" for ``null`` (a sandboxed or file page) and anything malformed."""
    try:
        return urlsplit(origin).hostname or ""
    except ValueError:
        return ""


async def _answer(send: Callable, status: int, error: str, headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps({"error": error}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware (see the module docstring).

    Args:
        app: The FastAPI app.
        tokens: The configured tokens; None means open (only allowed on loopback; every caller is `LOCAL`).
        roles: (method, path) -> the roles that may call it; a path not listed takes any valid token.
        admin_routes: (method, path) of the admin actions (JSON body required).
        max_body: Returns the current ``limits.max_body_bytes`` (it follows a reload).
        hosts: The names the box answers to (`allowed_hosts`); ``"*"`` among them: any.
        count: Counts a refusal by its metric name (``refused_unauthorized``).
    """

    def __init__(
        self,
        app: Any,
        tokens: TokenStore | None,
        roles: Mapping[tuple[str, str], frozenset[str]],
        admin_routes: frozenset[tuple[str, str]],
        max_body: Callable[[], int],
        hosts: frozenset[str] = LOOPBACK_HOSTS,
        count: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.app, self.tokens, self.roles, self.admin_routes, self.max_body = app, tokens, roles, admin_routes, max_body
        self.hosts, self.count = hosts, count

    def _misdirected(self, headers: Mapping[str, str]) -> tuple[int, str] | None:
        """(status, why) when Host or Origin names no host of this box; None when both are fine."""
        if "*" in self.hosts:
            return None
        host = headers.get("host", "")
        if host_name(host) not in self.hosts:
            known = ", ".join(sorted(self.hosts))
            return 421, f"Host {host[:60]!r} is not a name of this box ({known}); start it with --allow-host NAME"
        origin = headers.get("origin")
        if origin is not None and _origin_host(origin) not in self.hosts:
            return 403, f"Origin {origin[:60]!r}: a page of another site cannot call this box"
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if (refused := self._misdirected(headers)) is not None:
            self.count("refused_unauthorized")
            return await _answer(send, *refused)
        if not any(path == p or (p != "/" and p.endswith("/") and path.startswith(p)) for p in OPEN_PATHS):
            principal = LOCAL if self.tokens is None else self.tokens.authenticate(headers.get("authorization"))
            if principal is None:
                self.count("refused_unauthorized")
                sent = headers.get("authorization")
                why = "missing, unknown or expired bearer token" if sent else "no Authorization header"
                return await _answer(
                    send, 401, f"{why}: send Authorization: Bearer <token>", {"www-authenticate": "Bearer"}
                )
            allowed = self.roles.get((method, path))
            if allowed is not None and not principal.may(allowed):
                self.count("refused_unauthorized")
                need = " or ".join(sorted(allowed | {"admin"}))
                return await _answer(send, 403, f"token {principal.name!r} has role {principal.role!r}; need {need}")
            scope.setdefault("state", {})["principal"] = principal
            if (method, path) in self.admin_routes:
                ctype = headers.get("content-type", "").split(";")[0].strip().lower()
                if ctype != "application/json":
                    return await _answer(send, 415, f"{path}: send a JSON body (Content-Type: application/json)")
        cap = self.max_body()
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cap):
            return await _answer(send, 413, f"body of {length} bytes: over limits.max_body_bytes={cap}")
        seen = 0

        async def capped_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:  # FastAPI re-raises an HTTPException from body parsing as the response
                    raise HTTPException(413, f"body over limits.max_body_bytes={cap}")
            return message

        await self.app(scope, capped_receive, send)


def principal_of(scope_state: Mapping[str, Any]) -> Principal:
    """The caller `Guard` authenticated (routes behind it always have one)."""
    principal = scope_state.get("principal")
    if principal is None:  # fail closed: a route reached without the guard
        raise HTTPException(401, "not authenticated")
    return principal
