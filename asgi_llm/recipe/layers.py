"""Recipe section → layer: one builder per layer of :data:`~asgi_llm.stack.LAYERS`.

Each builder reads its part of the recipe, makes (or reuses, through
:class:`~asgi_llm.recipe.parts.BuildParts`) the stores and writers it needs, registers its
admin routes, and returns the factory that wraps the inner app — or ``None`` when the
recipe leaves the layer off. The middleware modules themselves take plain constructor
arguments and know nothing of the recipe.
"""

from __future__ import annotations

from asgi_llm.recipe.parts import BuildParts
from asgi_llm.recipe.schema import ConfigError
from asgi_llm.stack import LayerFactory

__all__ = [
    "audit_layer",
    "auth_layer",
    "cache_layer",
    "failover_layer",
    "observability_layer",
    "quota_layer",
    "usage_layer",
]


def observability_layer(parts: BuildParts) -> LayerFactory:
    """Log binding, request spans and ``/metrics`` (see ``observability`` in the recipe).

    Logging itself is configured by ``asgi-llm serve`` (``observability.log_json``), not
    here: building a gateway inside a host app leaves the host's logging alone.
    """
    from asgi_llm.observability import logs
    from asgi_llm.observability.middleware import ObservabilityMiddleware

    cfg = parts.config.observability
    metrics, tracer = parts.observability()
    logs.prepare()
    return lambda app: ObservabilityMiddleware(app, metrics=metrics, tracer=tracer, log_requests=cfg.log_json)


def audit_layer(parts: BuildParts) -> LayerFactory | None:
    """``usage.audit`` → the audit writer (a resource), admin audit routes, the layer."""
    if not parts.config.usage.audit:
        return None
    from asgi_llm.admin.audit import audit_routes
    from asgi_llm.audit.chain import AuditEvent, bounded, quarantine_placeholder
    from asgi_llm.audit.store import SQLAuditStore
    from asgi_llm.middleware.audit import AuditMiddleware

    store = SQLAuditStore(parts.sql())
    writer = parts.writer("audit", sink=store.append_many, encode=AuditEvent.to_json, decode=AuditEvent.from_json,
                          normalise=bounded, substitute=quarantine_placeholder)
    parts.services.audit_store = store
    parts.services.audit_writer = writer
    metrics, _tracer = parts.observability()
    if metrics is not None:
        metrics.watch_writer(writer)
    parts.admin_routes.extend(audit_routes(store, writer))
    return lambda app: AuditMiddleware(app, sink=writer.put)


def auth_layer(parts: BuildParts) -> LayerFactory | None:
    """The recipe's ``auth`` section → an auth layer (``None``: no keys configured, no auth).

    Auth is on when the recipe declares ``auth.admin_keys`` or ``auth.keys``. With
    ``auth.keys_from_db`` (default) keys created through the admin API are accepted too;
    they live in the SQL store at ``stores.ledger``, shared with the ledger.
    """
    auth = parts.config.auth
    if not (auth.admin_keys or auth.keys):
        return None
    from asgi_llm.admin.keys import key_routes
    from asgi_llm.auth.keyring import KeyRing
    from asgi_llm.auth.store import SQLKeyStore
    from asgi_llm.middleware.auth import AuthMiddleware

    problems: list[tuple[str, str]] = []
    names: dict[str, int] = {}
    for i, k in enumerate(auth.keys):
        if k.name is not None:
            if k.name in names:
                problems.append((f"auth.keys[{i}].name", f"duplicate key name (same as auth.keys[{names[k.name]}].name)"))
            names.setdefault(k.name, i)
        for model in k.model_limits:
            if model not in parts.config.models:
                problems.append((f"auth.keys[{i}].model_limits", f"unknown model {model!r}"))
    store = SQLKeyStore(parts.sql()) if auth.keys_from_db else None
    try:
        ring = KeyRing.from_config(auth, store=store)
    except ValueError as exc:
        problems.append(("auth.pepper", str(exc)))
    if problems:
        raise ConfigError(problems)
    parts.resources.append(ring)
    parts.services.keyring = ring
    parts.admin_routes.extend(key_routes(ring, model_names=parts.router.model_names()))
    return lambda app: AuthMiddleware(app, keys=ring)


