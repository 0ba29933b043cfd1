"""The state store's one Redis client, shared by breaker and node-liveness sharing, and
background loops that end quietly at shutdown (in process; real Redis on 127.0.0.1).

The shutdown bug (issue 17): a sharing resource closed its publish queue under its own
loop, the loop raised ``ClosedResourceError`` into the gateway's task group, and the
rest of the shutdown — the ledger writer's flush — was cancelled. Here each resource is
closed inside a live task group, which must not be cancelled by it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from asgi_llm._background import Loops
from asgi_llm.routing.health import BreakerPolicy, HealthTracker
from asgi_llm.routing.shared_health import CHANNEL, PREFIX, SharedHealth
from asgi_llm.stores import StoreError
from asgi_llm.stores.state import RedisStateStore
from asgi_llm.testing.processes import free_port
from tests.services import REDIS_HOST, REDIS_PORT, require_service

pytestmark = pytest.mark.anyio


class TestLoops:
    """Runs under asyncio and trio (the suite's anyio_backend)."""

    @pytest.mark.memory
    async def test_drain_finish_cancel_and_contain(self, caplog: pytest.LogCaptureFixture) -> None:
        """stop(): a draining loop finishes its queue, a forever loop is cancelled, a
        failing loop is logged — and the task group around them is never cancelled."""
        send, receive = anyio.create_memory_object_stream[int](10)
        drained: list[int] = []

        async def drain() -> None:
            async with receive:
                async for item in receive:
                    await anyio.sleep(0.01)
                    drained.append(item)

        async def forever() -> None:
            await anyio.sleep_forever()

        async def broken() -> None:
            raise anyio.ClosedResourceError

        loops = Loops("test loops")
        async with anyio.create_task_group() as tg:
            loops.start(tg, drain, drains=True)
            loops.start(tg, forever)
            loops.start(tg, broken)
            for i in range(5):
                send.send_nowait(i)
            send.close()
            with anyio.fail_after(5):
                await loops.stop(grace_s=3)
            assert not tg.cancel_scope.cancel_called
            await anyio.sleep(0)  # the group is still alive: this does not raise Cancelled
        assert drained == [0, 1, 2, 3, 4]
        assert any("test loops: background loop stopped" in r.getMessage() for r in caplog.records)

    @pytest.mark.memory
    async def test_grace_is_bounded(self) -> None:
        """A draining loop that never ends is cancelled after grace_s."""
        loops = Loops("stuck")
        async with anyio.create_task_group() as tg:
            loops.start(tg, anyio.sleep_forever, drains=True)
            with anyio.fail_after(3):
                await loops.stop(grace_s=0.2)


@pytest.fixture
async def store() -> AsyncIterator[RedisStateStore]:
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    s = RedisStateStore(f"redis://{REDIS_HOST}:{REDIS_PORT}/12", timeout_s=1.0, max_connections=8)
    try:
        yield s
    finally:
        await s.aclose()


def _health() -> HealthTracker:
    return HealthTracker(BreakerPolicy(failure_threshold=1, cooldown_s=30, max_cooldown_s=60))


@pytest.mark.redis
class TestSharedHealthThroughTheStoreClient:
    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_transitions_cross_replicas_and_close_quietly(self, store: RedisStateStore) -> None:
        """Two replicas on one store client each: A's breaker opening reaches B; closing
        both inside a live task group publishes what was queued and cancels nothing."""
        route = f"prov-{uuid.uuid4().hex[:8]}/m"
        a_health, b_health = _health(), _health()
        a, b = SharedHealth(store.redis, a_health), SharedHealth(store.redis, b_health)
        assert a.redis is store.redis  # one pool per URL, not one per user
        async with anyio.create_task_group() as tg:
            await store.start(tg)
            await a.start(tg)
            await b.start(tg)
            await anyio.sleep(0.2)  # B's subscription is in place
            a_health.failure(route, "k0", error="boom")
            with anyio.fail_after(5):
                while b_health.route_state(route, ["k0"]) != "open":
                    await anyio.sleep(0.02)
            a_health.failure(route + "-queued", "k0", error="queued at shutdown")  # still queued when A closes
            with anyio.fail_after(5):
                await b.aclose()
                await a.aclose()
            assert not tg.cancel_scope.cancel_called
            assert await store.redis.get(PREFIX + route + "-queued|k0") is not None  # drained, not dropped
            tg.cancel_scope.cancel()

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_malformed_messages_are_ignored(self, store: RedisStateStore) -> None:
        """Garbage, oversized and ill-typed messages on the channel change no breaker and
        do not end the subscription: a valid transition after them still applies."""
        route = f"prov-{uuid.uuid4().hex[:8]}/m"
        health = _health()
        shared = SharedHealth(store.redis, health)
        async with anyio.create_task_group() as tg:
            await shared.start(tg)
            await anyio.sleep(0.2)
            for bad in (b"{not json", b"[]", b"x" * 100_000,
                        json.dumps({"from": "other", "route": 5, "key": "k0"}).encode(),
                        json.dumps({"from": "other", "route": route, "key": "k0", "open_for": "NaN",
                                    "cooldown_for": 1e308, "opened_times": -3, "error": ["x"]}).encode()):
                await store.redis.publish(CHANNEL, bad)
            await store.redis.publish(CHANNEL, json.dumps({"from": "other", "route": route + "-ok", "key": "k0",
                                                           "open_for": 30, "cooldown_for": 0}))
            with anyio.fail_after(5):
                while health.route_state(route + "-ok", ["k0"]) != "open":
                    await anyio.sleep(0.02)
            b = health.breaker(route, "k0")
            assert b.open_until == 0.0 and b.opened_times == 0  # the NaN one opened nothing
            assert b.cooldown_until <= health.clock() + 86_400.0  # 1e308 s was bounded
            await shared.aclose()
            assert not tg.cancel_scope.cancel_called
            tg.cancel_scope.cancel()

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_unreachable_redis_starts_and_closes_promptly(self) -> None:
        """Nothing listening: start and aclose are bounded by the client's timeouts; the
        client's errors are StoreError."""
        dead = RedisStateStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.3)
        health = _health()
        shared = SharedHealth(dead.redis, health, drain_s=0.5)
        with pytest.raises(StoreError):
            await dead.redis.get("x")
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(3):
                await dead.start(tg)
                await shared.start(tg)
            health.failure("p/m", "k0", error="down")  # queued; publishing fails and retries
            with anyio.fail_after(5):
                await shared.aclose()
                await dead.aclose()
            assert not tg.cancel_scope.cancel_called
            tg.cancel_scope.cancel()


