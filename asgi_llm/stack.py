"""``build_gateway()``: the one place the pipeline is composed.

The fixed order, outermost first::

    ErrorMiddleware → ContextMiddleware → [Audit → Auth → Quota → Usage → Cache → Failover]
        → GatewayEndpoints → DispatchApp → ProviderAdapter

Layers in brackets join as they are built; a recipe or a caller may drop layers
(``exclude=``) but never reorder them. :class:`Gateway` is the resulting ASGI app: it
answers ``lifespan`` itself (opening and closing connection pools), and
:func:`gateway_lifespan` does the same for host apps that mount it, since mounted
sub-apps get no lifespan events.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_llm.dispatch import DispatchApp
from asgi_llm.endpoints import GatewayEndpoints, ReadinessCheck
from asgi_llm.middleware.context import DEFAULT_MAX_BODY_BYTES, ContextMiddleware
from asgi_llm.middleware.errors import ErrorMiddleware
from asgi_llm.providers.base import ProviderAdapter, Timeouts
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.providers.transport import TransportName, make_transport
from asgi_llm.routing.router import ModelRoute, Price, Router, Target

if TYPE_CHECKING:
    from asgi_llm.config import GatewayConfig

__all__ = ["LAYERS", "Gateway", "build_gateway", "compose", "gateway_lifespan"]

LAYERS: tuple[str, ...] = ("errors", "context", "audit", "auth", "quota", "usage", "cache", "failover")
"""Every layer's name, outermost first. The order is fixed."""

_AVAILABLE = frozenset({"errors", "context"})


class Gateway:
    """The composed gateway: an ASGI app that also handles its own lifespan.

    Attributes:
        app: the composed middleware stack (what HTTP requests go through).
        providers: adapter per provider name.
        router: public model → targets.
    """

    def __init__(self, app: ASGIApp, *, providers: Mapping[str, ProviderAdapter], router: Router) -> None:
        self.app = app
        self.providers = dict(providers)
        self.router = router
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.app(scope, receive, send)

    async def startup(self) -> None:
        """Open resources. Connection pools open lazily, so this is cheap and idempotent."""
        self._started = True

    async def shutdown(self) -> None:
        """Close every provider's connection pool."""
        for adapter in self.providers.values():
            await adapter.aclose()
        self._started = False

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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    readiness: Sequence[ReadinessCheck] = (),
    exclude: Collection[str] = (),
) -> Gateway:
    """Compose the pipeline from ready-made parts (what :func:`build_gateway` calls).

    ``exclude`` drops layers by name (see :data:`LAYERS`); ``errors`` and ``context``
    cannot be dropped from a full gateway.
    """
    unknown = set(exclude) - set(LAYERS)
    if unknown:
        raise ValueError(f"unknown layer(s) {sorted(unknown)}; layers are {', '.join(LAYERS)}")
    if {"errors", "context"} & set(exclude):
        raise ValueError("the 'errors' and 'context' layers are the gateway's frame and cannot be excluded")
    inference: ASGIApp = DispatchApp(providers=providers, router=router)
    app: ASGIApp = GatewayEndpoints(inference=inference, router=router, readiness=readiness)
    app = ContextMiddleware(app, max_body_bytes=max_body_bytes)
    app = ErrorMiddleware(app)
    return Gateway(app, providers=providers, router=router)


def build_gateway(config: GatewayConfig, *, transport: TransportName = "auto", exclude: Collection[str] = ()) -> Gateway:
    """Build the gateway a recipe describes.

    Raises :class:`~asgi_llm.config.ConfigError` for settings this version cannot honour
    — refusing to start beats silently ignoring, say, an API-key list.
    """
    from asgi_llm.config import ConfigError

    problems = _unsupported(config)
    if problems:
        raise ConfigError(problems)
    providers: dict[str, ProviderAdapter] = {}
    for name, p in config.providers.items():
        timeouts = Timeouts(connect=p.connect_timeout_s, attempt=p.timeout_s, ttft=p.ttft_timeout_s, idle=p.idle_timeout_s)
        providers[name] = OpenAIAdapter(
            name,
            base_url=p.base_url,
            api_keys=p.api_keys,
            timeouts=timeouts,
            headers=p.headers,
            transport=make_transport(transport, max_connections=p.max_connections, connect_timeout=p.connect_timeout_s),
        )
    routes = []
    for name, m in config.models.items():
        targets = tuple(
            Target(
                provider=t.provider or "",
                model=t.model,
                price=Price(t.price.input, t.price.output, t.price.cached_input) if t.price else None,
                weight=t.weight,
                context_window=t.context_window,
            )
            for t in m.targets
        )
        routes.append(ModelRoute(name=name, targets=targets, strategy=m.strategy))
    return compose(
        providers=providers,
        router=Router(routes),
        max_body_bytes=config.server.max_body_bytes,
        exclude=exclude,
    )


def _unsupported(config: GatewayConfig) -> list[tuple[str, str]]:
    """Recipe settings that this build accepts in the schema but cannot enforce yet."""
    out: list[tuple[str, str]] = []
    for name, p in config.providers.items():
        if p.kind != "openai":
            out.append((f"providers.{name}.kind", f"provider kind '{p.kind}' is not available in this version (only 'openai')"))
    for name, m in config.models.items():
        if m.strategy != "priority":
            out.append((f"models.{name}.strategy", f"strategy '{m.strategy}' is not available in this version (only 'priority')"))
        for i, t in enumerate(m.targets):
            if t.nodes is not None:
                out.append((f"models.{name}.targets[{i}].nodes", "node targets are not available in this version"))
    if config.auth.keys or config.auth.admin_keys:
        out.append(("auth", "API keys are not enforced by this version; remove them rather than run unprotected believing otherwise"))
    if any(v is not None for v in config.limits.org.model_dump().values()):
        out.append(("limits.org", "limits are not enforced by this version"))
    if config.cache.enabled:
        out.append(("cache.enabled", "the response cache is not available in this version"))
    return out
