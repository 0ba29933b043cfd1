"""State stores: the counters behind rate limits, quotas and budgets.

One Protocol, :class:`StateStore` (:mod:`.base`), one module per backend, chosen by
URL (:func:`state_store_from_url`):

* :class:`MemoryStateStore` (``memory://``, :mod:`.memory`) — one process; asyncio and trio.
* :class:`RedisStateStore` (``redis://``, ``rediss://``, :mod:`.redis`) — shared by every
  replica; **asyncio only** (redis.asyncio). Each admission is one Lua script, one round trip,
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

from typing import Any

from asgi_llm.stores.state.base import Admission, Limit, LimitKind, LimitStatus, Reservation, StateStore
from asgi_llm.stores.state.memory import MemoryStateStore
from asgi_llm.stores.state.redis import RedisClient, RedisStateStore

__all__ = [
    "Admission",
    "Limit",
    "LimitKind",
    "LimitStatus",
    "MemoryStateStore",
    "RedisClient",
    "RedisStateStore",
    "Reservation",
    "StateStore",
    "state_store_from_url",
]


def state_store_from_url(url: str, **options: Any) -> StateStore:
    """The state store for a recipe URL: ``memory://`` or ``redis://…`` / ``rediss://…``."""
    if url.startswith("memory://"):
        return MemoryStateStore(**options)
    if url.startswith(("redis://", "rediss://")):
        return RedisStateStore(url, **options)
    raise ValueError(f"unsupported state store URL scheme (use memory:// or redis://): {url.split('://', 1)[0]}://")
