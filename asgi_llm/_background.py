"""Background loops that end quietly when their resource closes.

A resource (a store's sharing loop, a poller) starts its loops in the gateway's task
group. At shutdown the gateway closes resources one by one *inside* that task group, so
a loop that raises then — a stream closed under it, a client already closed — cancels
the whole group, and with it the resources still to close (the ledger writer's flush).
:class:`Loops` gives each loop its own cancel scope: the resource's ``aclose`` lets the
loops that drain a queue finish (bounded), cancels the others, and waits for them; an
error a loop did not handle is logged, never raised into the task group.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup

__all__ = ["Loops"]

logger = logging.getLogger("asgi_llm")


class Loops:
    """The background loops of one resource (see the module docstring).

    Example:
        >>> loops = Loops("breaker sharing")
        >>> loops.start(task_group, self._publish_loop, drains=True)   # ends when its queue closes
        >>> loops.start(task_group, self._subscribe_loop)              # runs until stopped
        >>> await loops.stop(grace_s=2.0)                                # in the resource's aclose
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._running: list[tuple[anyio.CancelScope, anyio.Event, bool]] = []

    def start(self, task_group: TaskGroup, loop: Callable[[], Awaitable[None]], *, drains: bool = False) -> None:
        """Run ``loop`` in ``task_group`` until it returns or :meth:`stop` cancels it.
        ``drains``: the loop ends on its own once its input is closed, and :meth:`stop`
        gives it ``grace_s`` to do so before cancelling it."""
        scope, done = anyio.CancelScope(), anyio.Event()
        self._running.append((scope, done, drains))
        task_group.start_soon(self._run, loop, scope, done)

    async def _run(self, loop: Callable[[], Awaitable[None]], scope: anyio.CancelScope, done: anyio.Event) -> None:
        try:
            with scope:
                await loop()
        except Exception:  # noqa: BLE001 - a background loop must never take the gateway down
            logger.exception("%s: background loop stopped by an unexpected error", self.name)
        finally:
            done.set()

    async def stop(self, *, grace_s: float = 0.0) -> None:
        """Let draining loops finish (up to ``grace_s``), cancel the rest, wait for all."""
        running, self._running = self._running, []
        with anyio.move_on_after(grace_s):
            for _scope, done, drains in running:
                if drains:
                    await done.wait()
        for scope, _done, _drains in running:
            scope.cancel()
        with anyio.move_on_after(5.0):
            for _scope, done, _drains in running:
                await done.wait()
