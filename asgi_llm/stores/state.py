"""State stores: the counters behind rate limits, quotas and budgets.

One Protocol, :class:`StateStore`, two implementations chosen by URL
(:func:`state_store_from_url`):

* :class:`MemoryStateStore` (``memory://``) — one process; asyncio and trio.
* :class:`RedisStateStore` (``redis://``, ``rediss://``) — shared by every replica;
  **asyncio only** (redis.asyncio). Each admission is one Lua script, one round trip,
  timed by the Redis server's clock (``TIME``), so replicas with skewed clocks agree.

What is counted
---------------
A :class:`Limit` is one counter a request must fit in: ``requests`` or ``tokens`` per
window (60 s for rpm/tpm), ``concurrency`` (requests in flight), ``spend_day`` or
``spend_month`` (integer pico-USD per UTC day / calendar month). :meth:`StateStore.reserve`
checks *all* of a request's limits and charges all of them, or none (atomic,
all-or-nothing); :meth:`StateStore.settle` later charges the real usage against the same
buckets and refunds the rest, and releases the concurrency slot.

Window algorithm: a **two-bucket sliding window** ("sliding window counter"). Each
limit keeps one integer per fixed window of ``window_s``; usage at time *t* is
``previous × (window − elapsed)/window + current``. It smooths the burst a fixed window
allows at its boundary (2× the limit), keeps O(1) state per limit (no per-request or
per-token entries), and admission is exact integer arithmetic (all sides multiplied by
the window in ms), identical in Python and Lua. It assumes the previous window's usage
was spread evenly — the usual, documented approximation of this algorithm.

Concurrency is a counter of leases: each reservation holds a slot until settled or until
its lease expires (``lease_s``), so a replica that crashes mid-request does not leak
slots for ever. Spend uses calendar buckets (UTC); a budget frees up at the next day or
month, or as soon as refunds come back.

Failures: driver errors leave as :class:`~asgi_llm.stores.StoreError` (a 503); the
caller (QuotaMiddleware) applies the configured policy — fail closed (default) or open.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from asgi_llm._timeout import fail_after
from asgi_llm.stores import StoreError

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = [
    "Admission",
    "Limit",
    "LimitKind",
    "LimitStatus",
    "MemoryStateStore",
    "RedisStateStore",
    "Reservation",
    "StateStore",
    "state_store_from_url",
]

LimitKind = Literal["requests", "tokens", "concurrency", "spend_day", "spend_month"]
WINDOWED: frozenset[str] = frozenset({"requests", "tokens"})
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Limit:
    """One counter a request must fit in.

    ``scope`` identifies the counter (``"key:k_1"``, ``"org:team-a"``,
    ``"key:k_1|model:chat"``); ``limit`` and ``cost`` are requests, tokens, in-flight
    requests or pico-USD according to ``kind``; ``label`` names the scope in messages;
    ``window_s`` is the sliding window of ``requests``/``tokens``, and ``window_ms`` the
    same in whole milliseconds (computed once: admission reads it several times).
    """

    kind: LimitKind
    scope: str
    limit: int
    cost: int
    label: str = ""
    window_s: float = 60.0
    window_ms: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "window_ms", max(1, int(self.window_s * 1000)))


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """One limit as seen at admission: ``used`` before this request (a sliding window's
    weighted count, rounded up), ``remaining`` after it, ``reset_s`` until the counted
    usage has expired (windows) or the period ends (spend)."""

    limit: Limit
    used: int
    remaining: int
    reset_s: float


@dataclass(frozen=True, slots=True)
class Reservation:
    """What an admission charged: each limit and the bucket it was charged to."""

    id: str
    entries: tuple[tuple[Limit, str], ...]


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to :meth:`StateStore.reserve`.

    Admitted: ``reservation`` must later be settled. Refused: ``denied`` is the first
    limit that did not fit and ``retry_after_s`` when it would, if nothing else changed.
    """

    admitted: bool
    statuses: tuple[LimitStatus, ...]
    reservation: Reservation | None = None
    denied: LimitStatus | None = None
    retry_after_s: float = 0.0


