"""``compose()``: the one place the pipeline is put together, and the :class:`Gateway` it makes.

:mod:`asgi_llm.recipe.build` turns a recipe into the parts this module composes.

The fixed order, outermost first::

    ErrorMiddleware → ContextMiddleware → [Audit → Auth → Quota → Usage → Cache → Failover]
        → GatewayEndpoints → DispatchApp → ProviderAdapter

Layers in brackets join as they are built; a recipe or a caller may drop layers
(``exclude=``) but never reorder them. With an auth layer, the request body is read
just inside it (:class:`~asgi_llm.middleware.context.LoadBody`): layers outside see
the headers only, so nothing is buffered or parsed for an unauthenticated caller. :class:`Gateway` is the resulting ASGI app: it
answers ``lifespan`` itself (opening and closing connection pools), and
:func:`gateway_lifespan` does the same for host apps that mount it, since mounted
sub-apps get no lifespan events.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskGroup
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_llm.admin import AdminApp
from asgi_llm.dispatch import DispatchApp
from asgi_llm.endpoints import GatewayEndpoints, ReadinessCheck
from asgi_llm.middleware.context import (
    DEFAULT_BODY_READ_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_INFLIGHT_BODY_BYTES,
    ContextMiddleware,
    LoadBody,
)
from asgi_llm.middleware.errors import ErrorMiddleware
from asgi_llm.providers.base import ProviderAdapter
from asgi_llm.routing.health import HealthTracker
from asgi_llm.routing.router import Router

if TYPE_CHECKING:
    from asgi_llm.audit.store import SQLAuditStore
    from asgi_llm.auth.keyring import KeyRing
    from asgi_llm.console import ConsoleApp
    from asgi_llm.nodes.service import NodeService
    from asgi_llm.observability.metrics import GatewayMetrics
    from asgi_llm.observability.tracing import GatewayTracer
    from asgi_llm.stores.cache import CacheStore
    from asgi_llm.stores.sql import SQLDatabase
    from asgi_llm.stores.state import StateStore
    from asgi_llm.usage.accounting import Accountant
    from asgi_llm.usage.quarantine import SQLQuarantineStore
    from asgi_llm.usage.store import SQLLedgerStore
    from asgi_llm.usage.writer import BatchWriter

__all__ = [
    "LAYERS",
    "Gateway",
    "LayerFactory",
    "Resource",
    "Services",
    "compose",
    "gateway_lifespan",
]

LAYERS: tuple[str, ...] = ("errors", "context", "observability", "audit", "auth", "quota", "usage", "cache", "failover")
"""Every layer's name, outermost first. The order is fixed."""

LayerFactory = Callable[[ASGIApp], ASGIApp]
"""Wraps the inner app in one layer: ``lambda app: QuotaMiddleware(app, store=...)``."""


class Resource(Protocol):
    """Something the gateway opens at startup and closes at shutdown (a store's pool,
    a background writer). Background work runs in the gateway's task group — no
    fire-and-forget tasks."""

    async def start(self, task_group: TaskGroup) -> None:
        """Open connections; start background tasks in ``task_group``."""
        ...

    async def aclose(self) -> None:
        """Flush and close. Called once, in reverse start order."""
        ...


@dataclass
class Services:
    """The parts a built gateway is made of, by name (admin endpoints, the CLI and tests
    find stores here). What a recipe leaves off stays ``None``."""

    health: HealthTracker | None = None
    state_url: str = "memory://"
    sql: SQLDatabase | None = None
    state: StateStore | None = None
    keyring: KeyRing | None = None
    accountant: Accountant | None = None
    metrics: GatewayMetrics | None = None
    tracer: GatewayTracer | None = None
    ledger_store: SQLLedgerStore | None = None
    ledger_writer: BatchWriter[Any] | None = None
    audit_store: SQLAuditStore | None = None
    audit_writer: BatchWriter[Any] | None = None
    quarantine_store: SQLQuarantineStore | None = None
    writers: list[BatchWriter[Any]] = field(default_factory=list)
    cache_store: CacheStore | None = None
    nodes: NodeService | None = None
    console: ConsoleApp | None = None


