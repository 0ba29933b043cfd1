"""``build_gateway()``: the one place the pipeline is composed.

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
from asgi_llm.console import build_console
from asgi_llm.dispatch import DispatchApp
from asgi_llm.endpoints import GatewayEndpoints, ReadinessCheck
from asgi_llm.middleware.audit import build_audit_layer
from asgi_llm.middleware.auth import build_auth_layer
from asgi_llm.middleware.cache import build_cache_layer
from asgi_llm.middleware.context import (
    DEFAULT_BODY_READ_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_INFLIGHT_BODY_BYTES,
    ContextMiddleware,
    LoadBody,
)
from asgi_llm.middleware.errors import ErrorMiddleware
from asgi_llm.middleware.quota import build_quota_layer
from asgi_llm.middleware.usage import build_usage_layer
from asgi_llm.observability.middleware import build_observability_layer
from asgi_llm.providers.base import ProviderAdapter, Timeouts
from asgi_llm.providers.anthropic import AnthropicAdapter
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.providers.transport import TransportName, make_transport
from asgi_llm.middleware.failover import FailoverMiddleware, FailoverPolicy
from asgi_llm.routing.explain import explain_route
from asgi_llm.routing.health import BreakerPolicy, HealthTracker
from asgi_llm.routing.probes import HealthProber
from asgi_llm.nodes.selector import NodeSelector
from asgi_llm.routing.router import ModelRoute, Price, Router, Target

if TYPE_CHECKING:
    from asgi_llm.config import GatewayConfig

__all__ = [
    "LAYERS",
    "BuildParts",
    "Gateway",
    "LayerFactory",
    "Resource",
    "build_gateway",
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


class Gateway:
    """The composed gateway: an ASGI app that also handles its own lifespan.

    Attributes:
        app: the composed middleware stack (what HTTP requests go through).
        providers: adapter per provider name.
        router: public model → targets.
        resources: opened at startup (in order), closed at shutdown (in reverse).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        providers: Mapping[str, ProviderAdapter],
        router: Router,
        resources: Sequence[Resource] = (),
        extras: Mapping[str, Any] | None = None,
    ) -> None:
        self.app = app
        self.providers = dict(providers)
        self.router = router
        self.resources = list(resources)
        self.extras: dict[str, Any] = dict(extras or {})
        self._stack: contextlib.AsyncExitStack | None = None
        self.server_config: Any = None
        """The recipe's ``server`` section (``asgi-llm serve`` reads its connection limits)."""
        self.tune_gc = False
        """Set by ``asgi-llm serve``, which owns its process: see :func:`tune_gc_for_serving`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket" and "websocket" in self.extras:
            await self.extras["websocket"](scope, receive, send)  # /nodes/tunnel (asgi_llm.nodes)
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
    extras: Mapping[str, Any] | None = None,
    admin_routes: Sequence[BaseRoute] = (),
    node_routes: Sequence[BaseRoute] = (),
    health: HealthTracker | None = None,
) -> Gateway:
    """Compose the pipeline from ready-made parts (what :func:`build_gateway` calls).

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
    return Gateway(app, providers=providers, router=router, resources=resources, extras=extras)


@dataclass
class BuildParts:
    """What layer builders share while :func:`build_gateway` assembles a recipe.

    A builder reads ``config``, may use ``router``/``providers``/``stores``, and adds
    what it needs opened at startup to ``resources`` and its health to ``readiness``.
    ``extras`` ends up on :attr:`Gateway.extras` (admin endpoints and tests find
    stores there).
    """

    config: GatewayConfig
    router: Router
    providers: dict[str, ProviderAdapter]
    health: HealthTracker
    transport: TransportName = "auto"
    resources: list[Resource] = field(default_factory=list)
    readiness: list[ReadinessCheck] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    admin_routes: list[BaseRoute] = field(default_factory=list)
    node_routes: list[BaseRoute] = field(default_factory=list)


LayerBuilder = Callable[[BuildParts], "LayerFactory | None"]

def build_failover_layer(parts: BuildParts) -> LayerFactory:
    """Failover is always on: a plan of one target still gets the commit point and retries."""
    rc = parts.config.routing
    policy = FailoverPolicy(
        max_attempts=rc.max_attempts,
        retries_per_target=rc.retries_per_target,
        max_retry_wait_s=rc.max_retry_wait_s,
        request_timeout_s=parts.config.server.request_timeout_s,
    )
    parts.admin_routes.append(explain_route(parts.router))
    return lambda app: FailoverMiddleware(app, router=parts.router, policy=policy)