@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_gateway_builds_one_redis_client(tmp_path: Path) -> None:
    """A recipe with Redis state, quotas and nodes: the state store, breaker sharing and
    node-liveness sharing hold the same RedisClient; the store opens first and closes last."""
    from asgi_llm.config import config_from_dict
    from asgi_llm.nodes.shared import SharedNodeLiveness
    from asgi_llm.stack import build_gateway

    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/12"
    config = config_from_dict({
        "providers": {"p": {"base_url": "http://127.0.0.1:9/v1"}},
        "models": {"chat": {"targets": [{"provider": "p", "model": "m"}]}},
        "auth": {"admin_keys": ["adm-0123456789abcdef"], "pepper": "pepper-0123456789abcdef",
                 "keys": [{"key": "sk-team-a-0123456789", "org": "team-a"}]},
        "stores": {"state": url, "ledger": f"sqlite:///{tmp_path / 'l.db'}"},
        "limits": {"org": {"rpm": 100}},
        "nodes": {"allowed_networks": ["127.0.0.1/32"]},
    })
    gateway = build_gateway(config)
    state = gateway.services.state
    users = [r for r in gateway.resources if isinstance(r, SharedHealth | SharedNodeLiveness)]
    assert len(users) == 2 and all(u.redis is state.redis for u in users)
    assert sum(isinstance(r, RedisStateStore) for r in gateway.resources) == 1
    order = gateway.resources.index
    assert all(order(state) < order(u) for u in users)  # opened before its users, closed after them
