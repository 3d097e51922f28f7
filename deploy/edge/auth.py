"""Who may do what on the edge service: bearer tokens with one role each, deny by default (IEC 62443).

Roles, least privilege first:

    camera     POST /predict
    operator   POST /feedback, GET /report
    admin      everything: POST /decide /promote /rollback /reload, and what the other roles may do

``GET /metrics`` takes any valid token; ``/healthz``, ``/readyz``, ``/docs``, ``/redoc`` and ``/openapi.json`` are
open (probes and documentation carry no secret). Every other path needs a token.

Tokens travel only in the ``Authorization: Bearer <token>`` header, never in a cookie, query or form field: a web
page on the plant network cannot make a browser send that header cross-origin (no CORS is allowed), so a forged
form POST gets 401. Admin actions further need a JSON body (``Content-Type: application/json``, 415 otherwise),
which a cross-origin form cannot send either.

The tokens file (YAML or JSON) stores a sha256 of each token, never the token::

    tokens:
      - {name: line7-cams, role: camera, sha256: 3c5e...}     # python -m deploy.edge.auth new line7-cams camera
      - {name: qa-panel, role: operator, sha256: 9a1f...}
      - {name: alice, role: admin, sha256: 77b0..., expires: 2026-07-01T00:00:00Z}   # optional: refused from then on

It is named by ``--tokens FILE`` or ``SENSITUNE_EDGE_TOKENS_FILE``; ``SENSITUNE_EDGE_TOKENS`` may instead hold
``name:role:sha256`` entries separated by commas. Tokens are compared by their digests with
`hmac.compare_digest`, against every entry (no early exit). The token's name is what the audit log records.
``POST /reload`` re-reads the file: a token taken out of it is refused from then on (`TokenStore.reload`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from spt_core.portable.errors import SensituneError

CAMERA, OPERATOR, ADMIN = "camera", "operator", "admin"
ROLES = (CAMERA, OPERATOR, ADMIN)
TOKENS_FILE_ENV, TOKENS_ENV = "SENSITUNE_EDGE_TOKENS_FILE", "SENSITUNE_EDGE_TOKENS"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class AuthError(SensituneError):
    """A tokens file or variable that cannot be used."""


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the token's name (written to the audit log) and its role."""

    name: str
    role: str

    def may(self, roles: frozenset[str]) -> bool:
        return self.role == ADMIN or self.role in roles


