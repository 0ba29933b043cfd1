"""A cheap ``fail_after`` for the hot path.

``anyio.fail_after`` costs a backend lookup and a cancel scope per use; the gateway
uses one per upstream call and one per stream chunk, and profiles showed it near 15 %
of a proxy's CPU. Under asyncio the standard library's ``asyncio.timeout`` does the
same job (raises ``TimeoutError``, cancels only the wrapped block) for much less; any
other loop (trio) keeps anyio's. Use as ``async with fail_after(seconds): ...``.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from types import TracebackType

import anyio

__all__ = ["fail_after"]


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


def fail_after(seconds: float) -> AbstractAsyncContextManager[object]:
    """Raise ``TimeoutError`` if the block takes longer than ``seconds``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _AnyioTimeout(seconds)
    return asyncio.timeout(seconds)
