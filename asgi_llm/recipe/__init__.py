"""The recipe: the YAML schema, loading it, and building a gateway from it.

* :mod:`asgi_llm.recipe.schema` — the pydantic models of a recipe (``GatewayConfig``);
* :mod:`asgi_llm.recipe.load` — YAML, ``${VAR}`` expansion, error messages;
* :mod:`asgi_llm.recipe.build` — the composition root: ``build_gateway(config)``.
"""

from __future__ import annotations

from asgi_llm.recipe.build import build_gateway
from asgi_llm.recipe.load import config_from_dict, load_config, parse_config
from asgi_llm.recipe.schema import ConfigError, GatewayConfig

__all__ = ["ConfigError", "GatewayConfig", "build_gateway", "config_from_dict", "load_config", "parse_config"]
