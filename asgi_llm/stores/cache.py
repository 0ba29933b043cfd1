"""Response-cache stores: one Protocol, a memory and a Redis implementation.

* :class:`MemoryCacheStore` (``memory://``) -- an LRU bounded both by total bytes and by
  entry count, a TTL per entry, an injectable timer. One process;
  runs under asyncio and trio.
* :class:`RedisCacheStore` (``redis://``, ``rediss://``) -- shared by every replica.
  **asyncio only** (``redis.asyncio``). Entries are ``SET <prefix><org>:<model>:<digest>
  <value> PX <ttl>``; org and model are percent-encoded, so they never contain ``:`` or
  glob characters and a purge is a ``SCAN MATCH <prefix><org|*>:<model|*>:*`` plus
  ``UNLINK`` in batches -- no index to keep consistent, nothing left behind when entries
  expire. It also offers :class:`FlightLockSupport` (``SET NX PX`` with an owner token)
  so identical misses on different replicas make one upstream call.

Store failures leave as :class:`~asgi_llm.stores.StoreError`; the cache layer treats
them as a bypass, never as a failed request.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import quote

from asgi_llm._timeout import fail_after
from asgi_llm.cache.cache_key import CacheKey
from asgi_llm.stores import StoreError

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = [
    "CacheStore",
    "FlightLockSupport",
    "MemoryCacheStore",
    "RedisCacheStore",
    "cache_store_from_url",
]

# Rough per-entry bookkeeping cost counted against the byte bound besides the value.
_ENTRY_OVERHEAD = 128


class CacheStore(Protocol):
    """Where cached answers live. Values are opaque bytes; keys carry org and model."""

    async def get(self, key: CacheKey) -> bytes | None:
        """The value stored under ``key``, or ``None`` (never stored, expired, purged).

        Example:
            >>> await store.get(key)
            b'{"v":1,...}'
        """
        ...

    async def set(self, key: CacheKey, value: bytes, *, ttl_s: float) -> None:
        """Store ``value`` for ``ttl_s`` seconds, replacing any previous value. A store
        may drop a value that does not fit its bounds.

        Example:
            >>> await store.set(key, b"...", ttl_s=300)
        """
        ...

    async def purge(self, *, org: str | None = None, model: str | None = None) -> int:
        """Delete every entry of ``org`` and/or public ``model`` (``None`` = any);
        return how many were deleted.

        Example:
            >>> await store.purge(org="acme", model="chat")
            12
        """
        ...

    async def start(self, task_group: TaskGroup) -> None:
        """Open connections (the gateway calls it at startup)."""
        ...

    async def aclose(self) -> None:
        """Close connections."""
        ...


@runtime_checkable
class FlightLockSupport(Protocol):
    """Optional: a short lock per key shared by replicas (single flight across processes)."""

    async def acquire_flight(self, key: CacheKey, *, ttl_s: float) -> str | None:
        """Take the lock for ``key`` for at most ``ttl_s``; return an owner token, or
        ``None`` when someone else holds it.

        Example:
            >>> token = await store.acquire_flight(key, ttl_s=30)
        """
        ...

    async def release_flight(self, key: CacheKey, token: str) -> None:
        """Release the lock if ``token`` still owns it."""
        ...

    async def flight_held(self, key: CacheKey) -> bool:
        """Is someone holding the lock for ``key``?"""
        ...


class MemoryCacheStore:
    """In-process cache bounded by bytes and by entries, with a TTL per entry.

    Least recently used entries are evicted first when a bound is reached; expired ones
    are dropped when read, when evicted, and by a sweep before counting or purging.

    Entries are kept as tuples of plain values (``bytes``, ``float``, ``int``, ``str``) in
    one ``OrderedDict``, so the garbage collector untracks them: a full cache is one
    container to it, not the several tracked objects per entry of cachetools'
    ``TLRUCache`` (tens of thousands for a full cache) walked on every full collection.

    Args:
        max_entries: at most this many entries (least recently used evicted first).
        max_bytes: at most this many bytes of values (plus a small per-entry overhead).
        timer: the clock entries expire by (inject one to test without sleeping).

    Example:
        >>> store = MemoryCacheStore(max_entries=1000, max_bytes=64 << 20)
    """

    def __init__(self, *, max_entries: int = 10_000, max_bytes: int = 256 << 20,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._timer = timer
        # (org, model, digest) → (value, expires_at, size); least recently used first.
        self._entries: OrderedDict[tuple[str, str, str], tuple[bytes, float, int]] = OrderedDict()
        self._bytes = 0

    async def get(self, key: CacheKey) -> bytes | None:
        ident = (key.org, key.model, key.digest)
        item = self._entries.get(ident)
        if item is None:
            return None
        if item[1] <= self._timer():
            self._drop(ident)
            return None
        self._entries.move_to_end(ident)
        return item[0]

    async def set(self, key: CacheKey, value: bytes, *, ttl_s: float) -> None:
        size = len(value) + len(key.storage_id) + _ENTRY_OVERHEAD
        if size > self.max_bytes or ttl_s <= 0:
            return
        ident = (key.org, key.model, key.digest)
        self._drop(ident)
        entries = self._entries
        while entries and (len(entries) >= self.max_entries or self._bytes + size > self.max_bytes):
            _ident, (_v, _exp, old) = entries.popitem(last=False)  # least recently used
            self._bytes -= old
        entries[ident] = (value, self._timer() + ttl_s, size)
        self._bytes += size

    async def purge(self, *, org: str | None = None, model: str | None = None) -> int:
        self._sweep()
        doomed = [i for i in self._entries if (org is None or i[0] == org) and (model is None or i[1] == model)]
        for ident in doomed:
            self._drop(ident)
        return len(doomed)

    def _drop(self, ident: tuple[str, str, str]) -> None:
        item = self._entries.pop(ident, None)
        if item is not None:
            self._bytes -= item[2]

    def _sweep(self) -> None:
        now = self._timer()
        for ident in [i for i, item in self._entries.items() if item[1] <= now]:
            self._drop(ident)

    def __len__(self) -> int:
        self._sweep()
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Bytes currently counted against ``max_bytes``."""
        self._sweep()
        return self._bytes

    async def start(self, task_group: TaskGroup) -> None:
        return None

    async def aclose(self) -> None:
        return None


