"""Free active health probes: ``GET /models`` on providers with an open breaker.

A probe never sends a billed completion. An answer of 200 moves that route's open
breakers to half-open, so the next live request tries the target again (and a success
closes the breaker: traffic returns to the preferred target). Runs in the gateway's task
group; it never raises out of its loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import anyio
from anyio.abc import TaskGroup

from asgi_llm._background import Loops
from asgi_llm.providers.base import ProviderAdapter
from asgi_llm.routing.health import HealthTracker

__all__ = ["HealthProber"]

logger = logging.getLogger("asgi_llm.health")


class HealthProber:
    """Probe providers whose routes have an open breaker, every ``interval_s`` seconds."""

    def __init__(self, providers: Mapping[str, ProviderAdapter], health: HealthTracker, *, interval_s: float = 10.0) -> None:
        self.providers = providers
        self.health = health
        self.interval_s = interval_s
        self._loops = Loops("health probes")

    async def start(self, task_group: TaskGroup) -> None:
        self._loops.start(task_group, self._loop)

    async def aclose(self) -> None:
        await self._loops.stop()  # no probe round while provider pools are closing

    async def _loop(self) -> None:
        while True:
            await anyio.sleep(self.interval_s)
            try:
                await self.probe_once()
            except Exception:  # noqa: BLE001 - a probe must never take the gateway down
                logger.exception("health probe round failed")

    async def probe_once(self) -> dict[str, bool]:
        """Probe every provider with an open route; return provider → reachable.

        Then probe each key retired by a 401/403 with that key: a 2xx ends its retirement
        on every route of the provider (a key that is still refused stays retired).
        """
        open_routes = self.health.open_routes()
        results: dict[str, bool] = {}
        await self._probe_refused_keys()
        for name, adapter in self.providers.items():
            routes = [r for r in open_routes if r.startswith(name + "/")]
            if not routes:
                continue
            probe = getattr(adapter, "probe", None)
            ok = bool(await probe()) if probe is not None else False
            results[name] = ok
            for route in routes:
                self.health.probe_result(route, ok)
        return results

    async def _probe_refused_keys(self) -> None:
        by_key: dict[tuple[str, str], list[str]] = {}
        for route, key_id in self.health.refused_keys():
            provider = route.partition("/")[0]
            if key_id and provider in self.providers:
                by_key.setdefault((provider, key_id), []).append(route)
        for (provider, key_id), routes in sorted(by_key.items()):
            probe = getattr(self.providers[provider], "probe", None)
            if probe is None or not await probe(key_id):
                continue
            for route in routes:
                self.health.key_accepted(route, key_id)