class StateStore(Protocol):
    """Counters for limits, shared by whoever uses the same store.

    A store whose :meth:`settle` never awaits may say so with a class attribute
    ``settle_never_awaits = True``: callers can then skip the timeout and shield they
    otherwise put around it.

    Example:
        >>> store = state_store_from_url("redis://127.0.0.1:6379/0")
        >>> adm = await store.reserve([Limit("requests", "key:k1", 60, 1)], reservation_id="r1")
        >>> if adm.admitted:
        ...     await store.settle(adm.reservation, tokens=0, spend=0)
    """

    async def reserve(self, limits: Sequence[Limit], *, reservation_id: str, lease_s: float = 660.0) -> Admission:
        """Check every limit and, only if all fit, charge each its ``cost`` — atomically,
        even against other processes sharing the store. Concurrency slots are leased for
        ``lease_s``. Raises :class:`~asgi_llm.stores.StoreError` when the store fails."""
        ...

    async def settle(self, reservation: Reservation, *, tokens: int, spend: int) -> None:
        """Replace the reserved ``tokens`` and ``spend`` (pico-USD) by the real amounts
        (refunding or charging the difference in the buckets charged at admission) and
        release concurrency slots. Requests are not refunded. Raises ``StoreError``."""
        ...

    async def ping(self) -> str | None:
        """Readiness: ``None`` when reachable, else a short reason."""
        ...

    async def start(self, task_group: TaskGroup) -> None:
        """Open connections (a store that is down at start is reported by :meth:`ping`)."""
        ...

    async def aclose(self) -> None:
        """Close connections."""
        ...


# --------------------------------------------------------------------------- shared math


def _status(limit: Limit, cur: int, prev: int, elapsed_ms: int, reset_ms: int, admitted: bool) -> LimitStatus:
    """The limit as the caller sees it after this admission (its own cost counted).

    ``reset_s`` of a window: with nothing counted, 0; exhausted (``remaining`` 0), when a
    request of the same cost fits again — what a 429's ``Retry-After`` would say; else
    when the window turns and the counted usage starts to expire (at most the window,
    never ``0s`` right after a counted request).
    """
    if limit.kind in WINDOWED:
        w = limit.window_ms
        weighted = (prev * (w - elapsed_ms) + cur * w) / w
        used = math.ceil(weighted - 1e-9)
        counted = cur + (limit.cost if admitted else 0)
        remaining = max(0, limit.limit - used - (limit.cost if admitted else 0))
        if counted <= 0 and prev <= 0:
            reset = 0
        elif remaining == 0 and 0 < limit.cost <= limit.limit:
            reset = max(1, _retry_after_ms(limit, counted, prev, elapsed_ms, reset_ms))
        else:
            reset = max(1, w - elapsed_ms)
        return LimitStatus(limit, used, remaining, reset / 1000)
    used, reset = cur, reset_ms
    after = used + (limit.cost if admitted else 0)
    return LimitStatus(limit, used, max(0, limit.limit - after), reset / 1000)


def _retry_after_ms(limit: Limit, cur: int, prev: int, elapsed_ms: int, reset_ms: int) -> int:
    """When would ``limit`` admit this request, if nothing else changed?"""
    if limit.kind == "concurrency":
        return 1000
    if limit.kind not in WINDOWED or limit.cost > limit.limit:
        return reset_ms if limit.kind not in WINDOWED else 2 * limit.window_ms - elapsed_ms
    w, cost, lim = limit.window_ms, limit.cost, limit.limit
    if cur + cost <= lim:
        # Wait until the previous window's weight has fallen far enough.
        target = w - (w * (lim - cur - cost)) // max(prev, 1)
        return max(0, target - elapsed_ms)
    # Wait for the next window, where the current count becomes the decaying one.
    target = w - (w * (lim - cost)) // max(cur, 1)
    return (w - elapsed_ms) + max(0, target)


def _fits(limit: Limit, cur: int, prev: int, elapsed_ms: int) -> bool:
    if limit.kind in WINDOWED:
        w = limit.window_ms
        return prev * (w - elapsed_ms) + (cur + limit.cost) * w <= limit.limit * w
    return cur + limit.cost <= limit.limit


def _month_bounds(now_ms: int) -> tuple[int, int]:
    """(month number since year 0, ms until the next UTC month starts)."""
    d = dt.datetime.fromtimestamp(now_ms / 1000, tz=dt.UTC)
    nxt = dt.datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=dt.UTC)
    return d.year * 12 + d.month - 1, int(nxt.timestamp() * 1000) - now_ms