class Gateway:
    """The composed gateway: an ASGI app that also handles its own lifespan.

    Attributes:
        app: the composed middleware stack (what HTTP requests go through).
        providers: adapter per provider name.
        router: public model → targets.
        resources: opened at startup (in order), closed at shutdown (in reverse).
        services: the stores, writers and helpers the gateway was built with, by name.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        providers: Mapping[str, ProviderAdapter],
        router: Router,
        resources: Sequence[Resource] = (),
        services: Services | None = None,
        websocket: ASGIApp | None = None,
    ) -> None:
        self.app = app
        self.providers = dict(providers)
        self.router = router
        self.resources = list(resources)
        self.services = services if services is not None else Services()
        self.websocket = websocket
        """Handles ``websocket`` scopes (the ``/nodes/tunnel`` of :mod:`asgi_llm.nodes`), if any."""
        self._stack: contextlib.AsyncExitStack | None = None
        self.server_config: Any = None
        """The recipe's ``server`` section (``asgi-llm serve`` reads its connection limits)."""
        self.log_json = False
        """The recipe's ``observability.log_json``: ``asgi-llm serve`` configures logging from it
        (building a gateway never touches a host app's logging)."""
        self.tune_gc = False
        """Set by ``asgi-llm serve``, which owns its process: see :func:`tune_gc_for_serving`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket" and self.websocket is not None:
            await self.websocket(scope, receive, send)  # /nodes/tunnel (asgi_llm.nodes)
            return
        await self.app(scope, receive, send)

    async def startup(self) -> None:
        """Open resources inside a task group owned by this lifespan. Idempotent."""
        if self._stack is not None:
            return
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)  # runs before the group exits
            for resource in self.resources:
                await resource.start(tg)
                stack.push_async_callback(resource.aclose)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        for adapter in self.providers.values():
            # Import the HTTP client and open each pool now, so the first request after a
            # deploy does not pay for it (measured: ~60 ms of "overhead" on request one).
            warm = getattr(getattr(adapter, "transport", None), "warm", None)
            if warm is not None:
                await warm()
        if self.tune_gc:
            tune_gc_for_serving()

    async def shutdown(self) -> None:
        """Close resources (flushing writers), stop background tasks, close provider pools."""
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                await stack.aclose()
        finally:
            for adapter in self.providers.values():
                await adapter.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def tune_gc_for_serving() -> None:
    """Keep the garbage collector's cost per request small in a serving process.

    ``gc.freeze()`` moves everything alive after startup (modules, pydantic and
    SQLAlchemy machinery, the recipe: ~100k objects) out of the collector's sight, so a
    full collection no longer walks them; a full collection of an unfrozen gateway took
    ~65 ms and ran every ~1,000 requests under load. A larger first-generation threshold
    (10,000 allocations instead of 700) makes young collections rarer; request objects
    are freed by reference counting anyway. Only for a process the gateway owns
    (``asgi-llm serve``): a host app that mounts the gateway keeps its own GC settings.
    """
    import gc

    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(10_000, gen1, gen2)


@contextlib.asynccontextmanager
async def gateway_lifespan(gateway: Gateway) -> AsyncIterator[Gateway]:
    """Run a mounted gateway's startup/shutdown inside a host app's own lifespan.

    Example:
        >>> @contextlib.asynccontextmanager
        ... async def lifespan(app):
        ...     async with gateway_lifespan(gateway):
        ...         yield
    """
    await gateway.startup()
    try:
        yield gateway
    finally:
        await gateway.shutdown()


def compose(
    *,
    providers: Mapping[str, ProviderAdapter],
    router: Router,
    layers: Mapping[str, LayerFactory] | None = None,
    resources: Sequence[Resource] = (),
    readiness: Sequence[ReadinessCheck] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_read_timeout_s: float | None = DEFAULT_BODY_READ_TIMEOUT_S,
    max_inflight_body_bytes: int | None = DEFAULT_MAX_INFLIGHT_BODY_BYTES,
    exclude: Collection[str] = (),
    services: Services | None = None,
    websocket: ASGIApp | None = None,
    admin_routes: Sequence[BaseRoute] = (),
    node_routes: Sequence[BaseRoute] = (),
    health: HealthTracker | None = None,
) -> Gateway:
    """Compose the pipeline from ready-made parts (what :func:`asgi_llm.recipe.build.build_gateway` calls).

    ``layers`` maps a layer name of :data:`LAYERS` to a factory; they are applied in
    the fixed order whatever the mapping's order. ``exclude`` drops layers by name;
    ``errors`` and ``context`` frame every gateway and cannot be dropped.
    """
    layers = dict(layers or {})
    unknown = (set(exclude) | set(layers)) - set(LAYERS)
    if unknown:
        raise ValueError(f"unknown layer(s) {sorted(unknown)}; layers are {', '.join(LAYERS)}")
    if {"errors", "context"} & (set(exclude) | set(layers)):
        raise ValueError("the 'errors' and 'context' layers are the gateway's frame: they cannot be excluded or replaced")
    inference: ASGIApp = DispatchApp(providers=providers, router=router, health=health)
    admin = AdminApp(admin_routes=admin_routes, node_routes=node_routes)
    app: ASGIApp = GatewayEndpoints(inference=inference, router=router, readiness=readiness, admin=admin)
    for name in reversed(LAYERS[2:]):
        if name in layers and name not in exclude:
            # Inside auth (whichever layer that is), the body is read: not before.
            app = layers[name](LoadBody(app) if name == "auth" else app)
    # With an auth layer, no inference body is read before the key is accepted.
    app = ContextMiddleware(app, max_body_bytes=max_body_bytes, body_read_timeout_s=body_read_timeout_s,
                            max_inflight_body_bytes=max_inflight_body_bytes,
                            hold_body_for_auth="auth" in layers and "auth" not in exclude)
    app = ErrorMiddleware(app)
    return Gateway(app, providers=providers, router=router, resources=resources, services=services,
                   websocket=websocket)


def __getattr__(name: str) -> Any:
    # ``from asgi_llm.stack import build_gateway`` predates asgi_llm.recipe; keep it working
    # without importing the composition root at import time (it imports this module).
    if name in ("build_gateway", "BuildParts"):
        from asgi_llm.recipe import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
