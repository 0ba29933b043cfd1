"""Upstream key pools: several keys per provider, rotated, each with its own health.

Keys are identified by position (``k0``, ``k1`` …) in logs, breakers and explanations
— never by their value. A key that an upstream refuses (401/403) or rate-limits (429)
cools down alone; the others keep serving. When every key of a provider is cooling or
its breaker is open, :meth:`KeyPool.pick` raises a 503 that names the provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from asgi_llm.errors import UpstreamError

__all__ = ["KeyHealth", "KeyPool", "KeysExhaustedError"]


class KeyHealth(Protocol):
    """What a key pool asks of the breakers (:class:`~asgi_llm.routing.health.HealthTracker`)."""

    def key_usable(self, route: str, key_id: str) -> bool:
        """Whether ``key_id`` may be used for ``route`` now."""
        ...


class KeysExhaustedError(UpstreamError):
    """Every upstream key of a provider is cooling down or failing."""

    status_code = 503
    type = "service_unavailable"
    code = "upstream_keys_exhausted"


class KeyPool:
    """Round-robin over a provider's keys, skipping the ones health says not to use."""

    def __init__(self, provider: str, keys: Sequence[str], *, health: KeyHealth | None = None) -> None:
        self.provider = provider
        # Empty entries are dropped, so a recipe can list optional keys as ${KEY_2:-}.
        self._keys = [k for k in keys if k]
        self.ids = [f"k{i}" for i in range(len(self._keys))]
        self.health = health
        self._next = 0

    def __len__(self) -> int:
        return len(self._keys)

    def any_key(self) -> str | None:
        """A key for a free call (a health probe): any one proves reachability."""
        return self._keys[0] if self._keys else None

    def secret(self, key_id: str) -> str | None:
        """The key behind ``key_id`` (``None`` if there is no such id)."""
        try:
            return self._keys[self.ids.index(key_id)]
        except ValueError:
            return None

    def pick(self, route: str) -> tuple[str, str | None]:
        """Return ``(key_id, secret)`` for the next usable key (``("", None)`` if keyless)."""
        if not self._keys:
            return "", None
        n = len(self._keys)
        for offset in range(n):
            i = (self._next + offset) % n
            if self.health is None or self.health.key_usable(route, self.ids[i]):
                self._next = (i + 1) % n
                return self.ids[i], self._keys[i]
        raise KeysExhaustedError(
            f"All {n} API key(s) of provider '{self.provider}' are cooling down or failing on {route}; "
            "try again shortly.",
            target=route,
        )
