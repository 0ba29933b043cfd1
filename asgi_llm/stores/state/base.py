"""What every state store shares: the limit types, the :class:`StateStore` Protocol and
the sliding-window arithmetic (the Lua scripts of :mod:`.redis` do the same sums).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = [
    "DAY_MS",
    "WINDOWED",
    "Admission",
    "Limit",
    "LimitKind",
    "LimitStatus",
    "Reservation",
    "StateStore",
    "admission_from",
    "fits",
    "month_bounds",
    "settle_deltas",
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


# --------------------------------------------------------------------------- shared math (also used by the backends)


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


def fits(limit: Limit, cur: int, prev: int, elapsed_ms: int) -> bool:
    """Would ``limit`` admit its cost on top of this usage?"""
    if limit.kind in WINDOWED:
        w = limit.window_ms
        return prev * (w - elapsed_ms) + (cur + limit.cost) * w <= limit.limit * w
    return cur + limit.cost <= limit.limit


def month_bounds(now_ms: int) -> tuple[int, int]:
    """(month number since year 0, ms until the next UTC month starts)."""
    d = dt.datetime.fromtimestamp(now_ms / 1000, tz=dt.UTC)
    nxt = dt.datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=dt.UTC)
    return d.year * 12 + d.month - 1, int(nxt.timestamp() * 1000) - now_ms


def admission_from(limits: Sequence[Limit], raw: Sequence[tuple[str, int, int, int, int]], admitted: bool, rid: str) -> Admission:
    """The :class:`Admission` for raw per-limit rows ``(bucket key, current, previous, elapsed ms, reset ms)``."""
    statuses = tuple([_status(lim, cur, prev, el, rs, admitted) for lim, (_k, cur, prev, el, rs) in zip(limits, raw, strict=True)])
    if admitted:
        entries = tuple([(lim, r[0]) for lim, r in zip(limits, raw, strict=True)])
        return Admission(True, statuses, reservation=Reservation(rid, entries))
    # Report the limit that will take longest to admit (all must fit).
    worst, wait = None, -1
    for i, (lim, (_k, cur, prev, el, rs)) in enumerate(zip(limits, raw, strict=True)):
        if not fits(lim, cur, prev, el):
            ra = _retry_after_ms(lim, cur, prev, el, rs)
            if ra > wait:
                worst, wait = i, ra
    assert worst is not None
    # The refused limit's reset is the Retry-After: one number, in both headers.
    denied = replace(statuses[worst], reset_s=wait / 1000)
    statuses = (*statuses[:worst], denied, *statuses[worst + 1:])
    return Admission(False, statuses, denied=denied, retry_after_s=wait / 1000)


def settle_deltas(reservation: Reservation, tokens: int, spend: int) -> list[tuple[str, str, int]]:
    """Per charged bucket: ``(kind, key, delta)`` that replaces the reserved amounts by the real ones."""
    out: list[tuple[str, str, int]] = []
    for limit, key in reservation.entries:
        if limit.kind == "concurrency":
            out.append(("concurrency", key, 0))
        elif limit.kind == "tokens":
            out.append(("tokens", key, tokens - limit.cost))
        elif limit.kind in ("spend_day", "spend_month"):
            out.append((limit.kind, key, spend - limit.cost))
    return out
