"""Breaker state shared across gateway replicas through Redis.

Reads stay local and free: each replica keeps its own :class:`HealthTracker`. What is
shared is every *transition* — a breaker opening or closing, a key cooling down — which
is published on a Redis channel and stored under a key that expires when the state
does; every replica applies the others' transitions, and a replica that starts later
loads the live ones. So when one replica learns that a target is down, the others stop
sending it traffic too, without a Redis round trip per request.

Durations travel, not timestamps: monotonic clocks of different processes do not
compare. Commands go through the state store's :class:`~asgi_llm.stores.state.RedisClient`
(one pool, a deadline per command, errors as ``StoreError``). asyncio only
(``redis.asyncio``). A Redis outage only stops the sharing: each replica keeps its
local breakers, and the loops retry with backoff. At shutdown the loops end quietly
(what is queued is published first, within a grace period).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import anyio
from anyio.abc import TaskGroup

from asgi_llm._background import Loops
from asgi_llm.routing.health import BreakerState, HealthTracker
from asgi_llm.stores.state.redis import RedisClient

__all__ = ["SharedHealth"]

logger = logging.getLogger("asgi_llm.health")

CHANNEL = "asgi-llm:health"
PREFIX = "asgi-llm:health:"
MAX_MESSAGE_BYTES = 8192
"""A transition is a few hundred bytes; anything larger on the channel is not ours."""
MAX_DURATION_S = 86_400.0


class SharedHealth:
    """A gateway resource that mirrors breaker transitions through Redis.

    Args:
        redis: the state store's client (``RedisStateStore.redis``); its owner opens and
            closes it, so this resource must be started after it and closed before.
        health: this replica's breakers.
        replica_id: who published a transition (its own are ignored on the way back).
        drain_s: at shutdown, how long queued transitions may take to be published.
    """

    def __init__(self, redis: RedisClient, health: HealthTracker, *, replica_id: str | None = None,
                 drain_s: float = 2.0) -> None:
        self.redis = redis
        self.health = health
        self.replica_id = replica_id or os.urandom(6).hex()
        self.drain_s = drain_s
        self._loops = Loops("breaker sharing")
        self._send: Any = None
        self._receive: Any = None

    async def start(self, task_group: TaskGroup) -> None:
        """Load the live shared states, then publish ours and apply the others'."""
        self._send, self._receive = anyio.create_memory_object_stream[dict[str, Any]](max_buffer_size=1000)
        try:
            await self._load()
        except Exception as exc:  # noqa: BLE001 - sharing is best effort; local breakers still work
            logger.warning("could not load shared breaker state: %s", exc)
        self.health.on_change = self._on_change
        self._loops.start(task_group, self._publish_loop, drains=True)
        self._loops.start(task_group, self._subscribe_loop)

    async def aclose(self) -> None:
        """Stop listening, publish what is queued (up to ``drain_s``), end the loops."""
        self.health.on_change = None
        if self._send is not None:
            self._send.close()  # the publish loop ends once it has sent what is queued
        await self._loops.stop(grace_s=self.drain_s)

    # ------------------------------------------------------------------ local → redis

    def _on_change(self, route: str, key_id: str, b: BreakerState) -> None:
        now = self.health.clock()
        message = {
            "from": self.replica_id,
            "route": route,
            "key": key_id,
            "open_for": max(0.0, b.open_until - now) if b.open_until else 0.0,
            "cooldown_for": max(0.0, b.cooldown_until - now),
            "cooldown_kind": b.cooldown_kind,
            "opened_times": b.opened_times,
            "error": b.last_error,
        }
        try:
            self._send.send_nowait(message)
        except anyio.WouldBlock:
            logger.warning("breaker sharing queue full; dropped a transition for %s", route)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # shutting down: the transition stays local

    async def _publish_loop(self) -> None:
        async with self._receive:
            async for message in self._receive:
                ttl_ms = int(max(message["open_for"], message["cooldown_for"], 1.0) * 1000)
                payload = json.dumps(message)
                key = PREFIX + message["route"] + "|" + message["key"]
                for delay in (0.1, 0.5, 2.0):
                    try:
                        await self.redis.set(key, payload, px=ttl_ms)
                        await self.redis.publish(CHANNEL, payload)
                        break
                    except Exception as exc:  # noqa: BLE001 - StoreError; retry, then drop
                        logger.warning("could not share a breaker transition (retrying): %s", exc)
                        await anyio.sleep(delay)

    # ------------------------------------------------------------------ redis → local

    async def _load(self) -> None:
        for key in await self.redis.scan(PREFIX + "*"):
            raw, pttl = await self.redis.get_with_pttl(key)
            if not raw or pttl <= 0:
                continue
            message = _parse(raw)
            if message is None:
                continue
            left = pttl / 1000.0  # what remains of the state, whenever it was stored
            message["open_for"] = min(message["open_for"], left) if message["open_for"] else 0.0
            message["cooldown_for"] = min(message["cooldown_for"], left) if message["cooldown_for"] else 0.0
            self._apply(message)

    async def _subscribe_loop(self) -> None:
        delay = 0.5
        while True:
            try:
                async with self.redis.subscribe(CHANNEL) as subscription:
                    delay = 0.5
                    async for raw in subscription.messages():
                        message = _parse(raw)
                        if message is not None:
                            self._apply(message)
            except Exception as exc:  # noqa: BLE001 - keep trying; local breakers still work meanwhile
                logger.warning("breaker sharing subscription lost (%s); reconnecting in %.1f s", exc, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _apply(self, message: dict[str, Any]) -> None:
        if message.get("from") == self.replica_id:
            return
        self.health.apply_remote(
            message["route"],
            message["key"],
            open_for=message["open_for"],
            cooldown_for=message["cooldown_for"],
            cooldown_kind=message["cooldown_kind"],
            opened_times=message["opened_times"],
            error=message["error"],
        )


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return 0.0
    return min(max(0.0, float(value)), MAX_DURATION_S)


def _parse(raw: Any) -> dict[str, Any] | None:
    """A transition from the channel or a key, checked and bounded; ``None`` if malformed
    (whoever can write to Redis must not be able to crash the loop or poison a breaker)."""
    if not isinstance(raw, bytes | str) or len(raw) > MAX_MESSAGE_BYTES:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("route"), str) or not isinstance(data.get("key"), str):
        logger.warning("breaker sharing: ignored a malformed transition")
        return None
    opened = data.get("opened_times")
    error = data.get("error")
    kind = data.get("cooldown_kind")
    return {
        "from": data.get("from"),
        "route": data["route"][:512],
        "key": data["key"][:256],
        "open_for": _duration(data.get("open_for")),
        "cooldown_for": _duration(data.get("cooldown_for")),
        "cooldown_kind": kind if isinstance(kind, str) and len(kind) <= 32 else "cooling",
        "opened_times": min(opened, 1_000_000) if isinstance(opened, int) and not isinstance(opened, bool) and opened >= 0 else 0,
        "error": error[:500] if isinstance(error, str) else None,
    }
