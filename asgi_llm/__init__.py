"""asgi-llm: composable pure-ASGI middlewares that turn any Starlette/FastAPI app into
an OpenAI-compatible LLM gateway.

Serve a recipe with ``asgi-llm serve``; or build the gateway yourself and mount it::

    from asgi_llm import build_gateway, load_config
    gateway = build_gateway(load_config("recipes/standalone.yaml"))
    app.mount("/llm", gateway)   # plus gateway_lifespan(gateway) in your lifespan
"""

from __future__ import annotations

from asgi_llm.recipe import ConfigError, GatewayConfig, build_gateway, load_config, parse_config
from asgi_llm.context import RequestContext, Usage, get_context
from asgi_llm.dispatch import DispatchApp
from asgi_llm.errors import GatewayError
from asgi_llm.middleware.audit import AuditMiddleware
from asgi_llm.middleware.auth import AuthMiddleware
from asgi_llm.middleware.cache import CacheMiddleware
from asgi_llm.middleware.context import ContextMiddleware
from asgi_llm.middleware.errors import ErrorMiddleware
from asgi_llm.middleware.failover import FailoverMiddleware, FailoverPolicy
from asgi_llm.middleware.quota import QuotaMiddleware
from asgi_llm.middleware.usage import UsageMiddleware
from asgi_llm.providers.anthropic import AnthropicAdapter
from asgi_llm.providers.base import ProviderAdapter, Timeouts
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.providers.transport import UpstreamTransport
from asgi_llm.routing.health import HealthTracker
from asgi_llm.routing.router import ModelRoute, Router, Target
from asgi_llm.stack import Gateway, compose, gateway_lifespan

__version__ = "0.1.0"

__all__ = [
    "AnthropicAdapter",
    "AuditMiddleware",
    "AuthMiddleware",
    "CacheMiddleware",
    "ConfigError",
    "ContextMiddleware",
    "DispatchApp",
    "ErrorMiddleware",
    "FailoverMiddleware",
    "FailoverPolicy",
    "Gateway",
    "GatewayConfig",
    "GatewayError",
    "HealthTracker",
    "ModelRoute",
    "OpenAIAdapter",
    "ProviderAdapter",
    "QuotaMiddleware",
    "RequestContext",
    "Router",
    "Target",
    "Timeouts",
    "UpstreamTransport",
    "Usage",
    "UsageMiddleware",
    "build_gateway",
    "compose",
    "gateway_lifespan",
    "get_context",
    "load_config",
    "parse_config",
]
