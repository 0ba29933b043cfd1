"""API keys: generation, hashing, and the record a key store keeps.

A key is ``sk-llm-`` followed by 43 URL-safe characters (32 random bytes,
``secrets.token_urlsafe``). It is shown once, when created; the store keeps only
``HMAC-SHA256(pepper, key)`` in hex, looked up by that hash and compared with
:func:`hmac.compare_digest`. Keys are high-entropy random secrets, so a fast keyed hash
is the right tool (slow password hashes are for human-chosen passwords); the pepper
keeps a stolen table of hashes useless without the server's secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from asgi_llm.auth.limits import KeyLimits
from asgi_llm.context import Principal

__all__ = [
    "KEY_PREFIX",
    "SCOPES",
    "KeyRecord",
    "PrincipalLimits",
    "generate_key",
    "hash_key",
    "new_key_id",
]

KEY_PREFIX = "sk-llm-"
SCOPES: frozenset[str] = frozenset({"inference", "admin", "node"})
_DISPLAY_CHARS = 4  # random characters kept after the prefix for display (of 43)


def generate_key() -> str:
    """A new random API key: ``sk-llm-`` + 32 random bytes, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    """A public, non-secret key id (``key_`` + 16 hex digits)."""
    return "key_" + secrets.token_hex(8)


def hash_key(pepper: bytes, key: str) -> str:
    """``HMAC-SHA256(pepper, key)`` as 64 hex digits."""
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


def display_prefix(key: str) -> str:
    """What listings show of a key: ``sk-llm-AbCd`` (never enough to use it)."""
    return key[: len(KEY_PREFIX) + _DISPLAY_CHARS]


@dataclass(frozen=True, slots=True)
class PrincipalLimits:
    """The limits a key carries into the quota layer: its own, and per public model."""

    key: KeyLimits = field(default_factory=KeyLimits)
    models: Mapping[str, KeyLimits] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A stored API key (never the key itself: only its keyed hash).

    ``models`` is the allow-list of public model names (``("*",)`` = all);
    times are seconds since the epoch.
    """

    id: str
    org: str
    hash: str
    prefix: str
    name: str | None = None
    scopes: frozenset[str] = frozenset({"inference"})
    models: tuple[str, ...] = ("*",)
    limits: KeyLimits = field(default_factory=KeyLimits)
    model_limits: Mapping[str, KeyLimits] = field(default_factory=dict)
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    created_by: str | None = None

    def principal(self) -> Principal:
        """The :class:`~asgi_llm.context.Principal` requests with this key run as."""
        return Principal(
            key_id=self.id,
            org=self.org,
            scopes=frozenset(self.scopes),
            models=None if "*" in self.models else frozenset(self.models),
            name=self.name,
            limits=PrincipalLimits(self.limits, dict(self.model_limits)),
        )

    def public(self) -> dict[str, Any]:
        """The JSON the admin API shows: everything but the hash."""
        return {
            "id": self.id,
            "object": "api_key",
            "org": self.org,
            "name": self.name,
            "prefix": self.prefix,
            "scopes": sorted(self.scopes),
            "models": list(self.models),
            "limits": _limits_json(self.limits),
            "model_limits": {m: _limits_json(v) for m, v in sorted(self.model_limits.items())},
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "created_by": self.created_by,
            "source": "api",
        }


def _limits_json(limits: KeyLimits) -> dict[str, Any]:
    return {k: v for k, v in limits.model_dump(mode="json").items() if v is not None}
