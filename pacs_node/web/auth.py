"""Who is calling: tokens configured in ``[[http.tokens]]``, their secrets stored only as hashes.

A request authenticates with ``Authorization: Bearer <secret>``, HTTP basic (``name:secret``), or the
console's session cookie (set by its login form). PBKDF2 costs tens of milliseconds on purpose, so a
secret that verified once is remembered by its SHA-256 (in this process only) instead of being
stretched on every request of a STOW-RS client.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from pacs_node.config import HttpToken, Role

#: PBKDF2 iterations of newly hashed secrets (OWASP's 2023 figure for HMAC-SHA256).
PBKDF2_ITERATIONS = 600_000
SESSION_COOKIE = "pacs_node_session"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's name (safe to log) and its role."""

    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def hash_secret(secret: str, *, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The ``secret_hash`` to configure for ``secret`` (PBKDF2-HMAC-SHA256 with a random salt)."""
    salt = secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt.encode(), iterations).hex()
    return f"pbkdf2_sha256${iterations}${salt}${digest}"


def _matches(secret: str, stored: str) -> bool:
    if stored.startswith("sha256:"):
        return hmac.compare_digest(hashlib.sha256(secret.encode()).hexdigest(), stored.removeprefix("sha256:"))
    _, iterations, salt, digest = stored.split("$")
    computed = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt.encode(), int(iterations)).hex()
    return hmac.compare_digest(computed, digest)


class Authenticator:
    """Checks credentials against the configured tokens and keeps the console's sessions."""

    def __init__(self, tokens: list[HttpToken], session_seconds: float) -> None:
        self._tokens = {token.name: token for token in tokens}
        self._verified: dict[tuple[str, str], Principal] = {}
        self._sessions: dict[str, tuple[Principal, float]] = {}
        self._session_seconds = session_seconds
        self._lock = threading.Lock()

    def verify(self, secret: str, name: str | None = None) -> Principal | None:
        """The principal whose secret this is (only ``name``'s when given), or None."""
        fingerprint = hashlib.sha256(secret.encode()).hexdigest()
        key = (name or "", fingerprint)
        with self._lock:
            known = self._verified.get(key)
        if known is not None:
            return known
        candidates = [self._tokens[name]] if name in self._tokens else [] if name else list(self._tokens.values())
        for token in candidates:
            if _matches(secret, token.secret_hash):
                principal = Principal(token.name, token.role)
                with self._lock:
                    self._verified[key] = principal
                return principal
        return None

    def from_header(self, authorization: str | None) -> Principal | None:
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and value:
            return self.verify(value)
        if scheme.lower() == "basic" and value:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            return self.verify(password, user) if sep else None
        return None

    # -- console sessions ------------------------------------------------------------------------

    def open_session(self, principal: Principal) -> str:
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
            self._sessions[session_id] = (principal, now + self._session_seconds)
        return session_id

    def from_session(self, session_id: str | None) -> Principal | None:
        if not session_id:
            return None
        with self._lock:
            entry = self._sessions.get(session_id)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def close_session(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)
