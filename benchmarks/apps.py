"""uvicorn factories for gateway rows that ``asgi-llm serve`` cannot express, and the
helper that names the layers a built gateway really has.

    BENCH_RECIPE=recipe.yaml uvicorn --factory benchmarks.apps:dispatch_only --port 8001
"""

from __future__ import annotations

import os
from typing import Any

from asgi_llm.stack import LAYERS, Gateway, build_gateway

__all__ = ["OPTIONAL_LAYERS", "dispatch_only", "layer_chain", "layer_names"]

OPTIONAL_LAYERS: frozenset[str] = frozenset(LAYERS) - {"errors", "context"}
"""Everything ``compose()`` may drop: what the "dispatch only" row leaves out."""


def dispatch_only() -> Gateway:
    """The recipe's gateway with every optional layer excluded (errors + context + dispatch)."""
    from asgi_llm.config import load_config

    gateway = build_gateway(load_config(os.environ["BENCH_RECIPE"]), exclude=OPTIONAL_LAYERS)
    gateway.tune_gc = True  # as `asgi-llm serve` does for the full rows
    return gateway


def layer_chain(gateway: Any) -> list[Any]:
    """The app objects from the outermost layer to the innermost endpoint, by walking
    ``.app`` (middlewares) and ``.inference`` (:class:`GatewayEndpoints`)."""
    chain: list[Any] = []
    node = gateway.app if isinstance(gateway, Gateway) else gateway
    seen: set[int] = set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        chain.append(node)
        node = getattr(node, "app", None) or getattr(node, "inference", None)
    return chain


def _short(obj: Any) -> str:
    name = type(obj).__name__
    for suffix in ("Middleware", "App"):
        if name.endswith(suffix) and name != suffix:
            name = name[: -len(suffix)]
    return {"Error": "errors", "Context": "context", "GatewayEndpoints": "endpoints"}.get(name, name.lower())


def layer_names(gateway: Any) -> list[str]:
    """Short names of the layers present, outermost first, e.g. ``errors → context → endpoints → dispatch``."""
    return [_short(obj) for obj in layer_chain(gateway)]
