"""``redis://`` / ``rediss://``: counters shared by every replica, and the one Redis
client the gateway's other Redis users (breaker sharing, node liveness) go through.

:class:`RedisClient` is that client: one bounded connection pool per state store, every
command under ``fail_after(timeout_s)``, driver and socket errors turned into
:class:`~asgi_llm.stores.StoreError` at this seam. Pub/sub takes its own connection from
the same pool (:meth:`RedisClient.subscribe`), with the same timeouts and mapping.
**asyncio only** (``redis.asyncio``). The Lua scripts live next to this module
(``reserve.lua``, ``settle.lua``) and ship as package data.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from asgi_llm._timeout import fail_after
from asgi_llm.stores import StoreError
from asgi_llm.stores.state.base import Admission, Limit, Reservation, admission_from, settle_deltas

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = ["RedisClient", "RedisStateStore", "RedisSubscription", "map_redis_errors"]

T = TypeVar("T")


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


@contextlib.contextmanager
def map_redis_errors(what: str, *, role: str = "state store") -> Iterator[None]:
    """Turn redis/socket errors into :class:`StoreError` naming the operation."""
    from redis.exceptions import RedisError

    try:
        yield
    except (RedisError, OSError, TimeoutError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise StoreError(f"Redis {role} failed during {what}: {detail}") from exc


class RedisClient:
    """The state store's Redis connection: a bounded pool, a deadline per command,
    errors mapped to :class:`StoreError`. Shared by whoever needs the state Redis.

    Args:
        url: ``redis://host:port/db`` or ``rediss://…``.
        timeout_s: connect timeout, wait for a pooled connection, and deadline of each
            command — how long a dead Redis can hold a caller.
        max_connections: pool size (subscriptions hold one each while subscribed).
    """

    def __init__(self, url: str, *, timeout_s: float = 1.0, max_connections: int = 64) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._raw: Any = None

    @property
    def raw(self) -> Any:
        """The ``redis.asyncio.Redis`` client (created on first use; connections open lazily)."""
        if self._raw is None:
            try:
                import redis.asyncio as aioredis
                from redis.asyncio.retry import Retry
                from redis.backoff import NoBackoff
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise StoreError("the redis state store needs the 'redis' package: pip install 'asgi-llm[redis]'") from exc
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=self.max_connections,
                timeout=self.timeout_s,
                # No socket_timeout: redis-py runs every command under asyncio.wait_for
                # (a task each) then; commands here are bounded by fail_after instead.
                socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0),  # a failure is reported now; the caller decides
            )
            self._raw = aioredis.Redis(connection_pool=pool)
        return self._raw

    async def call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run one command (``fn`` a bound method of :attr:`raw` or a script) under the
        deadline, with errors mapped."""
        with map_redis_errors(what):
            async with fail_after(self.timeout_s):
                return await fn(*args, **kwargs)

    async def get(self, key: str) -> bytes | None:
        """``GET``."""
        return await self.call(f"GET {key}", self.raw.get, key)

    async def get_with_pttl(self, key: str | bytes) -> tuple[bytes | None, int]:
        """``GET`` and ``PTTL`` in one round trip."""
        async def both() -> tuple[bytes | None, int]:
            async with self.raw.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                raw, pttl = await pipe.execute()
            return raw, int(pttl if pttl is not None else -2)

        return await self.call("GET/PTTL", both)

    async def set(self, key: str, value: str | bytes, *, px: int) -> None:
        """``SET key value PX px``."""
        await self.call("SET", self.raw.set, key, value, px=px)

    async def publish(self, channel: str, payload: str | bytes) -> None:
        """``PUBLISH``."""
        await self.call("PUBLISH", self.raw.publish, channel, payload)

    async def scan(self, match: str, *, count: int = 500, limit: int = 100_000) -> list[bytes]:
        """Keys matching ``match``: each ``SCAN`` step under the deadline, at most ``limit`` keys."""
        keys: list[bytes] = []
        cursor: int = 0
        while True:
            cursor, batch = await self.call("SCAN", self.raw.scan, cursor, match=match, count=count)
            keys.extend(batch)
            if not cursor or len(keys) >= limit:
                return keys[:limit]

    def register_script(self, source: str) -> Any:
        """A script object for :meth:`call` (``EVALSHA``, loaded on first use)."""
        return self.raw.register_script(source)

    async def ping(self) -> None:
        """``PING``; raises :class:`StoreError` when Redis cannot be reached in time."""
        await self.call("ping", self.raw.ping)

    @contextlib.asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[RedisSubscription]:
        """Subscribe to ``channel`` on a connection of its own (from the same pool)."""
        pubsub = self.raw.pubsub(ignore_subscribe_messages=True)
        try:
            await self.call(f"SUBSCRIBE {channel}", pubsub.subscribe, channel)
            yield RedisSubscription(self, pubsub)
        finally:
            with contextlib.suppress(Exception), anyio.CancelScope(shield=True), anyio.move_on_after(self.timeout_s):
                await pubsub.aclose()

    async def aclose(self) -> None:
        """Close the pool (idempotent; a later call opens a new one)."""
        raw, self._raw = self._raw, None
        if raw is not None:
            with contextlib.suppress(Exception):
                await raw.aclose()
                await raw.connection_pool.disconnect()


