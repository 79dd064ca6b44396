"""Bearer tokens for the index API: off unless configured, then required on every route but
/health. An admin token may do everything; a read token may query (/query, /query_by_hash,
/workers, /dump, /metrics) but not change what is followed (/register, /unregister).

Configured by the environment, not the command line (where any local user could read it
from the process list): ``KVEVENTS_INDEX_TOKENS`` and ``KVEVENTS_INDEX_READ_TOKENS``, each a
comma-separated list.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable

ENV_ADMIN = "KVEVENTS_INDEX_TOKENS"
ENV_READ = "KVEVENTS_INDEX_READ_TOKENS"
OPEN_ROUTES = frozenset({"/health"})
ADMIN_ROUTES = frozenset({"/register", "/unregister"})
CHALLENGE = [(b"www-authenticate", b'Bearer realm="kvevents"')]


class Refusal(Exception):
    """401 (no or an unknown token) or 403 (a read token on an admin route)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ApiTokens:
    def __init__(self, admin: Iterable[str] = (), read: Iterable[str] = ()) -> None:
        self._tokens = [(t.encode(), True) for t in admin if t] + [
            (t.encode(), False) for t in read if t
        ]
        if any(len(token) < 16 for token, _ in self._tokens):
            raise ValueError("an API token must be at least 16 characters")

    @classmethod
    def from_env(cls) -> ApiTokens | None:
        admin = os.environ.get(ENV_ADMIN, "").split(",")
        read = os.environ.get(ENV_READ, "").split(",")
        tokens = cls([t.strip() for t in admin], [t.strip() for t in read])
        return tokens if tokens._tokens else None

    def role(self, authorization: bytes | None) -> bool | None:
        """True: admin; False: read only; None: not a configured token. Every token is
        compared, in constant time each, so timing says nothing of which (or how much) matched."""
        if authorization is None or not authorization[:7].lower() == b"bearer ":
            return None
        given = authorization[7:].strip()
        found: bool | None = None
        for token, admin in self._tokens:
            if hmac.compare_digest(token, given):
                found = admin
        return found

    def check(self, path: str, authorization: bytes | None) -> None:
        """Raise `Refusal` unless `authorization` may use `path`."""
        if path in OPEN_ROUTES:
            return
        role = self.role(authorization)
        if role is None:
            raise Refusal(401, "a valid bearer token is required (Authorization: Bearer ...)")
        if not role and path in ADMIN_ROUTES:
            raise Refusal(403, f"a read-only token may not use {path}")


def authorization_of(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            return value
    return None
