"""Node secrets and records.

Three secrets, each a random 32-byte URL-safe string behind a prefix that says what it is:

* ``ent-llm-…`` — an **enrollment token**: one use, short-lived, made by an admin.
* ``nc-llm-…`` — a **node credential**: long-lived, rotatable, revocable; the agent
  presents it on every ``/nodes/...`` call.
* the **call secret** — what the gateway presents to a direct-mode agent
  (``x-asgi-llm-node-secret``). It is *derived*, not stored:
  ``HMAC(pepper, "node-call:" + node id + credential hash)``, so it changes when the
  credential rotates and the database alone cannot reproduce it.

The gateway stores only ``HMAC-SHA256(pepper, secret)`` of tokens and credentials (the
API keys' pepper and :func:`asgi_llm.auth.keys.hash_key`), compared in constant time.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from asgi_llm._redact import redact_url
from asgi_llm.auth.keys import hash_key

__all__ = [
    "CALL_SECRET_HEADER",
    "CREDENTIAL_PREFIX",
    "EnrollmentToken",
    "NodeRecord",
    "TOKEN_PREFIX",
    "call_secret",
    "new_id",
    "new_secret",
    "secret_hash",
    "valid_window",
]

TOKEN_PREFIX = "ent-llm-"
CREDENTIAL_PREFIX = "nc-llm-"
CALL_SECRET_HEADER = "x-asgi-llm-node-secret"
STATES = ("active", "cordoned", "draining")


def new_secret(prefix: str) -> str:
    """``prefix`` + 32 random bytes, URL-safe base64."""
    return prefix + secrets.token_urlsafe(32)


def new_id(prefix: str) -> str:
    """A public, non-secret id (``node_`` / ``ent_`` + 16 hex digits)."""
    return prefix + secrets.token_hex(8)


def secret_hash(pepper: bytes, secret: str) -> str:
    """``HMAC-SHA256(pepper, secret)``, hex: what the store keeps."""
    return hash_key(pepper, secret)


def call_secret(pepper: bytes, node_id: str, credential_hash: str) -> str:
    """The secret the gateway presents to a direct-mode agent (derived, never stored)."""
    return "ncs-" + hmac.new(pepper, f"node-call:{node_id}:{credential_hash}".encode(), "sha256").hexdigest()


@dataclass(frozen=True, slots=True)
class EnrollmentToken:
    """A stored enrollment token (its hash) and the node defaults it carries."""

    id: str
    hash: str
    org: str
    expires_at: float
    defaults: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    used_at: float | None = None
    node_id: str | None = None
    created_by: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "node.enrollment_token", "org": self.org, "defaults": self.defaults,
            "created_at": self.created_at, "expires_at": self.expires_at, "used_at": self.used_at,
            "node_id": self.node_id, "created_by": self.created_by,
        }


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """An enrolled node, as the SQL store keeps it.

    ``state``: ``active``, ``cordoned`` (out of routing, still connected) or ``draining``
    (out of routing; the agent finishes what it has and stops). ``price`` is USD per 1M
    tokens (``{"input": .., "output": ..}``), set by the owner. ``shared_with`` lists the
    orgs besides the owner that may use the node (``"*"`` = every org).
    ``availability``: ``{"mode": "always"}`` or ``{"mode": "windows", "windows":
    ["18:00-08:00"]}`` (UTC).
    """

    id: str
    name: str
    org: str
    credential_hash: str
    mode: str = "direct"
    url: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    price: dict[str, str] | None = None
    shared_with: tuple[str, ...] = ()
    availability: dict[str, Any] = field(default_factory=lambda: {"mode": "always"})
    state: str = "active"
    created_at: float = 0.0
    rotated_at: float | None = None
    revoked_at: float | None = None
    last_seen_at: float | None = None
    created_by: str | None = None

    def with_(self, **changes: Any) -> NodeRecord:
        return replace(self, **changes)

    def visible_to(self, org: str) -> bool:
        """Does the owner let ``org`` use this node? (Another org also needs to have
        accepted it: see :mod:`asgi_llm.nodes.consent`.)"""
        return org == self.org or org in self.shared_with or "*" in self.shared_with

    def price_decimal(self) -> tuple[Decimal, Decimal] | None:
        if not self.price:
            return None
        return Decimal(str(self.price.get("input", "0"))), Decimal(str(self.price.get("output", "0")))

    def available_at(self, when: float | None = None) -> bool:
        """Inside the owner's availability windows (UTC) — always, for ``always``."""
        av = self.availability or {}
        if av.get("mode", "always") == "always":
            return True
        if av.get("mode") == "paused":
            return False
        t = time.gmtime(time.time() if when is None else when)
        minute = t.tm_hour * 60 + t.tm_min
        for window in av.get("windows", []):
            start, end = (_minutes(p) for p in str(window).split("-", 1))
            if (start <= minute < end) if start <= end else (minute >= start or minute < end):
                return True
        return False

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "node", "name": self.name, "org": self.org, "mode": self.mode,
            "url": redact_url(self.url) if self.url else None,
            "labels": self.labels, "models": self.models, "price": self.price, "shared_with": list(self.shared_with),
            "availability": self.availability, "state": self.state, "created_at": self.created_at,
            "rotated_at": self.rotated_at, "revoked_at": self.revoked_at, "last_seen_at": self.last_seen_at,
            "created_by": self.created_by,
        }


def _minutes(hhmm: str) -> int:
    h, _, m = hhmm.strip().partition(":")
    return int(h) * 60 + int(m or 0)


def valid_window(window: str) -> bool:
    """``HH:MM-HH:MM`` (UTC)."""
    try:
        parts = [_minutes(p) for p in window.split("-", 1)]
    except ValueError:
        return False
    return len(parts) == 2 and all(0 <= p < 24 * 60 for p in parts)