class RedisSubscription:
    """Messages of one subscription; see :meth:`RedisClient.subscribe`."""

    def __init__(self, client: RedisClient, pubsub: Any, *, idle_ping_s: float = 30.0) -> None:
        self._client = client
        self._pubsub = pubsub
        self.idle_ping_s = idle_ping_s

    async def messages(self) -> AsyncIterator[bytes]:
        """Payloads as they arrive. A quiet connection is pinged every ``idle_ping_s``
        (under the deadline), so a Redis that vanished without closing the socket is
        noticed: that and every other failure leaves as :class:`StoreError`."""
        while True:
            with map_redis_errors("subscription read"):
                item = await self._pubsub.get_message(timeout=self.idle_ping_s)
            if item is None:
                await self._client.call("subscription ping", self._pubsub.ping)
                continue
            if item.get("type") == "message":
                yield item["data"]


class RedisStateStore:
    """Counters in Redis, shared by every gateway replica. **asyncio only.**

    Admission is one ``EVALSHA`` (a Lua script checks and charges every limit
    atomically, on the server's clock); settlement another. Keys live under
    ``prefix`` and expire on their own (windows after two windows, spend buckets an
    hour after their period, concurrency sets with their last lease). Keys are built
    inside the script, so this targets a single Redis (or a primary with replicas),
    not Redis Cluster.

    :attr:`redis` is the store's :class:`RedisClient`; breaker and node-liveness
    sharing use it too (one pool per URL, one set of timeouts).

    Args:
        url: ``redis://host:port/db`` or ``rediss://…``.
        prefix: key namespace.
        timeout_s: connect and per-command timeout — how long a dead Redis can hold a
            request before the failure policy applies.
        max_connections: pool size (a request waits up to ``timeout_s`` for one).
    """

    def __init__(self, url: str, *, prefix: str = "asgi-llm:rl:", timeout_s: float = 1.0, max_connections: int = 64) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.redis = RedisClient(url, timeout_s=timeout_s, max_connections=max_connections)
        self._reserve: Any = None
        self._settle: Any = None

    @property
    def client(self) -> Any:
        """The ``redis.asyncio.Redis`` client (created on first use)."""
        raw = self.redis.raw
        if self._reserve is None:
            self._reserve = self.redis.register_script(_script("reserve.lua"))
            self._settle = self.redis.register_script(_script("settle.lua"))
        return raw

    async def reserve(self, limits: Sequence[Limit], *, reservation_id: str, lease_s: float = 660.0) -> Admission:
        """See :meth:`StateStore.reserve`."""
        args: list[Any] = [reservation_id, int(lease_s * 1000), len(limits), self.prefix]
        for lim in limits:
            args += [lim.kind, lim.scope, lim.limit, lim.cost, lim.window_ms]
        _ = self.client
        out = await self.redis.call("rate-limit admission", self._reserve, args=args)
        raw = []
        for i in range(len(limits)):
            key, cur, prev, el, rs = out[3 + 5 * i: 8 + 5 * i]
            raw.append((key.decode() if isinstance(key, bytes) else key, int(cur), int(prev), int(el), int(rs)))
        return admission_from(limits, raw, out[0] == 1, reservation_id)

    async def settle(self, reservation: Reservation, *, tokens: int, spend: int) -> None:
        """See :meth:`StateStore.settle`."""
        deltas = settle_deltas(reservation, tokens, spend)
        if not deltas:
            return
        args: list[Any] = [reservation.id, len(deltas)]
        for kind, key, delta in deltas:
            args += [kind, key, delta]
        _ = self.client
        await self.redis.call("rate-limit settlement", self._settle, args=args)

    async def ping(self) -> str | None:
        """Readiness: ``None`` when Redis answers in time, else a short reason."""
        try:
            await self.redis.ping()
        except StoreError as exc:
            return f"state store unreachable: {exc.message}"
        return None

    async def start(self, task_group: TaskGroup) -> None:
        """Refuse a non-asyncio loop; connections open lazily (a Redis down at start is
        a readiness problem, not a crash)."""
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "the Redis state store (redis.asyncio) runs under asyncio only; serve with uvicorn/asyncio, "
                "or use stores.state: memory:// under trio"
            ) from None
        _ = self.client

    async def aclose(self) -> None:
        """Close the pool (and forget the scripts, bound to it)."""
        self._reserve = self._settle = None
        await self.redis.aclose()