def _admission(limits: Sequence[Limit], raw: Sequence[tuple[str, int, int, int, int]], admitted: bool, rid: str) -> Admission:
    statuses = tuple([_status(lim, cur, prev, el, rs, admitted) for lim, (_k, cur, prev, el, rs) in zip(limits, raw, strict=True)])
    if admitted:
        entries = tuple([(lim, r[0]) for lim, r in zip(limits, raw, strict=True)])
        return Admission(True, statuses, reservation=Reservation(rid, entries))
    # Report the limit that will take longest to admit (all must fit).
    worst, wait = None, -1
    for i, (lim, (_k, cur, prev, el, rs)) in enumerate(zip(limits, raw, strict=True)):
        if not _fits(lim, cur, prev, el):
            ra = _retry_after_ms(lim, cur, prev, el, rs)
            if ra > wait:
                worst, wait = i, ra
    assert worst is not None
    # The refused limit's reset is the Retry-After: one number, in both headers.
    denied = replace(statuses[worst], reset_s=wait / 1000)
    statuses = (*statuses[:worst], denied, *statuses[worst + 1:])
    return Admission(False, statuses, denied=denied, retry_after_s=wait / 1000)


def _settle_deltas(reservation: Reservation, tokens: int, spend: int) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    for limit, key in reservation.entries:
        if limit.kind == "concurrency":
            out.append(("concurrency", key, 0))
        elif limit.kind == "tokens":
            out.append(("tokens", key, tokens - limit.cost))
        elif limit.kind in ("spend_day", "spend_month"):
            out.append((limit.kind, key, spend - limit.cost))
    return out


# --------------------------------------------------------------------------- memory


class MemoryStateStore:
    """Counters in this process's memory (one replica only); asyncio and trio.

    Operations never await, so each is atomic with respect to other tasks (a subclass
    whose ``settle`` awaits must set ``settle_never_awaits`` back to ``False``).

    Args:
        clock: seconds since the epoch (inject a fake one in tests).
    """

    settle_never_awaits: ClassVar[bool] = True

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counters: dict[str, tuple[int, int]] = {}  # bucket → (value, expires at ms)
        self._leases: dict[str, dict[str, int]] = {}  # scope → {reservation id: expires at ms}
        self._next_sweep = 0

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _get(self, key: str, now: int) -> int:
        item = self._counters.get(key)
        if item is None or item[1] <= now:
            return 0
        return item[0]

    def _sweep(self, now: int) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + 10_000
        self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
        for key in [k for k, v in self._leases.items() if not v]:
            del self._leases[key]

    async def reserve(self, limits: Sequence[Limit], *, reservation_id: str, lease_s: float = 660.0) -> Admission:
        now = self._now_ms()
        self._sweep(now)
        raw: list[tuple[str, int, int, int, int]] = []
        ttls: list[int] = []
        admitted = True
        for lim in limits:
            kind = lim.kind
            if kind in WINDOWED:
                w = lim.window_ms
                idx = now // w
                key = f"{kind}:{lim.scope}:{idx}"
                cur, prev = self._get(key, now), self._get(f"{kind}:{lim.scope}:{idx - 1}", now)
                row = (key, cur, prev, now - idx * w, w - (now - idx * w))
                ttls.append((idx + 2) * w)
            elif kind == "spend_day":
                day = now // DAY_MS
                key = f"spend_day:{lim.scope}:{day}"
                row = (key, self._get(key, now), 0, now - day * DAY_MS, (day + 1) * DAY_MS - now)
                ttls.append((day + 1) * DAY_MS + 3_600_000)
            elif kind == "spend_month":
                month, reset = _month_bounds(now)
                key = f"spend_month:{lim.scope}:{month}"
                row = (key, self._get(key, now), 0, 0, reset)
                ttls.append(now + reset + 3_600_000)
            else:
                key = f"concurrency:{lim.scope}"
                leases = self._leases.setdefault(key, {})
                for rid in [r for r, exp in leases.items() if exp <= now]:
                    del leases[rid]
                row = (key, len(leases), 0, 0, 0)
                ttls.append(0)
            raw.append(row)
            admitted = admitted and _fits(lim, row[1], row[2], row[3])
        if admitted:
            for lim, row, exp in zip(limits, raw, ttls, strict=True):
                if lim.kind == "concurrency":
                    self._leases[row[0]][reservation_id] = now + int(lease_s * 1000)
                else:
                    self._counters[row[0]] = (row[1] + lim.cost, exp)
        return _admission(limits, raw, admitted, reservation_id)

    async def settle(self, reservation: Reservation, *, tokens: int, spend: int) -> None:
        now = self._now_ms()
        for kind, key, delta in _settle_deltas(reservation, tokens, spend):
            if kind == "concurrency":
                self._leases.get(key, {}).pop(reservation.id, None)
                continue
            item = self._counters.get(key)
            if delta and item is not None and item[1] > now:  # an expired bucket needs no refund
                self._counters[key] = (max(0, item[0] + delta), item[1])

    async def ping(self) -> str | None:
        return None

    async def start(self, task_group: TaskGroup) -> None:
        return None

    async def aclose(self) -> None:
        return None


