"""A Redis that accepts connections and never answers: every store call is bounded.

The stores do not set redis-py's ``socket_timeout`` (it costs an ``asyncio.wait_for``
task per command); each call is bounded by the gateway's own ``fail_after`` instead.
These tests pin that a silent server still fails fast, as a ``StoreError``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from asgi_llm.cache.cache_key import CacheKey
from asgi_llm.stores import StoreError
from asgi_llm.stores.cache import RedisCacheStore
from asgi_llm.stores.state import Limit, RedisStateStore

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.parametrize("anyio_backend", ["asyncio"])]  # redis.asyncio only


@pytest.fixture
async def silent_redis() -> AsyncIterator[str]:
    """A TCP server that reads whatever it is sent and never replies."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    server.close()


async def test_rate_limit_admission_fails_fast(silent_redis: str) -> None:
    store = RedisStateStore(silent_redis, timeout_s=0.3)
    t0 = time.perf_counter()
    with pytest.raises(StoreError, match="rate-limit admission"):
        await store.reserve([Limit("requests", "key:k", 10, 1)], reservation_id="r1")
    assert time.perf_counter() - t0 < 3.0
    assert await store.ping() is not None  # readiness says unreachable, in time too
    await store.aclose()


async def test_cache_calls_fail_fast(silent_redis: str) -> None:
    store = RedisCacheStore(silent_redis, timeout_s=0.3)
    key = CacheKey(org="o", model="m", digest="d")
    t0 = time.perf_counter()
    with pytest.raises(StoreError):
        await store.get(key)
    with pytest.raises(StoreError):
        await store.set(key, b"v", ttl_s=10)
    with pytest.raises(StoreError):
        await store.purge(org="o")
    assert time.perf_counter() - t0 < 6.0
    await store.aclose()
