"""Console sessions: a signed, expiring cookie naming the signed-in admin key.

The cookie holds ``{"k": key id, "o": org, "e": expiry, "n": nonce}`` as base64url JSON
plus an HMAC-SHA256 over it with the session secret (shared by every replica: the
recipe's ``console.session_secret``, ``ASGI_LLM_CONSOLE_SECRET``, or one generated once
and kept in the SQL store). The key itself is never in the cookie. The CSRF token is an
HMAC of the nonce, so it is bound to one session and needs no server-side state.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

__all__ = ["Session", "SessionSigner"]

_MAX_COOKIE_CHARS = 1024


@dataclass(frozen=True, slots=True)
class Session:
    """One signed-in console session."""

    key_id: str
    org: str
    expires_at: float
    nonce: str
    fingerprint: str = ""  # recipe keys: KeyRing.static_fingerprint at sign-in


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Issue and check session cookies and CSRF tokens with one secret."""

    def __init__(self, secret: bytes, *, ttl_s: float, clock: object = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("the console session secret must be at least 16 bytes")
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    def _mac(self, purpose: bytes, data: bytes) -> str:
        return _b64(hmac.new(self._secret, purpose + b"\0" + data, hashlib.sha256).digest())

    def issue(self, key_id: str, org: str, fingerprint: str = "") -> tuple[str, Session]:
        """A new cookie value and the session it carries."""
        session = Session(key_id, org, self._clock() + self.ttl_s, secrets.token_urlsafe(16), fingerprint)  # type: ignore[operator]
        body = _b64(json.dumps({"k": key_id, "o": org, "e": session.expires_at, "n": session.nonce, "f": fingerprint},
                               separators=(",", ":")).encode())
        return f"{body}.{self._mac(b'session', body.encode())}", session

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie carries; ``None`` if missing, forged, malformed or expired."""
        if not cookie or len(cookie) > _MAX_COOKIE_CHARS or cookie.count(".") != 1:
            return None
        body, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac(b"session", body.encode())):
            return None
        try:
            data = json.loads(_unb64(body))
            session = Session(str(data["k"]), str(data["o"]), float(data["e"]), str(data["n"]), str(data.get("f", "")))
        except (ValueError, KeyError, TypeError):
            return None
        if session.expires_at <= self._clock():  # type: ignore[operator]
            return None
        return session

    def tag(self, text: str) -> str:
        """A keyed tag of ``text`` (what a session keeps of its recipe key's digest)."""
        return self._mac(b"key", text.encode())[:22]

    def csrf_token(self, session: Session) -> str:
        """The CSRF token of a session (sent back in ``x-csrf-token`` on every change)."""
        return self._mac(b"csrf", session.nonce.encode())

    def check_csrf(self, session: Session, token: str | None) -> bool:
        """Does ``token`` belong to ``session``?"""
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(session))
