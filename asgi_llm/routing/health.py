"""Health of targets and upstream keys, learned from live traffic.

* **Circuit breakers** per (route, upstream key): ``closed`` → after
  ``failure_threshold`` consecutive failures ``open`` for ``cooldown_s`` (doubling on
  each re-open, capped at ``max_cooldown_s``) → ``half_open``: one live request (or a
  free active probe) may try; success closes the breaker, failure re-opens it. A
  target is routable while at least one of its keys is not open.
* **Cooldowns**: an upstream answer that says "not now" (429 with ``Retry-After``,
  401/403 for one key) cools down that key alone for the time given (a 401/403 for
  ``auth_cooldown_s``, unless a free probe with that very key succeeds sooner).
* **Latency EWMA** (time to first token for streams, total latency otherwise) and the
  **in-flight** count per route feed the ``fastest`` and ``least-busy`` strategies.

State is in process. The clock is injectable so tests never sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["BreakerPolicy", "BreakerState", "HealthTracker"]


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a breaker opens and for how long."""

    failure_threshold: int = 3
    cooldown_s: float = 30.0
    max_cooldown_s: float = 300.0
    ewma_alpha: float = 0.3
    auth_cooldown_s: float = 300.0
    """How long one 401/403 retires a (route, key), unless a probe with that key succeeds first."""


@dataclass(slots=True)
class BreakerState:
    """One breaker. ``open_until`` is a monotonic time; 0 when closed."""

    failures: int = 0
    open_until: float = 0.0
    opened_times: int = 0
    half_open_in_flight: bool = False
    cooldown_until: float = 0.0  # key-level "not now" (Retry-After, 401/403)
    cooldown_kind: str = "cooling"  # "cooling" (rate-limited) or "refused" (401/403)
    last_error: str | None = None

    def state(self, now: float) -> str:
        if self.open_until == 0.0:
            return "closed"
        return "open" if now < self.open_until else "half_open"


@dataclass(slots=True)
class _RouteStats:
    ewma_s: float | None = None
    in_flight: int = 0
    samples: int = 0