LOCAL = Principal("local", ADMIN)  # no tokens configured: only allowed on a loopback address


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def expiry_of(value: object) -> float | None:
    """A token entry's ``expires`` (an ISO-8601 time, UTC unless it says; a date alone: its 00:00 UTC) -> unix time;
    None: never. Raises ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):  # YAML reads 2026-07-01 as a date
        value = dt.datetime(value.year, value.month, value.day)
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            value = None
    if not isinstance(value, dt.datetime):
        raise ValueError(value)
    return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()


class TokenStore:
    """The configured tokens (name, role, sha256[, expires]); `authenticate` maps an Authorization header to a
    `Principal`; `reload` re-reads the tokens file (revocation)."""

    def __init__(self, entries: Sequence[tuple], source: str, path: Path | None = None) -> None:
        errors, names, digests, expires = [], set(), set(), []
        for name, role, digest, *rest in entries:
            try:
                expires.append(expiry_of(rest[0] if rest else None))
            except ValueError:
                errors.append(f"{name}: expires={rest[0]!r:.40}; give an ISO-8601 time, e.g. 2026-07-01T00:00:00Z")
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                errors.append(f"name={name!r}: 1..64 of letters, digits and . _ @ -")
            elif name in names:
                errors.append(f"name={name!r} appears twice")
            if role not in ROLES:
                errors.append(f"{name}: role={role!r}; use one of {list(ROLES)}")
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                errors.append(f"{name}: sha256 must be 64 lowercase hex digits (python -m deploy.edge.auth hash)")
            elif digest in digests:
                errors.append(f"{name}: the same token as another entry; give each client its own")
            names.add(name)
            digests.add(digest)
        if not entries:
            errors.append("no tokens")
        if errors:
            raise AuthError(f"{source}: " + "; ".join(errors))
        self.source, self.path = source, path
        # swapped as one reference by `reload`: a request sees the old list or the new one, never a mix
        self._entries = [(Principal(e[0], e[1]), bytes.fromhex(e[2]), t) for e, t in zip(entries, expires)]

    def reload(self) -> int:
        """Re-read the tokens file (a store from the environment or a list stays as it is); returns how many tokens
        there are now. Raises `AuthError` for an unusable file, and the tokens in force stay as they were."""
        if self.path is not None:
            self._entries = TokenStore.from_file(self.path)._entries
        return len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal of ``Authorization: Bearer <token>``, or None (missing, malformed or unknown token)."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 512:
            return None
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found, now = None, time.time()
        for principal, expected, expires in self._entries:  # every entry is compared: the time tells not which matched
            if hmac.compare_digest(digest, expected) and (expires is None or now < expires):
                found = principal
        return found

    @classmethod
    def from_file(cls, path: str | Path) -> TokenStore:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise AuthError(f"{path}: cannot read the tokens file ({e.strerror}); check --tokens") from None
        except yaml.YAMLError:
            raise AuthError(f"{path}: not valid YAML/JSON; see deploy/README.md for the tokens file") from None
        items = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
            raise AuthError(f"{path}: give tokens: [{{name: ..., role: ..., sha256: ...}}, ...]")
        for t in items:
            if "token" in t:
                raise AuthError(
                    f"{path}: entry {t.get('name')!r} stores a plain token; store its sha256 instead "
                    "(python -m deploy.edge.auth hash)"
                )
            if not {"name", "role", "sha256"} <= set(t) <= {"name", "role", "sha256", "expires"}:
                raise AuthError(f"{path}: entry {t!r:.80} needs exactly name, role, sha256 (and optionally expires)")
        return cls([(t["name"], t["role"], t["sha256"], t.get("expires")) for t in items], str(path), path)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TokenStore | None:
        """`SENSITUNE_EDGE_TOKENS_FILE` (a tokens file) or `SENSITUNE_EDGE_TOKENS` (name:role:sha256,...); None if
        neither is set."""
        if environ.get(TOKENS_FILE_ENV):
            return cls.from_file(environ[TOKENS_FILE_ENV])
        raw = environ.get(TOKENS_ENV, "").strip()
        if not raw:
            return None
        entries = []
        for item in raw.split(","):
            parts = item.strip().split(":")
            if len(parts) != 3:
                raise AuthError(f"{TOKENS_ENV}: entry {item.strip()[:20]!r}...: give name:role:sha256")
            entries.append((parts[0], parts[1], parts[2].lower()))
        return cls(entries, TOKENS_ENV)


def load_tokens(path: str | Path | None, environ: Mapping[str, str] = os.environ) -> TokenStore | None:
    """Tokens from `path` (``--tokens``) or the environment; None when none is configured."""
    return TokenStore.from_file(path) if path else TokenStore.from_env(environ)


def main(argv: list[str] | None = None) -> int:
    """``python -m deploy.edge.auth new NAME ROLE`` (a fresh token + its tokens-file entry) or ``hash`` (stdin)."""
    ap = argparse.ArgumentParser(prog="python -m deploy.edge.auth", description="Tokens for the edge service.")
    sub = ap.add_subparsers(dest="verb", required=True)
    new = sub.add_parser("new", help="print a new random token and the line for the tokens file")
    new.add_argument("name")
    new.add_argument("role", choices=ROLES)
    new.add_argument("--days", type=int, help="the token expires after this many days (default: never)")
    sub.add_parser("hash", help="read a token from stdin, print its sha256")
    args = ap.parse_args(argv)
    if args.verb == "hash":
        print(token_digest(sys.stdin.readline().strip()))
        return 0
    if not _NAME.fullmatch(args.name):
        print(f"error: name={args.name!r}: 1..64 of letters, digits and . _ @ -", file=sys.stderr)
        return 2
    token = secrets.token_urlsafe(32)
    fields = {"name": args.name, "role": args.role, "sha256": token_digest(token)}
    if args.days is not None:
        until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=args.days)
        fields["expires"] = until.isoformat(timespec="seconds").replace("+00:00", "Z")
    entry = json.dumps(fields)
    print(f"token (give it to the client, it is not stored): {token}")
    print(f"tokens file entry:  - {entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
