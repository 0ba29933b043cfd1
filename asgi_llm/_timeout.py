"""A cheap ``fail_after`` for the hot path.

The gateway puts a timeout around every upstream call, every body read and every
stream chunk. ``anyio.fail_after`` costs a backend lookup and a cancel scope per use;
``asyncio.timeout`` costs an event-loop timer per use (created, then cancelled a
millisecond later — under uvloop a libuv timer handle each time). Profiles of the full
pipeline showed the timer alone at ~15 % of the gateway's own CPU.

Under asyncio this module keeps **one** loop timer per event loop (:class:`_Deadlines`)
for all active timeouts: entering a timeout adds it to a set, leaving removes it, and
the shared timer is re-armed only when a new deadline is earlier than the one it waits
for — with constant timeouts and steadily increasing deadlines, almost never. Deadlines
are checked at a resolution of :data:`RESOLUTION_S` (a timeout fires up to 10 ms late),
which is far below any timeout the gateway uses (hundreds of ms to minutes).

Semantics are those of ``asyncio.timeout``: when the deadline passes, the task is
cancelled, and leaving the block turns that cancellation into ``TimeoutError`` — unless
somebody else cancelled the task too, in which case ``CancelledError`` propagates.
Any other loop (trio) keeps anyio's. Use as ``async with fail_after(seconds): ...``.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from contextlib import AbstractAsyncContextManager
from types import TracebackType

import anyio

__all__ = ["RESOLUTION_S", "TimeoutPerWait", "fail_after"]

RESOLUTION_S = 0.01
"""Deadlines are checked on this grid: a timeout fires between 0 and 10 ms late."""


class _AnyioTimeout:
    __slots__ = ("_scope", "_seconds")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._scope: anyio.CancelScope | None = None

    async def __aenter__(self) -> None:
        self._scope = anyio.fail_after(self._seconds)
        self._scope.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._scope is not None
        return self._scope.__exit__(exc_type, exc, tb)


class _Deadlines:
    """The active timeouts of one event loop, and the one timer that expires them."""

    __slots__ = ("loop_ref", "_active", "_armed_at", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop_ref = weakref.ref(loop)
        self._active: dict[_LoopTimeout, None] = {}  # insertion-ordered set
        self._armed_at = math.inf
        self._handle: asyncio.TimerHandle | None = None

    def add(self, timeout: _LoopTimeout) -> None:
        self._active[timeout] = None
        # Armed times are on the RESOLUTION_S grid, so a deadline within one step
        # before the armed time is served by the armed timer too.
        if timeout.when <= self._armed_at - RESOLUTION_S:
            self._arm(timeout.when)

    def discard(self, timeout: _LoopTimeout) -> None:
        # The timer stays armed: when it fires with nothing due it re-arms for the
        # earliest remaining deadline, which is cheaper than re-arming on every exit.
        self._active.pop(timeout, None)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        at = math.ceil(when / RESOLUTION_S) * RESOLUTION_S  # never early
        self._armed_at = at
        self._handle = asyncio.get_running_loop().call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = math.inf
        now = asyncio.get_running_loop().time()
        due = [t for t in self._active if t.when <= now]
        for timeout in due:
            del self._active[timeout]
            timeout.expire()
        if self._active:
            self._arm(min(t.when for t in self._active))


_current: _Deadlines | None = None
"""The deadlines of the loop that last asked (a process normally runs one loop). Only
this one is kept: a loop that is gone leaves at most one stale entry, replaced by the
next loop's."""


class _LoopTimeout:
    """``asyncio.timeout(seconds)`` on the loop's shared deadline timer."""

    __slots__ = ("when", "_deadlines", "_task", "_loop", "_cancelling", "_expired")

    def __init__(self, when: float, deadlines: _Deadlines, task: asyncio.Task[object], loop: asyncio.AbstractEventLoop) -> None:
        self.when = when
        self._deadlines = deadlines
        self._task = task
        self._loop = loop
        self._cancelling = 0
        self._expired = False

    def again(self, seconds: float) -> _LoopTimeout:
        """This timeout, ready to be entered once more with a new deadline (same task)."""
        self.when = self._loop.time() + seconds
        self._expired = False
        return self

    async def __aenter__(self) -> None:
        self._cancelling = self._task.cancelling()
        self._deadlines.add(self)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._deadlines.discard(self)
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
        return None

    def expire(self) -> None:
        self._expired = True
        self._task.cancel()


def fail_after(seconds: float) -> AbstractAsyncContextManager[object]:
    """Raise ``TimeoutError`` if the block takes longer than ``seconds`` (counted from now).

    Use it directly in ``async with``: the timeout belongs to the task that called it.
    """
    global _current
    try:
        # One lookup: on Python 3.11 each asyncio.get_running_loop()/current_task()
        # costs a getpid() system call (the loop's fork check).
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop running: trio
        return _AnyioTimeout(seconds)
    if task is None:  # pragma: no cover - an ``async with`` always runs in a task
        return asyncio.timeout(seconds)
    loop = task.get_loop()
    deadlines = _current
    if deadlines is None or deadlines.loop_ref() is not loop:
        deadlines = _current = _Deadlines(loop)
    return _LoopTimeout(loop.time() + seconds, deadlines, task, loop)


class TimeoutPerWait:
    """``fail_after`` for each await of a loop in one task, e.g. every chunk of a stream.

    ``async with waits(seconds): ...`` behaves like ``async with fail_after(seconds)``,
    but under asyncio the same timeout object is reused from one wait to the next, so a
    chunk costs no allocation and no task or loop lookup.

    Example:
        >>> waits = TimeoutPerWait()
        >>> while True:
        ...     async with waits(idle_s):
        ...         chunk = await stream.__anext__()
    """

    __slots__ = ("_timeout",)

    def __init__(self) -> None:
        self._timeout: _LoopTimeout | None = None

    def __call__(self, seconds: float) -> AbstractAsyncContextManager[object]:
        if self._timeout is not None:
            return self._timeout.again(seconds)
        timeout = fail_after(seconds)
        if isinstance(timeout, _LoopTimeout):
            self._timeout = timeout
        return timeout
