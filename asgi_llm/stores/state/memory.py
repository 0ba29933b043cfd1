"""``memory://``: counters in this process's memory (one replica); asyncio and trio."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from asgi_llm.stores.state.base import (
    DAY_MS,
    WINDOWED,
    Admission,
    Limit,
    Reservation,
    admission_from,
    fits,
    month_bounds,
    settle_deltas,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

__all__ = ["MemoryStateStore"]

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
                month, reset = month_bounds(now)
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
            admitted = admitted and fits(lim, row[1], row[2], row[3])
        if admitted:
            for lim, row, exp in zip(limits, raw, ttls, strict=True):
                if lim.kind == "concurrency":
                    self._leases[row[0]][reservation_id] = now + int(lease_s * 1000)
                else:
                    self._counters[row[0]] = (row[1] + lim.cost, exp)
        return admission_from(limits, raw, admitted, reservation_id)

    async def settle(self, reservation: Reservation, *, tokens: int, spend: int) -> None:
        now = self._now_ms()
        for kind, key, delta in settle_deltas(reservation, tokens, spend):
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
