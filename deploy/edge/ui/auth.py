"""Who may use which part of the operator pages: the service's bearer tokens, sent by the page's own JavaScript.

The browser never holds a cookie: the operator pastes a token once, the page keeps it in ``sessionStorage`` and
sends ``Authorization: Bearer <token>`` on every fetch (a cross-origin page cannot make a browser send that
header, so a forged form gets 401). The tokens are the service's: any object with
``authenticate(authorization_header) -> principal | None`` (a principal has ``name`` and ``role``), e.g.
``deploy.edge.auth.TokenStore``, given to `mount_ui` or found at ``service.auth``. Roles: ``operator`` reads the pages
and labels frames, ``admin`` may do everything, including promote and roll back.

A service without tokens is unauthenticated: everyone may read and label (as ``/feedback`` allows), and nobody may
promote or roll back from the pages, because nobody can prove the admin role.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

OPERATOR, ADMIN = "operator", "admin"
# the 401 in an operator's words, heading and how (the pages' script says the same for the front door's 401, ui.js)
SIGN_IN = "Sign in with your operator token to label frames"
HOW_TO_SIGN_IN = "Paste it in the box at the top right, then press Use token."


@dataclass(frozen=True)
class Who:
    """The caller of a UI route: a token's name and role, or anonymous on a box without tokens."""

    name: str
    role: str | None
    auth_configured: bool

    @property
    def admin(self) -> bool:
        return self.auth_configured and self.role == ADMIN

    def may(self, role: str) -> bool:
        if role == ADMIN:
            return self.admin
        return not self.auth_configured or self.role in (role, ADMIN)


ANONYMOUS = Who("anonymous", None, False)


def tokens_of(request: Request) -> Any:
    """The tokens given to `mount_ui` (``deploy.edge.auth.TokenStore``, or any object at ``service.auth`` with its
    ``authenticate``); None: no authentication."""
    return getattr(request.app.state, "ui_tokens", None) or getattr(request.app.state.service, "auth", None)


def identify(request: Request) -> Who | None:
    """The caller, or None when tokens are configured and the header carries none of them."""
    tokens = tokens_of(request)
    if tokens is None:
        return ANONYMOUS
    principal = tokens.authenticate(request.headers.get("authorization"))
    if principal is None:
        return None
    return Who(str(principal.name), str(principal.role), True)


def authorize(request: Request, role: str) -> Who:
    """The caller if it may act as ``role``; else 401 (no or unknown token) or 403 (wrong role, or no tokens)."""
    who = identify(request)
    if who is None:
        raise HTTPException(401, HOW_TO_SIGN_IN)
    if not who.may(role):
        if not who.auth_configured:
            raise HTTPException(403, NO_AUTH_NOTE)
        raise HTTPException(403, f"token {who.name!r} has role {who.role!r}; this needs the {role} role")
    return who


def requires(role: str) -> Any:
    """A FastAPI dependency: ``who: Who = Depends(requires(OPERATOR))``."""

    def dependency(request: Request) -> Who:
        return authorize(request, role)

    return dependency


NO_AUTH_NOTE = (
    "this service runs without tokens, so nobody can prove the admin role: promote and roll back are disabled "
    "(start it with tokens and use an admin token)"
)
