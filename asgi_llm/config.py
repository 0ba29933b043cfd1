"""Compatibility re-exports: the recipe now lives in :mod:`asgi_llm.recipe`.

``from asgi_llm.config import GatewayConfig, load_config`` keeps working; new code
imports from :mod:`asgi_llm.recipe.schema` / :mod:`asgi_llm.recipe.load`.
"""

from __future__ import annotations

from asgi_llm.recipe.load import config_from_dict, load_config, parse_config
from asgi_llm.recipe.schema import (
    AuthConfig,
    CacheConfig,
    CacheRuleConfig,
    ConfigError,
    ConsoleConfig,
    GatewayConfig,
    KeyLimits,
    LimitsConfig,
    ModelConfig,
    NodesConfig,
    ObservabilityConfig,
    OtelConfig,
    PriceConfig,
    ProviderConfig,
    RoutingConfig,
    RoutingRule,
    ServerConfig,
    StaticKey,
    StoresConfig,
    TargetConfig,
    UsageConfig,
)

Price = PriceConfig  # the recipe's price entry; asgi_llm.targets.Price is the router's

__all__ = [
    "AuthConfig",
    "CacheConfig",
    "CacheRuleConfig",
    "ConfigError",
    "ConsoleConfig",
    "GatewayConfig",
    "KeyLimits",
    "LimitsConfig",
    "ModelConfig",
    "NodesConfig",
    "ObservabilityConfig",
    "OtelConfig",
    "Price",
    "PriceConfig",
    "ProviderConfig",
    "RoutingConfig",
    "RoutingRule",
    "ServerConfig",
    "StaticKey",
    "StoresConfig",
    "TargetConfig",
    "UsageConfig",
    "config_from_dict",
    "load_config",
    "parse_config",
]
