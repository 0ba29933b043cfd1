"""Node liveness shared across gateway replicas through Redis.

A node heartbeats to whichever replica the load balancer picks. Each replica publishes
the heartbeats it receives under ``asgi-llm:node-live:<node id>`` with a TTL of the
heartbeat window, and every ``poll_s`` reads the others', so a direct-mode node is
routable from every replica, not only from the one that heard it last. Tunnel nodes
stay with the replica that holds their WebSocket (only it can reach them). Records
(cordon, revoke, price …) are shared through SQL as before; a node seen in Redis but
not yet in this replica's records triggers a reload. Commands go through the state
store's :class:`~asgi_llm.stores.state.RedisClient` (one pool, a deadline per command,
errors as ``StoreError``). asyncio only (``redis.asyncio``); a Redis outage only stops
the sharing — each replica keeps what it hears itself. At shutdown the loops end
quietly: queued heartbeats are published within a grace period, the poll is cancelled.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anyio
from anyio.abc import TaskGroup

from asgi_llm._background import Loops
from asgi_llm.nodes.inputs import parse_load
from asgi_llm.nodes.registry import LiveNode, NodeRegistry
from asgi_llm.stores.state.redis import RedisClient

__all__ = ["SharedNodeLiveness"]

logger = logging.getLogger("asgi_llm.nodes")

PREFIX = "asgi-llm:node-live:"
MAX_RECORD_BYTES = 4096
"""A shared heartbeat is ~200 bytes; a larger value under our prefix is not ours."""
MAX_NODE_ID_CHARS = 128


class SharedNodeLiveness:
    """A gateway resource mirroring node heartbeats through Redis.

    Args:
        redis: the state store's client (``RedisStateStore.redis``); its owner opens and
            closes it, so this resource must be started after it and closed before.
        registry: this replica's node registry.
        poll_s: how often the others' heartbeats are read.
        drain_s: at shutdown, how long queued heartbeats may take to be published.
    """

    def __init__(self, redis: RedisClient, registry: NodeRegistry, *, poll_s: float | None = None,
                 drain_s: float = 2.0) -> None:
        self.redis = redis
        self.registry = registry
        self.poll_s = poll_s if poll_s is not None else max(0.2, min(registry.interval_s, registry.window_s / 3))
        self.drain_s = drain_s
        self._loops = Loops("node liveness sharing")
        self._send: Any = None
        self._receive: Any = None

    async def start(self, task_group: TaskGroup) -> None:
        """Publish the heartbeats this replica hears and poll the others'."""
        self._send, self._receive = anyio.create_memory_object_stream[tuple[str, str]](max_buffer_size=1000)
        self.registry.on_heartbeat = self._on_heartbeat
        self._loops.start(task_group, self._publish_loop, drains=True)
        self._loops.start(task_group, self._poll_loop)

    async def aclose(self) -> None:
        """Stop listening, publish what is queued (up to ``drain_s``), end the loops."""
        self.registry.on_heartbeat = None
        if self._send is not None:
            self._send.close()  # the publish loop ends once it has sent what is queued
        await self._loops.stop(grace_s=self.drain_s)

    def _on_heartbeat(self, record: Any, live: LiveNode) -> None:
        payload = json.dumps({"load": live.load, "agent_state": live.agent_state})
        try:
            self._send.send_nowait((record.id, payload))
        except anyio.WouldBlock:
            logger.warning("node liveness queue full; dropped a heartbeat of %s", record.name)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # shutting down: the heartbeat stays local

    async def _publish_loop(self) -> None:
        ttl_ms = max(1, int(self.registry.window_s * 1000))
        async with self._receive:
            async for node_id, payload in self._receive:
                try:
                    await self.redis.set(PREFIX + node_id, payload, px=ttl_ms)
                except Exception as exc:  # noqa: BLE001 - StoreError; sharing is best effort, local liveness still works
                    logger.warning("could not share a node heartbeat: %s", exc)

    async def _poll_loop(self) -> None:
        while True:
            await anyio.sleep(self.poll_s)
            try:
                await self.poll_once()
            except Exception as exc:  # noqa: BLE001 - keep polling; local liveness works meanwhile
                logger.warning("node liveness poll failed: %s", exc)

    async def poll_once(self) -> None:
        """Adopt every live shared heartbeat; reload records if one names a node not known here."""
        window_ms = self.registry.window_s * 1000
        unknown = False
        for key in await self.redis.scan(PREFIX + "*", limit=100_000):
            raw, pttl = await self.redis.get_with_pttl(key)
            node_id = (key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key))[len(PREFIX):]
            if not raw or pttl <= 0 or not node_id or len(node_id) > MAX_NODE_ID_CHARS or len(raw) > MAX_RECORD_BYTES:
                continue
            try:
                data = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(data, dict):
                continue
            age_s = max(0.0, (window_ms - pttl) / 1000.0)
            state = "draining" if data.get("agent_state") == "draining" else "ready"
            known = self.registry.observe_remote(node_id, age_s=age_s, load=parse_load(data.get("load")), agent_state=state)
            unknown = unknown or not known
        if unknown:
            await self.registry.reload()  # enrolled on another replica since our last reload
