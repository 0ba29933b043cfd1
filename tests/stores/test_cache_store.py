"""Contract suite for cache stores: memory (asyncio + trio) and real Redis (asyncio only)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from asgi_llm.cache.cache_key import CacheKey
from asgi_llm.stores import StoreError
from asgi_llm.stores.cache import (
    CacheStore,
    FlightLockSupport,
    MemoryCacheStore,
    RedisCacheStore,
    cache_store_from_url,
)
from asgi_llm.testing.processes import free_port
from tests.services import redis_url

pytestmark = pytest.mark.anyio

REDIS_DB = 13  # others use 15 (state) and 14 (replicas)


class FakeTimer:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(backend: tuple[str, str]) -> AsyncIterator[CacheStore]:
    if backend[0] == "memory":
        yield MemoryCacheStore(max_entries=100, max_bytes=1 << 20)
        return
    s = RedisCacheStore(redis_url(REDIS_DB))
    async with anyio.create_task_group() as tg:
        await s.start(tg)
    try:
        yield s
    finally:
        await s.aclose()


def k(org: str = "acme", model: str = "chat", digest: str = "d1") -> CacheKey:
    return CacheKey(org, model, digest)


class TestContract:
    """Every backend; the Redis store is asyncio-only, so it runs under asyncio alone."""

    @pytest.fixture(params=[
        pytest.param(("memory", "asyncio"), marks=pytest.mark.memory),
        pytest.param(("memory", "trio"), marks=pytest.mark.memory),
        pytest.param(("redis", "asyncio"), marks=pytest.mark.redis),
    ], ids="-".join)
    def backend(self, request: pytest.FixtureRequest) -> tuple[str, str]:
        return request.param  # type: ignore[no-any-return]

    @pytest.fixture
    def anyio_backend(self, backend: tuple[str, str]) -> str:
        return backend[1]

    async def test_get_set_overwrite(self, store: CacheStore) -> None:
        """A stored value comes back; a second set replaces it; unknown keys are None."""
        assert await store.get(k()) is None
        await store.set(k(), b"one", ttl_s=60)
        assert await store.get(k()) == b"one"
        await store.set(k(), b"two", ttl_s=60)
        assert await store.get(k()) == b"two"
        assert await store.get(k(digest="other")) is None

    async def test_tenants_are_separate(self, store: CacheStore) -> None:
        """Same digest under two orgs are two entries."""
        await store.set(k(org="a"), b"A", ttl_s=60)
        assert await store.get(k(org="b")) is None
        assert await store.get(k(org="a")) == b"A"

    async def test_ttl_zero_is_not_stored(self, store: CacheStore) -> None:
        """A non-positive TTL stores nothing."""
        await store.set(k(), b"x", ttl_s=0)
        assert await store.get(k()) is None

    async def test_purge_by_org_model_both_all(self, store: CacheStore) -> None:
        """Purges delete exactly the entries of the org and/or model asked for."""
        keys = [k(o, m, f"{o}{m}") for o in ("a", "b:*x") for m in ("chat", "embed?")]
        for key in keys:
            await store.set(key, b"v", ttl_s=60)
        assert await store.purge(org="b:*x", model="embed?") == 1
        assert await store.get(k("b:*x", "chat", "b:*xchat")) == b"v"
        assert await store.purge(model="chat") == 2
        assert await store.get(k("a", "embed?", "aembed?")) == b"v"
        assert await store.purge(org="a") == 1
        assert await store.purge(org="nobody") == 0
        await store.set(k(), b"v", ttl_s=60)
        assert await store.purge() == 1
        assert await store.get(k()) is None

    async def test_expiry(self, store: CacheStore) -> None:
        """An entry is gone after its TTL (real time here; the memory store's fake clock below)."""
        await store.set(k(), b"short", ttl_s=0.05)
        await store.set(k(digest="long"), b"long", ttl_s=60)
        await anyio.sleep(0.15)
        assert await store.get(k()) is None
        assert await store.get(k(digest="long")) == b"long"


class TestMemory:
    async def test_fake_timer_per_entry_ttl(self, anyio_backend: str) -> None:
        """Each entry expires at its own TTL, by the injected clock."""
        timer = FakeTimer()
        s = MemoryCacheStore(timer=timer)
        await s.set(k(digest="a"), b"a", ttl_s=10)
        await s.set(k(digest="b"), b"b", ttl_s=100)
        timer.now += 11
        assert await s.get(k(digest="a")) is None
        assert await s.get(k(digest="b")) == b"b"
        timer.now += 100
        assert len(s) == 0

    async def test_entry_bound_evicts_lru(self, anyio_backend: str) -> None:
        """At max_entries the least recently used entry goes first."""
        s = MemoryCacheStore(max_entries=2)
        await s.set(k(digest="a"), b"a", ttl_s=60)
        await s.set(k(digest="b"), b"b", ttl_s=60)
        await s.get(k(digest="a"))  # a is now the most recently used
        await s.set(k(digest="c"), b"c", ttl_s=60)
        assert await s.get(k(digest="b")) is None
        assert await s.get(k(digest="a")) == b"a" and await s.get(k(digest="c")) == b"c"

    async def test_byte_bound(self, anyio_backend: str) -> None:
        """Total size stays under max_bytes; a value larger than the bound is not stored."""
        s = MemoryCacheStore(max_bytes=4096)
        for i in range(10):
            await s.set(k(digest=str(i)), b"x" * 1000, ttl_s=60)
            assert s.size_bytes <= 4096
        assert 1 <= len(s) <= 4
        assert await s.get(k(digest="9")) == b"x" * 1000
        await s.set(k(digest="huge"), b"x" * 5000, ttl_s=60)
        assert await s.get(k(digest="huge")) is None

    async def test_from_url(self, anyio_backend: str) -> None:
        """URLs pick the backend; others are refused."""
        assert isinstance(cache_store_from_url("memory://", max_entries=3), MemoryCacheStore)
        assert isinstance(cache_store_from_url("redis://127.0.0.1:6379/13"), RedisCacheStore)
        with pytest.raises(ValueError):
            cache_store_from_url("sqlite:///x.db")


class TestRedis:
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    async def test_flight_lock(self) -> None:
        """One owner at a time; release needs the owner's token; the lock expires."""
        s = RedisCacheStore(redis_url(REDIS_DB))
        try:
            assert isinstance(s, FlightLockSupport)
            token = await s.acquire_flight(k(), ttl_s=5)
            assert token and await s.acquire_flight(k(), ttl_s=5) is None
            assert await s.flight_held(k())
            await s.release_flight(k(), "not-the-owner")
            assert await s.flight_held(k())
            await s.release_flight(k(), token)
            assert not await s.flight_held(k())
            assert await s.acquire_flight(k(), ttl_s=0.05)
            await anyio.sleep(0.15)
            assert not await s.flight_held(k())
            await s.set(k(), b"v", ttl_s=60)
            assert await s.purge() == 1  # locks are not entries
        finally:
            await s.aclose()

    async def test_outage_is_store_error(self) -> None:
        """An unreachable Redis raises StoreError (which the layer turns into a bypass)."""
        s = RedisCacheStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
        try:
            for op in (lambda: s.get(k()), lambda: s.set(k(), b"v", ttl_s=1), lambda: s.purge(org="a")):
                with pytest.raises(StoreError):
                    await op()
        finally:
            await s.aclose()