# name → builder, one per layer module (each module owns its recipe → layer mapping).
_LAYER_BUILDERS: dict[str, LayerBuilder] = {
    "observability": build_observability_layer,
    "audit": build_audit_layer,
    "auth": build_auth_layer,
    "quota": build_quota_layer,
    "usage": build_usage_layer,
    "cache": build_cache_layer,
    "failover": build_failover_layer,
}


def build_gateway(config: GatewayConfig, *, transport: TransportName = "auto", exclude: Collection[str] = ()) -> Gateway:
    """Build the gateway a recipe describes.

    Raises :class:`~asgi_llm.config.ConfigError` when settings cannot work together (a
    layer builder refuses, e.g. nodes without a key store) — refusing to start beats
    silently ignoring a setting.
    """
    rc = config.routing
    health = HealthTracker(
        BreakerPolicy(
            failure_threshold=rc.health.failure_threshold,
            cooldown_s=rc.health.cooldown_s,
            max_cooldown_s=rc.health.max_cooldown_s,
            auth_cooldown_s=rc.health.auth_cooldown_s,
        )
    )
    providers: dict[str, ProviderAdapter] = {}
    for name, p in config.providers.items():
        timeouts = Timeouts(connect=p.connect_timeout_s, attempt=p.timeout_s, ttft=p.ttft_timeout_s, idle=p.idle_timeout_s,
                            max_response_bytes=p.max_response_bytes, max_event_bytes=p.max_event_bytes)
        adapter_cls = AnthropicAdapter if p.kind == "anthropic" else OpenAIAdapter
        providers[name] = adapter_cls(
            name,
            base_url=p.base_url,
            api_keys=p.api_keys,
            timeouts=timeouts,
            headers=p.headers,
            transport=make_transport(transport, max_connections=p.max_connections, connect_timeout=p.connect_timeout_s),
            health=health,
            request_id_header=p.request_id_header,
        )
    routes = []
    for name, m in config.models.items():
        targets = tuple(
            (NodeSelector if t.nodes is not None else Target)(  # type: ignore[operator]
                t.nodes if t.nodes is not None else (t.provider or ""),
                model=t.model,
                price=Price(t.price.input, t.price.output, t.price.cached_input) if t.price else None,
                weight=t.weight,
                context_window=t.context_window,
                prefill=t.prefill,
            )
            for t in m.targets
        )
        routes.append(ModelRoute(name=name, targets=targets, strategy=m.strategy))
    router = Router(routes, rules=rc.rules, health=health, key_ids={n: a.keys.ids for n, a in providers.items()})
    parts = BuildParts(config=config, router=router, providers=providers, health=health, transport=transport)
    parts.extras["health"] = health
    parts.extras["state_url"] = config.stores.state
    if rc.health.probe_interval_s > 0:
        parts.resources.append(HealthProber(providers, health, interval_s=rc.health.probe_interval_s))
    if config.stores.state.startswith(("redis://", "rediss://")):
        # Replicas share breaker transitions (reads stay local; see routing/shared_health.py)
        # through the state store's one Redis client: the store is opened first, closed last.
        from asgi_llm.routing.shared_health import SharedHealth
        from asgi_llm.stores.state import state_store_from_url

        state = parts.extras["state"] = state_store_from_url(config.stores.state)
        parts.resources.append(state)
        parts.resources.append(SharedHealth(state.redis, health))  # type: ignore[attr-defined]
    layers: dict[str, LayerFactory] = {}
    for name, builder in _LAYER_BUILDERS.items():
        if name in exclude:
            continue
        factory = builder(parts)
        if factory is not None:
            layers[name] = factory
    from asgi_llm.nodes.build import build_nodes

    build_nodes(parts)  # BYOI nodes: registry, /nodes + /admin/nodes routes, router hooks
    gateway = compose(
        providers=parts.providers,
        router=parts.router,
        layers=layers,
        resources=parts.resources,
        readiness=parts.readiness,
        max_body_bytes=config.server.max_body_bytes,
        body_read_timeout_s=config.server.body_read_timeout_s,
        max_inflight_body_bytes=config.server.max_inflight_body_bytes,
        exclude=exclude,
        extras=parts.extras,
        admin_routes=parts.admin_routes,
        node_routes=parts.node_routes,
        health=health,
    )
    gateway.server_config = config.server
    build_console(parts, gateway)  # /console in front of the stack (asgi_llm.console)
    return gateway