# --------------------------------------------------------------------------- redis

_RESERVE_LUA = """
local rid, lease_ms, n, prefix = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local DAY = 86400000

-- days since 1970-01-01 <-> proleptic Gregorian (y, m, d); H. Hinnant's algorithms
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local out = {0, 0, now}
local plan = {}
local failed = 0
for i = 1, n do
  local b = 4 + (i - 1) * 5
  local kind, scope = ARGV[b + 1], ARGV[b + 2]
  local limit, cost, win = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  local key, ttl
  local cur, prev, elapsed, reset = 0, 0, 0, 0
  local ok
  if kind == 'requests' or kind == 'tokens' then
    local idx = math.floor(now / win)
    elapsed = now - idx * win
    key = prefix .. kind .. ':' .. scope .. ':' .. idx
    cur = tonumber(redis.call('GET', key) or '0')
    prev = tonumber(redis.call('GET', prefix .. kind .. ':' .. scope .. ':' .. (idx - 1)) or '0')
    ok = prev * (win - elapsed) + (cur + cost) * win <= limit * win
    reset = win - elapsed
    ttl = (idx + 2) * win - now + 1000
  elseif kind == 'spend_day' then
    local day = math.floor(now / DAY)
    key = prefix .. 'spend_day:' .. scope .. ':' .. day
    cur = tonumber(redis.call('GET', key) or '0')
    elapsed = now - day * DAY
    reset = (day + 1) * DAY - now
    ok = cur + cost <= limit
    ttl = reset + 3600000
  elseif kind == 'spend_month' then
    local y, m = civil_from_days(math.floor(now / DAY))
    key = prefix .. 'spend_month:' .. scope .. ':' .. (y * 12 + m - 1)
    cur = tonumber(redis.call('GET', key) or '0')
    local ny, nm = y, m + 1
    if nm > 12 then ny, nm = y + 1, 1 end
    reset = days_from_civil(ny, nm, 1) * DAY - now
    ok = cur + cost <= limit
    ttl = reset + 3600000
  else
    key = prefix .. 'concurrency:' .. scope
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    cur = redis.call('ZCARD', key)
    ok = cur + cost <= limit
    ttl = lease_ms + 1000
  end
  plan[i] = {kind, key, cost, ttl}
  out[#out + 1] = key
  out[#out + 1] = cur
  out[#out + 1] = prev
  out[#out + 1] = elapsed
  out[#out + 1] = reset
  if not ok and failed == 0 then failed = i end
end
if failed == 0 then
  for i = 1, n do
    local kind, key, cost, ttl = plan[i][1], plan[i][2], plan[i][3], plan[i][4]
    if kind == 'concurrency' then
      redis.call('ZADD', key, now + lease_ms, rid)
      if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
    else
      redis.call('INCRBY', key, cost)
      redis.call('PEXPIRE', key, ttl)
    end
  end
  out[1] = 1
end
out[2] = failed
return out
"""

_SETTLE_LUA = """
local rid, n = ARGV[1], tonumber(ARGV[2])
for i = 1, n do
  local b = 2 + (i - 1) * 3
  local kind, key, delta = ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3])
  if kind == 'concurrency' then
    redis.call('ZREM', key, rid)
  elseif delta ~= 0 and redis.call('EXISTS', key) == 1 then
    if redis.call('INCRBY', key, delta) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
  end
end
return n
"""


