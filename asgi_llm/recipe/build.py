"""``build_gateway()``: a recipe → a running :class:`~asgi_llm.stack.Gateway`.

The composition root. In order: the breaker, the provider adapters, the router, then
every layer — one line each, outermost first — then BYOI nodes, then
:func:`~asgi_llm.stack.compose`. Shared parts (the SQL database, the state store, the
accountant, metrics) are made once through :class:`~asgi_llm.recipe.parts.BuildParts`.
"""

from __future__ import annotations

from collections.abc import Collection

from asgi_llm.nodes.selector import NodeSelector
from asgi_llm.providers.anthropic import AnthropicAdapter
from asgi_llm.providers.base import ProviderAdapter, Timeouts
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.providers.transport import TransportName, make_transport
from asgi_llm.recipe.console import build_console
from asgi_llm.recipe.layers import (
    audit_layer,
    auth_layer,
    cache_layer,
    failover_layer,
    observability_layer,
    quota_layer,
    usage_layer,
)
from asgi_llm.recipe.nodes import build_nodes
from asgi_llm.recipe.parts import BuildParts
from asgi_llm.recipe.schema import GatewayConfig
from asgi_llm.routing.health import BreakerPolicy, HealthTracker
from asgi_llm.routing.probes import HealthProber
from asgi_llm.routing.router import ModelRoute, Router
from asgi_llm.targets import Price, Target
from asgi_llm.stack import LAYERS, Gateway, LayerFactory, compose

__all__ = ["BuildParts", "build_gateway", "build_providers", "build_router"]


def build_providers(config: GatewayConfig, health: HealthTracker, transport: TransportName) -> dict[str, ProviderAdapter]:
    """One adapter per ``providers:`` entry, of the wire format its ``kind`` names."""
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
    return providers


def build_router(config: GatewayConfig, health: HealthTracker, providers: dict[str, ProviderAdapter]) -> Router:
    """The ``models:`` section → a :class:`~asgi_llm.routing.router.Router`."""
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
    return Router(routes, rules=config.routing.rules, health=health,
                  key_ids={n: a.keys.ids for n, a in providers.items()})


def build_gateway(config: GatewayConfig, *, transport: TransportName = "auto", exclude: Collection[str] = ()) -> Gateway:
    """Build the gateway a recipe describes.

    Raises :class:`~asgi_llm.recipe.schema.ConfigError` when settings cannot work together
    (a layer builder refuses, e.g. nodes without a key store) — refusing to start beats
    silently ignoring a setting.
    """
    unknown = set(exclude) - set(LAYERS)
    if unknown:
        raise ValueError(f"unknown layer(s) {sorted(unknown)}; layers are {', '.join(LAYERS)}")
    rc = config.routing
    health = HealthTracker(BreakerPolicy(failure_threshold=rc.health.failure_threshold, cooldown_s=rc.health.cooldown_s,
                                         max_cooldown_s=rc.health.max_cooldown_s,
                                         auth_cooldown_s=rc.health.auth_cooldown_s))
    providers = build_providers(config, health, transport)
    router = build_router(config, health, providers)
    parts = BuildParts(config=config, router=router, providers=providers, health=health, transport=transport)
    parts.services.health = health
    parts.services.state_url = config.stores.state
    if rc.health.probe_interval_s > 0:
        parts.resources.append(HealthProber(providers, health, interval_s=rc.health.probe_interval_s))
    if config.stores.state.startswith(("redis://", "rediss://")):
        # Replicas share breaker transitions (reads stay local; see routing/shared_health.py)
        # through the state store's one Redis client: the store is opened first, closed last.
        from asgi_llm.routing.shared_health import SharedHealth

        state = parts.state_store()
        parts.resources.append(SharedHealth(state.redis, health))  # type: ignore[attr-defined]

    def on(name: str) -> bool:
        return name not in exclude

    # Every layer, outermost first (errors and context frame them all: see compose()).
    layers: dict[str, LayerFactory | None] = {}
    layers["observability"] = observability_layer(parts) if on("observability") else None
    layers["audit"] = audit_layer(parts) if on("audit") else None
    layers["auth"] = auth_layer(parts) if on("auth") else None
    layers["quota"] = quota_layer(parts) if on("quota") else None
    layers["usage"] = usage_layer(parts) if on("usage") else None
    layers["cache"] = cache_layer(parts) if on("cache") else None
    layers["failover"] = failover_layer(parts) if on("failover") else None
    build_nodes(parts)  # BYOI nodes: registry, /nodes + /admin/nodes routes, router hooks

    gateway = compose(
        providers=parts.providers,
        router=parts.router,
        layers={name: factory for name, factory in layers.items() if factory is not None},
        resources=parts.resources,
        readiness=parts.readiness,
        max_body_bytes=config.server.max_body_bytes,
        body_read_timeout_s=config.server.body_read_timeout_s,
        max_inflight_body_bytes=config.server.max_inflight_body_bytes,
        exclude=exclude,
        services=parts.services,
        websocket=parts.websocket,
        admin_routes=parts.admin_routes,
        node_routes=parts.node_routes,
        health=health,
    )
    gateway.server_config = config.server
    gateway.log_json = config.observability.log_json
    build_console(parts, gateway)  # /console in front of the stack (asgi_llm.console)
    return gateway
