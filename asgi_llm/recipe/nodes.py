"""Recipe → node registry, node API, admin routes, router hooks (called by ``build_gateway``)."""

from __future__ import annotations

from asgi_llm.providers.base import Timeouts
from asgi_llm.recipe.parts import BuildParts
from asgi_llm.recipe.schema import ConfigError
from asgi_llm.targets import NodeTargets

__all__ = ["build_nodes"]


def build_nodes(parts: BuildParts) -> None:
    """Wire BYOI nodes into the gateway being built.

    Needs the auth layer (enrollment tokens are made with admin keys, and the key ring's
    pepper hashes node secrets). Adds: the registry (a resource), ``/nodes/...`` and
    ``/admin/nodes…`` routes, the router's ``node_resolver`` and ``extra_load``, a
    provider table that finds node adapters, and the ``/nodes/tunnel`` WebSocket handler
    (``parts.websocket``).
    """
    cfg = parts.config.nodes
    has_node_targets = any(isinstance(t, NodeTargets) for name in parts.router.model_names()
                           for t in (parts.router.get(name).targets if parts.router.get(name) else ()))
    ring = parts.services.keyring
    if not cfg.enabled or ring is None:
        if has_node_targets:
            why = "nodes.enabled is false" if not cfg.enabled else "auth is off (no auth.admin_keys / auth.keys)"
            raise ConfigError([("nodes", f"models use node targets but {why}: nodes enroll with tokens made by an admin key")])
        return
    if ring.store is None:
        raise ConfigError([("auth.keys_from_db", "BYOI nodes keep their records in stores.ledger; keys_from_db must be true")])
    from asgi_llm.admin.nodes import node_admin_routes
    from asgi_llm.nodes.consent import recipe_rules
    from asgi_llm.nodes.netpolicy import NetworkPolicy
    from asgi_llm.nodes.registry import NodeProviders, NodeRegistry
    from asgi_llm.nodes.routes import node_routes
    from asgi_llm.nodes.service import NodeService
    from asgi_llm.nodes.store import SQLNodeStore
    from asgi_llm.nodes.tunnel import serve_tunnel

    store = SQLNodeStore(parts.sql())
    registry = NodeRegistry(
        store,
        pepper=lambda: ring.pepper,
        window_s=cfg.heartbeat_window_s,
        interval_s=cfg.heartbeat_interval_s,
        timeouts=Timeouts(connect=cfg.connect_timeout_s, attempt=cfg.timeout_s, ttft=cfg.ttft_timeout_s, idle=cfg.idle_timeout_s),
        transport=parts.transport,
        health=parts.health,
        policy=NetworkPolicy.from_config(cfg.allowed_networks),
        accept_shared=recipe_rules(cfg.accept_shared),
        request_id_header=cfg.request_id_header,
    )
    service = NodeService(store, registry, cfg, reserved_names=set(parts.providers))
    parts.resources.append(registry)
    if parts.config.stores.state.startswith(("redis://", "rediss://")):
        # Replicas share who is alive (direct-mode nodes); see asgi_llm/nodes/shared.py.
        from asgi_llm.nodes.shared import SharedNodeLiveness

        parts.resources.append(SharedNodeLiveness(parts.state_store().redis, registry))  # type: ignore[attr-defined]  # the state store's client
    parts.services.nodes = service
    parts.node_routes.extend(node_routes(service))
    parts.admin_routes.extend(node_admin_routes(service, ledger=parts.services.ledger_store))
    parts.router.node_resolver = registry.resolve
    if cfg.auto_models:
        parts.router.auto_models = registry.advertised  # point-and-enroll: advertised names become routable
    previous = parts.router.extra_load
    if previous is None:
        parts.router.extra_load = registry.extra_load
    else:
        parts.router.extra_load = lambda t: previous(t) + registry.extra_load(t)
    parts.providers = NodeProviders(parts.providers, registry)

    if cfg.tunnel:
        async def websocket(scope, receive, send):  # type: ignore[no-untyped-def]
            if not scope.get("path", "").endswith("/nodes/tunnel"):
                await receive()
                await send({"type": "websocket.close", "code": 4404})
                return
            await serve_tunnel(scope, receive, send, authenticate=service.try_authenticate,
                               attach=registry.attach_tunnel, detach=registry.detach_tunnel)

        parts.websocket = websocket