class RedisStateStore:
    """Counters in Redis, shared by every gateway replica. **asyncio only.**

    Admission is one ``EVALSHA`` (a Lua script checks and charges every limit
    atomically, on the server's clock); settlement another. Keys live under
    ``prefix`` and expire on their own (windows after two windows, spend buckets an
    hour after their period, concurrency sets with their last lease). Keys are built
    inside the script, so this targets a single Redis (or a primary with replicas),
    not Redis Cluster.

    Args:
        url: ``redis://host:port/db`` or ``rediss://…``.
        prefix: key namespace.
        timeout_s: connect and per-command socket timeout — how long a dead Redis
            can hold a request before the failure policy applies.
        max_connections: pool size (a request waits up to ``timeout_s`` for one).
    """

    def __init__(self, url: str, *, prefix: str = "asgi-llm:rl:", timeout_s: float = 1.0, max_connections: int = 64) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._client: Any = None
        self._reserve: Any = None
        self._settle: Any = None

    @property
    def client(self) -> Any:
        """The ``redis.asyncio.Redis`` client (created on first use)."""
        if self._client is None:
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
                # (a task each) then; the calls below are bounded by fail_after instead.
                socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0),  # a failure is reported now; the policy decides
            )
            self._client = aioredis.Redis(connection_pool=pool)
            self._reserve = self._client.register_script(_RESERVE_LUA)
            self._settle = self._client.register_script(_SETTLE_LUA)
        return self._client

    async def reserve(self, limits: Sequence[Limit], *, reservation_id: str, lease_s: float = 660.0) -> Admission:
        args: list[Any] = [reservation_id, int(lease_s * 1000), len(limits), self.prefix]
        for lim in limits:
            args += [lim.kind, lim.scope, lim.limit, lim.cost, lim.window_ms]
        _ = self.client
        with _map_redis_errors("rate-limit admission"):
            async with fail_after(self.timeout_s):
                out = await self._reserve(args=args)
        raw = []
        for i in range(len(limits)):
            key, cur, prev, el, rs = out[3 + 5 * i: 8 + 5 * i]
            raw.append((key.decode() if isinstance(key, bytes) else key, int(cur), int(prev), int(el), int(rs)))
        return _admission(limits, raw, out[0] == 1, reservation_id)

    async def settle(self, reservation: Reservation, *, tokens: int, spend: int) -> None:
        deltas = _settle_deltas(reservation, tokens, spend)
        if not deltas:
            return
        args: list[Any] = [reservation.id, len(deltas)]
        for kind, key, delta in deltas:
            args += [kind, key, delta]
        _ = self.client
        with _map_redis_errors("rate-limit settlement"):
            async with fail_after(self.timeout_s):
                await self._settle(args=args)

    async def ping(self) -> str | None:
        try:
            with _map_redis_errors("ping"):
                async with fail_after(self.timeout_s):
                    await self.client.ping()
        except StoreError as exc:
            return f"state store unreachable: {exc.message}"
        return None

    async def start(self, task_group: TaskGroup) -> None:
        import asyncio

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "the Redis state store (redis.asyncio) runs under asyncio only; serve with uvicorn/asyncio, "
                "or use stores.state: memory:// under trio"
            ) from None
        _ = self.client  # connections open lazily: a Redis down at start is a readiness problem, not a crash

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
                await client.connection_pool.disconnect()


@contextlib.contextmanager
def _map_redis_errors(what: str) -> Iterator[None]:
    """Turn redis/socket errors into :class:`StoreError` naming the operation."""
    from redis.exceptions import RedisError

    try:
        yield
    except (RedisError, OSError, TimeoutError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise StoreError(f"Redis state store failed during {what}: {detail}") from exc


def state_store_from_url(url: str, **options: Any) -> StateStore:
    """The state store for a recipe URL: ``memory://`` or ``redis://…`` / ``rediss://…``."""
    if url.startswith("memory://"):
        return MemoryStateStore(**options)
    if url.startswith(("redis://", "rediss://")):
        return RedisStateStore(url, **options)
    raise ValueError(f"unsupported state store URL scheme (use memory:// or redis://): {url.split('://', 1)[0]}://")
