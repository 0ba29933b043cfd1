"""Breaker state shared across gateway replicas through Redis.

Reads stay local and free: each replica keeps its own :class:`HealthTracker`. What is
shared is every *transition* — a breaker opening or closing, a key cooling down — which
is published on a Redis channel and stored under a key that expires when the state
does; every replica applies the others' transitions, and a replica that starts later
loads the live ones. So when one replica learns that a target is down, the others stop
sending it traffic too, without a Redis round trip per request.

Durations travel, not timestamps: monotonic clocks of different processes do not
compare. asyncio only (``redis.asyncio``). A Redis outage only stops the sharing: each
replica keeps its local breakers, and the loops retry with backoff.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import anyio
from anyio.abc import TaskGroup

from asgi_llm._redact import redact_url
from asgi_llm.routing.health import BreakerState, HealthTracker

__all__ = ["SharedHealth"]

logger = logging.getLogger("asgi_llm.health")

CHANNEL = "asgi-llm:health"
PREFIX = "asgi-llm:health:"


class SharedHealth:
    """A gateway resource that mirrors breaker transitions through Redis."""

    def __init__(self, url: str, health: HealthTracker, *, replica_id: str | None = None) -> None:
        self.url = url
        self.health = health
        self.replica_id = replica_id or os.urandom(6).hex()
        self._redis: Any = None
        self._send: Any = None
        self._receive: Any = None

    async def start(self, task_group: TaskGroup) -> None:
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(self.url)
        self._send, self._receive = anyio.create_memory_object_stream[dict[str, Any]](max_buffer_size=1000)
        try:
            await self._load()
        except Exception:  # noqa: BLE001 - sharing is best effort; local breakers still work
            logger.warning("could not load shared breaker state from %s", redact_url(self.url), exc_info=True)
        self.health.on_change = self._on_change
        task_group.start_soon(self._publish_loop)
        task_group.start_soon(self._subscribe_loop)

    async def aclose(self) -> None:
        self.health.on_change = None
        if self._send is not None:
            self._send.close()
            self._receive.close()
        if self._redis is not None:
            await self._redis.aclose()

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

    async def _publish_loop(self) -> None:
        async for message in self._receive:
            ttl_ms = int(max(message["open_for"], message["cooldown_for"], 1.0) * 1000)
            payload = json.dumps(message)
            for delay in (0.1, 0.5, 2.0):
                try:
                    key = PREFIX + message["route"] + "|" + message["key"]
                    await self._redis.set(key, payload, px=ttl_ms)
                    await self._redis.publish(CHANNEL, payload)
                    break
                except Exception:  # noqa: BLE001
                    logger.warning("could not share a breaker transition; retrying", exc_info=True)
                    await anyio.sleep(delay)

    # ------------------------------------------------------------------ redis → local

    async def _load(self) -> None:
        async for key in self._redis.scan_iter(match=PREFIX + "*", count=500):
            raw, pttl = await self._redis.get(key), await self._redis.pttl(key)
            if not raw or pttl is None or pttl <= 0:
                continue
            message = json.loads(raw)
            left = pttl / 1000.0  # what remains of the state, whenever it was stored
            message["open_for"] = min(float(message["open_for"]), left) if message["open_for"] else 0.0
            message["cooldown_for"] = min(float(message["cooldown_for"]), left) if message["cooldown_for"] else 0.0
            self._apply(message)

    async def _subscribe_loop(self) -> None:
        delay = 0.5
        while True:
            try:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(CHANNEL)
                delay = 0.5
                try:
                    async for item in pubsub.listen():
                        if item.get("type") == "message":
                            self._apply(json.loads(item["data"]))
                finally:
                    await pubsub.aclose()
            except Exception:  # noqa: BLE001 - keep trying; local breakers still work meanwhile
                logger.warning("breaker sharing subscription lost; reconnecting in %.1f s", delay, exc_info=True)
                await anyio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _apply(self, message: dict[str, Any]) -> None:
        if message.get("from") == self.replica_id:
            return
        self.health.apply_remote(
            message["route"],
            message["key"],
            open_for=float(message["open_for"]),
            cooldown_for=float(message["cooldown_for"]),
            cooldown_kind=message.get("cooldown_kind", "cooling"),
            opened_times=int(message.get("opened_times", 0)),
            error=message.get("error"),
        )