def quota_layer(parts: BuildParts) -> LayerFactory | None:
    """The recipe's limits → a quota layer on ``stores.state``.

    On when auth is configured (keys may carry limits, stored ones included) or
    ``limits.org`` sets any limit.
    """
    from asgi_llm.middleware.quota import QuotaMiddleware

    config = parts.config
    org = config.limits.org
    org_limits = org if any(v is not None for v in org.model_dump().values()) else None
    if not (config.auth.admin_keys or config.auth.keys or org_limits is not None):
        return None
    store = parts.state_store()
    if config.stores.state_failure == "closed":  # failing open, a store outage does not make us unready
        parts.readiness.append(store.ping)
    accountant = parts.accountant()
    router = parts.router
    return lambda app: QuotaMiddleware(
        app,
        store=store,
        router=router,
        org_limits=org_limits,
        failure=config.stores.state_failure,
        default_max_tokens=config.limits.default_max_tokens,
        lease_s=config.server.request_timeout_s + 60,
        accountant=accountant,
    )


def usage_layer(parts: BuildParts) -> LayerFactory | None:
    """``usage.enabled`` → the ledger writer (a resource), admin usage routes, the layer."""
    cfg = parts.config.usage
    if not cfg.enabled:
        return None
    from asgi_llm.admin.usage import usage_routes
    from asgi_llm.middleware.usage import UsageMiddleware
    from asgi_llm.usage.records import LedgerRow, bounded
    from asgi_llm.usage.store import SQLLedgerStore

    store = SQLLedgerStore(parts.sql())
    writer = parts.writer("ledger", sink=store.insert_many, encode=LedgerRow.to_json, decode=LedgerRow.from_json,
                          normalise=bounded)
    parts.services.ledger_store = store
    parts.services.ledger_writer = writer
    metrics, tracer = parts.observability()
    if metrics is not None:
        metrics.watch_writer(writer)
    accountant = parts.accountant()
    parts.admin_routes.extend(usage_routes(store, writer))
    return lambda app: UsageMiddleware(
        app, sink=writer.put, accountant=accountant, metrics=metrics, tracer=tracer,
        prompt_content_orgs=cfg.prompt_content_orgs,
    )


def cache_layer(parts: BuildParts) -> LayerFactory | None:
    """The recipe's ``cache:`` section → the cache layer, its store and its admin route."""
    from asgi_llm.admin.cache import cache_admin_routes
    from asgi_llm.cache.policy import CachePolicy
    from asgi_llm.middleware.cache import CacheMiddleware
    from asgi_llm.stores.cache import cache_store_from_url

    cfg = parts.config.cache
    policy = CachePolicy.from_config(cfg)
    if not policy.may_cache_anything:
        return None
    store = cache_store_from_url(parts.config.stores.cache, max_entries=cfg.max_entries, max_bytes=cfg.max_bytes)
    parts.resources.append(store)
    parts.services.cache_store = store
    parts.admin_routes.extend(cache_admin_routes(store))
    router = parts.router
    return lambda app: CacheMiddleware(app, store=store, policy=policy, router=router)


def failover_layer(parts: BuildParts) -> LayerFactory:
    """Failover is always on: a plan of one target still gets the commit point and retries."""
    from asgi_llm.middleware.failover import FailoverMiddleware, FailoverPolicy
    from asgi_llm.admin.explain import explain_route

    rc = parts.config.routing
    policy = FailoverPolicy(
        max_attempts=rc.max_attempts,
        retries_per_target=rc.retries_per_target,
        max_retry_wait_s=rc.max_retry_wait_s,
        request_timeout_s=parts.config.server.request_timeout_s,
    )
    parts.admin_routes.append(explain_route(parts.router))
    router = parts.router
    return lambda app: FailoverMiddleware(app, router=router, policy=policy)
