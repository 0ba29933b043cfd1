"""Validation of everything a node or an admin sends about a node.

Values are bounded and checked before they reach the store, a log, the router or
another tenant: a bad value is a 400 in the API's error shape with a message saying
what is allowed. Heartbeat load figures are the exception: they are advisory, so
out-of-range ones are clamped and garbage dropped rather than failing the heartbeat
(a failing heartbeat would take the node out of routing).
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from typing import Any

from asgi_llm.errors import InvalidRequestError

__all__ = [
    "MAX_PRICE_USD_PER_M",
    "parse_labels",
    "parse_load",
    "parse_models",
    "parse_price",
]

MAX_PRICE_USD_PER_M = Decimal(10_000)
"""The highest node price (USD per 1M tokens, input or output) anyone may set."""

_MAX_LABELS = 32
_MAX_LABEL_KEY = 63
_MAX_LABEL_VALUE = 256
_MAX_MODELS = 1000
_MAX_MODEL_ID = 200
_MAX_CONTEXT = 100_000_000
_LOAD_KEYS = {"in_flight": 1e6, "queue_depth": 1e6, "running": 1e6, "kv_cache_usage": 1.0}


def _decimal(value: Any, param: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str) or (isinstance(value, str) and len(value) > 40):
        raise InvalidRequestError(f"'{param}' must be a number of USD per 1M tokens.", param=param)
    try:
        d = Decimal(str(value).strip())
    except InvalidOperation:
        raise InvalidRequestError(f"'{param}' must be a number of USD per 1M tokens.", param=param) from None
    if not d.is_finite():
        raise InvalidRequestError(f"'{param}' must be a finite number (not NaN or Infinity).", param=param)
    if d < 0 or d > MAX_PRICE_USD_PER_M:
        raise InvalidRequestError(f"'{param}' must be between 0 and {MAX_PRICE_USD_PER_M} USD per 1M tokens.", param=param)
    d = d.normalize()
    if d.as_tuple().exponent < -12:  # type: ignore[operator]
        d = d.quantize(Decimal("1e-12"))
    return d if d != 0 else Decimal(0)


def parse_price(raw: Any, *, param: str = "price") -> dict[str, str]:
    """``{input, output}`` USD per 1M tokens → finite decimal strings in [0, 10,000]."""
    if not isinstance(raw, dict) or not raw or set(raw) - {"input", "output"}:
        raise InvalidRequestError(f"'{param}' must be {{\"input\": <USD per 1M>, \"output\": <USD per 1M>}}.", param=param)
    values = {k: _decimal(v, f"{param}.{k}") for k, v in raw.items()}
    return {"input": f"{values.get('input', Decimal(0)):f}", "output": f"{values.get('output', Decimal(0)):f}"}


def parse_optional_price(raw: Any) -> dict[str, str] | None:
    """A node price that may be absent (``None``)."""
    return None if raw is None else parse_price(raw)


def parse_labels(raw: Any) -> dict[str, str]:
    """At most 32 ``key: value`` strings (keys ≤ 63, values ≤ 256 printable characters)."""
    if raw is None:
        return {}
    if (not isinstance(raw, dict) or len(raw) > _MAX_LABELS
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items())):
        raise InvalidRequestError(f"'labels' must be an object of at most {_MAX_LABELS} strings.", param="labels")
    for k, v in raw.items():
        if not k or len(k) > _MAX_LABEL_KEY or len(v) > _MAX_LABEL_VALUE or not (k + v).isprintable() or "," in k + v or "=" in k:
            raise InvalidRequestError(f"label keys must be 1-{_MAX_LABEL_KEY} and values at most {_MAX_LABEL_VALUE} printable "
                                      "characters, without ',' (and keys without '=').", param="labels")
    return dict(raw)


def parse_models(raw: Any) -> list[dict[str, Any]]:
    """The models a node advertises: ``[{id, context_length?, …}]`` (or bare ids)."""
    if not isinstance(raw, list) or len(raw) > _MAX_MODELS:
        raise InvalidRequestError(f"'models' must be a list of at most {_MAX_MODELS} {{id, ...}} objects.", param="models")
    out = []
    for m in raw:
        if isinstance(m, str):
            m = {"id": m}
        if (not isinstance(m, dict) or not isinstance(m.get("id"), str) or not m["id"]
                or len(m["id"]) > _MAX_MODEL_ID or not m["id"].isprintable()):
            raise InvalidRequestError(f"each of 'models' needs a string 'id' of 1-{_MAX_MODEL_ID} printable characters.",
                                      param="models")
        keep: dict[str, Any] = {"id": m["id"]}
        ctx = m.get("context_length")
        if isinstance(ctx, int) and not isinstance(ctx, bool) and 0 < ctx <= _MAX_CONTEXT:
            keep["context_length"] = ctx
        for flag in ("tools", "embeddings"):
            if isinstance(m.get(flag), bool):
                keep[flag] = m[flag]
        owned = m.get("owned_by")
        if isinstance(owned, str) and len(owned) <= _MAX_MODEL_ID and owned.isprintable():
            keep["owned_by"] = owned
        out.append(keep)
    return out


def parse_load(raw: Any) -> dict[str, float]:
    """Heartbeat load: the known gauges only, finite, clamped to their range."""
    if not isinstance(raw, dict):
        return {}
    out: dict[str, float] = {}
    for key, top in _LOAD_KEYS.items():
        v = raw.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        try:
            f = float(v)
        except OverflowError:  # an int beyond float range
            f = math.inf
        if math.isnan(f):
            continue
        out[key] = min(max(f, 0.0), top)
    return out