@contextlib.contextmanager
def _map_redis_errors(what: str) -> Iterator[None]:
    from redis.exceptions import RedisError

    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreError(f"Redis cache store failed during {what}: {type(exc).__name__}: {exc}"[:300]) from exc


_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class RedisCacheStore:
    """The shared cache on Redis (asyncio only).

    Args:
        url: ``redis://host:port/db`` or ``rediss://…``.
        prefix: key prefix of entries (``asgi-llm:cache:``); locks use ``<prefix minus ':'>-flight:``.
        max_connections: connection pool size (a blocking pool: callers wait for a connection).
        timeout_s: connect, per-command and pool-wait timeout -- an unreachable Redis
            costs a request at most about this long before it is served without the cache.
            Commands are bounded by the gateway's own cheap timeout rather than redis-py's
            ``socket_timeout``, which starts an ``asyncio.wait_for`` task per command.
    """

    def __init__(self, url: str, *, prefix: str = "asgi-llm:cache:", max_connections: int = 64,
                 timeout_s: float = 1.0) -> None:
        self.url = url
        self.prefix = prefix
        self.flight_prefix = prefix.rstrip(":") + "-flight:"
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self._client: Any = None
        self._pool: Any = None

    def _redis(self) -> Any:
        if self._client is None:
            import redis.asyncio as aioredis

            self._pool = aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=self.max_connections, timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
            )
            self._client = aioredis.Redis(connection_pool=self._pool)
        return self._client

    async def start(self, task_group: TaskGroup) -> None:
        self._redis()  # connect lazily: a Redis outage at startup must not stop the gateway

    async def aclose(self) -> None:
        client, pool, self._client, self._pool = self._client, self._pool, None, None
        if client is not None:
            await client.aclose()
            await pool.aclose()

    async def get(self, key: CacheKey) -> bytes | None:
        with _map_redis_errors("get"):
            async with fail_after(self.timeout_s):
                value = await self._redis().get(self.prefix + key.storage_id)
        return None if value is None else bytes(value)

    async def set(self, key: CacheKey, value: bytes, *, ttl_s: float) -> None:
        if ttl_s <= 0:
            return
        with _map_redis_errors("set"):
            async with fail_after(self.timeout_s):
                await self._redis().set(self.prefix + key.storage_id, value, px=max(1, int(ttl_s * 1000)))

    async def purge(self, *, org: str | None = None, model: str | None = None) -> int:
        org_part = quote(org, safe="") if org is not None else "*"
        model_part = quote(model, safe="") if model is not None else "*"
        pattern = f"{self.prefix}{org_part}:{model_part}:*"
        deleted = 0
        with _map_redis_errors("purge"):
            r = self._redis()
            cursor: int | bytes = 0
            while True:  # each SCAN step and each UNLINK is bounded, not the whole purge
                async with fail_after(self.timeout_s):
                    cursor, names = await r.scan(cursor, match=pattern, count=1000)
                for i in range(0, len(names), 500):
                    async with fail_after(self.timeout_s):
                        deleted += int(await r.unlink(*names[i:i + 500]))
                if int(cursor) == 0:
                    break
        return deleted

    async def acquire_flight(self, key: CacheKey, *, ttl_s: float) -> str | None:
        token = os.urandom(8).hex()
        with _map_redis_errors("lock"):
            async with fail_after(self.timeout_s):
                ok = await self._redis().set(self.flight_prefix + key.storage_id, token, nx=True,
                                             px=max(1, int(ttl_s * 1000)))
        return token if ok else None

    async def release_flight(self, key: CacheKey, token: str) -> None:
        with _map_redis_errors("unlock"):
            async with fail_after(self.timeout_s):
                await self._redis().eval(_RELEASE, 1, self.flight_prefix + key.storage_id, token)

    async def flight_held(self, key: CacheKey) -> bool:
        with _map_redis_errors("lock check"):
            async with fail_after(self.timeout_s):
                return bool(await self._redis().exists(self.flight_prefix + key.storage_id))


def cache_store_from_url(url: str, *, max_entries: int = 10_000, max_bytes: int = 256 << 20) -> CacheStore:
    """The cache store a URL names: ``memory://`` or ``redis(s)://…``.

    Example:
        >>> cache_store_from_url("redis://127.0.0.1:6379/0")
    """
    if url.startswith("memory://"):
        return MemoryCacheStore(max_entries=max_entries, max_bytes=max_bytes)
    if url.startswith(("redis://", "rediss://")):
        return RedisCacheStore(url)
    raise ValueError("unsupported cache store URL (use memory:// or redis(s)://)")