@dataclass
class HealthTracker:
    """Breakers, cooldowns, latency and load for every (route, key) the gateway uses."""

    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    clock: Callable[[], float] = time.monotonic
    on_change: Callable[[str, str, BreakerState], None] | None = None
    """Called after a breaker opens, closes or a key cools down (to share it across replicas)."""
    _breakers: dict[tuple[str, str], BreakerState] = field(default_factory=dict)
    _routes: dict[str, _RouteStats] = field(default_factory=dict)

    # ---------------------------------------------------------------- breakers

    def breaker(self, route: str, key_id: str = "") -> BreakerState:
        b = self._breakers.get((route, key_id))
        if b is None:
            b = self._breakers[(route, key_id)] = BreakerState()
        return b

    def key_usable(self, route: str, key_id: str = "") -> bool:
        """May a request use this key on this route now (closed, or a free half-open slot)?"""
        b = self._breakers.get((route, key_id))
        if b is None:
            return True
        now = self.clock()
        if now < b.cooldown_until:
            return False
        state = b.state(now)
        return state == "closed" or (state == "half_open" and not b.half_open_in_flight)

    def route_usable(self, route: str, key_ids: list[str]) -> bool:
        """A route is usable while any of its keys is."""
        return any(self.key_usable(route, k) for k in (key_ids or [""]))

    def route_state(self, route: str, key_ids: list[str]) -> str:
        """``closed`` / ``half_open`` / ``open`` / ``cooling`` for explanations."""
        now = self.clock()
        states = []
        for k in key_ids or [""]:
            b = self._breakers.get((route, k))
            if b is None:
                states.append("closed")
            elif now < b.cooldown_until:
                states.append(b.cooldown_kind)
            else:
                states.append(b.state(now))
        for s in ("closed", "half_open", "cooling", "refused", "open"):
            if s in states:
                return s
        return "closed"

    def begin(self, route: str, key_id: str = "") -> None:
        """An attempt starts: count it in flight; take the half-open slot if that is the state."""
        self._stats(route).in_flight += 1
        b = self._breakers.get((route, key_id))
        if b is not None and b.state(self.clock()) == "half_open":
            b.half_open_in_flight = True

    def end(self, route: str, key_id: str = "") -> None:
        stats = self._stats(route)
        stats.in_flight = max(0, stats.in_flight - 1)
        b = self._breakers.get((route, key_id))
        if b is not None:
            b.half_open_in_flight = False

    def success(self, route: str, key_id: str = "", *, latency_s: float | None = None) -> None:
        """A complete answer: close the breaker, feed the latency EWMA."""
        b = self._breakers.get((route, key_id))
        if b is not None:
            was_open = b.open_until != 0.0
            b.failures = 0
            b.open_until = 0.0
            b.opened_times = 0
            b.last_error = None
            if was_open and self.on_change is not None:
                self.on_change(route, key_id, b)
        if latency_s is not None:
            stats = self._stats(route)
            a = self.policy.ewma_alpha
            stats.ewma_s = latency_s if stats.ewma_s is None else a * latency_s + (1 - a) * stats.ewma_s
            stats.samples += 1

    def failure(self, route: str, key_id: str = "", *, error: str = "") -> None:
        """A failure that says the target is unhealthy (5xx, reset, timeout, garbage)."""
        b = self.breaker(route, key_id)
        b.failures += 1
        b.last_error = error or b.last_error
        now = self.clock()
        if b.state(now) == "half_open" or b.failures >= self.policy.failure_threshold:
            cooldown = min(self.policy.cooldown_s * (2 ** b.opened_times), self.policy.max_cooldown_s)
            b.open_until = now + cooldown
            b.opened_times += 1
            b.failures = 0
            if self.on_change is not None:
                self.on_change(route, key_id, b)

    def cool_down(self, route: str, key_id: str, seconds: float, *, error: str = "", kind: str = "cooling") -> None:
        """This key must not be used on this route for ``seconds``.

        ``kind`` is ``cooling`` (the upstream rate-limited it) or ``refused`` (401/403).
        """
        b = self.breaker(route, key_id)
        b.cooldown_until = max(b.cooldown_until, self.clock() + seconds)
        b.cooldown_kind = kind
        b.last_error = error or b.last_error
        if self.on_change is not None:
            self.on_change(route, key_id, b)

    def refused(self, route: str, key_id: str, *, error: str = "") -> None:
        """The upstream refused this key on this route (401/403): retire it for
        :attr:`BreakerPolicy.auth_cooldown_s`, or until :meth:`key_accepted`."""
        self.cool_down(route, key_id, self.policy.auth_cooldown_s, error=error, kind="refused")

    def refused_keys(self) -> set[tuple[str, str]]:
        """(route, key id) pairs retired by a 401/403 right now: what a probe may bring back."""
        now = self.clock()
        return {rk for rk, b in self._breakers.items() if b.cooldown_kind == "refused" and now < b.cooldown_until}

    def key_accepted(self, route: str, key_id: str) -> None:
        """A free call with this key succeeded: end its 401/403 retirement on this route now."""
        b = self._breakers.get((route, key_id))
        if b is None or b.cooldown_kind != "refused" or b.cooldown_until <= self.clock():
            return
        b.cooldown_until = 0.0
        b.cooldown_kind = "cooling"
        if self.on_change is not None:
            self.on_change(route, key_id, b)

    def apply_remote(self, route: str, key_id: str, *, open_for: float, cooldown_for: float,
                     cooldown_kind: str, opened_times: int, error: str | None) -> None:
        """Adopt a transition another replica observed (remaining durations, not clocks:
        monotonic clocks differ between processes). Never calls ``on_change``."""
        now = self.clock()
        b = self.breaker(route, key_id)
        b.open_until = now + open_for if open_for > 0 else 0.0
        b.opened_times = max(b.opened_times, opened_times) if open_for > 0 else 0
        if open_for <= 0:
            b.failures = 0
        if cooldown_for > 0:
            b.cooldown_until = max(b.cooldown_until, now + cooldown_for)
            b.cooldown_kind = cooldown_kind
        b.last_error = error

    def probe_result(self, route: str, ok: bool) -> None:
        """An active probe's verdict for every key of a route: ok moves open breakers to half-open."""
        now = self.clock()
        for (r, _k), b in self._breakers.items():
            if r == route and ok and b.state(now) == "open":
                b.open_until = now  # half-open from now: the next live request tries it

    def open_routes(self) -> set[str]:
        now = self.clock()
        return {r for (r, _k), b in self._breakers.items() if b.state(now) == "open"}

    # ----------------------------------------------------------------- metrics

    def _stats(self, route: str) -> _RouteStats:
        s = self._routes.get(route)
        if s is None:
            s = self._routes[route] = _RouteStats()
        return s

    def latency(self, route: str) -> float | None:
        """EWMA latency in seconds; ``None`` until measured."""
        s = self._routes.get(route)
        return s.ewma_s if s is not None else None

    def in_flight(self, route: str) -> int:
        s = self._routes.get(route)
        return s.in_flight if s is not None else 0
