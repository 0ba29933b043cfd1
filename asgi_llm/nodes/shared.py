"""Node liveness shared across gateway replicas through Redis.

A node heartbeats to whichever replica the load balancer picks. Each replica publishes
the heartbeats it receives under ``asgi-llm:node-live:<node id>`` with a TTL of the
heartbeat window, and every ``poll_s`` reads the others', so a direct-mode node is
routable from every replica, not only from the one that heard it last. Tunnel nodes
stay with the replica that holds their WebSocket (only it can reach them). Records
(cordon, revoke, price …) are shared through SQL as before; a node seen in Redis but
not yet in this replica's records triggers a reload. asyncio only (``redis.asyncio``);
a Redis outage only stops the sharing — each replica keeps what it hears itself.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
from anyio.abc import TaskGroup

from asgi_llm.nodes.inputs import parse_load
from asgi_llm.nodes.registry import LiveNode, NodeRegistry

__all__ = ["SharedNodeLiveness"]

logger = logging.getLogger("asgi_llm.nodes")

PREFIX = "asgi-llm:node-live:"


class SharedNodeLiveness:
    """A gateway resource mirroring node heartbeats through Redis."""

    def __init__(self, url: str, registry: NodeRegistry, *, poll_s: float | None = None) -> None:
        self.url = url
        self.registry = registry
        self.poll_s = poll_s if poll_s is not None else max(0.2, min(registry.interval_s, registry.window_s / 3))
        self._redis: Any = None
        self._send: Any = None
        self._receive: Any = None

    async def start(self, task_group: TaskGroup) -> None:
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(self.url)
        self._send, self._receive = anyio.create_memory_object_stream[tuple[str, str]](max_buffer_size=1000)
        self.registry.on_heartbeat = self._on_heartbeat
        task_group.start_soon(self._publish_loop)
        task_group.start_soon(self._poll_loop)

    async def aclose(self) -> None:
        self.registry.on_heartbeat = None
        if self._send is not None:
            self._send.close()
            self._receive.close()
        if self._redis is not None:
            await self._redis.aclose()

    def _on_heartbeat(self, record: Any, live: LiveNode) -> None:
        payload = json.dumps({"load": live.load, "agent_state": live.agent_state})
        try:
            self._send.send_nowait((record.id, payload))
        except anyio.WouldBlock:
            logger.warning("node liveness queue full; dropped a heartbeat of %s", record.name)

    async def _publish_loop(self) -> None:
        ttl_ms = int(self.registry.window_s * 1000)
        async for node_id, payload in self._receive:
            try:
                await self._redis.set(PREFIX + node_id, payload, px=ttl_ms)
            except Exception:  # noqa: BLE001 - sharing is best effort; local liveness still works
                logger.warning("could not share a node heartbeat", exc_info=True)

    async def _poll_loop(self) -> None:
        window_ms = self.registry.window_s * 1000
        while True:
            await anyio.sleep(self.poll_s)
            try:
                keys = [k async for k in self._redis.scan_iter(match=PREFIX + "*", count=500)]
                unknown = False
                for key in keys:
                    raw, pttl = await self._redis.get(key), await self._redis.pttl(key)
                    if not raw or pttl is None or pttl <= 0:
                        continue
                    data = json.loads(raw)
                    node_id = (key.decode() if isinstance(key, bytes) else key)[len(PREFIX):]
                    age_s = max(0.0, (window_ms - pttl) / 1000.0)
                    known = self.registry.observe_remote(node_id, age_s=age_s, load=parse_load(data.get("load")),
                                                         agent_state=data.get("agent_state", "ready"))
                    unknown = unknown or not known
                if unknown:
                    await self.registry.reload()  # enrolled on another replica since our last reload
            except Exception:  # noqa: BLE001 - keep polling; local liveness works meanwhile
                logger.warning("node liveness poll failed", exc_info=True)
