"""Prices: what an attempt's tokens cost, in USD (:class:`~decimal.Decimal`).

Sources, first match wins, and each row records which one priced it:

1. ``recipe`` — the target's ``price`` in the recipe (USD per 1M tokens);
2. ``override`` — ``usage.prices`` in the recipe, keyed by route (``provider/model``,
   ``node/model``) or by upstream model name: the place for nodes and custom models;
3. ``genai-prices`` — the bundled price table of the ``genai-prices`` package, looked
   up by upstream model (and the response model), **offline**: it is never updated at
   run time;
4. ``unpriced`` — cost 0, so reports show which traffic has no price.

Token semantics follow OpenAI: ``prompt_tokens`` includes ``cached_tokens`` and
``completion_tokens`` includes ``reasoning_tokens``; cached prompt tokens use the
cached-input price when there is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from asgi_llm.context import Usage
from asgi_llm.routing.router import Price

__all__ = ["PriceQuote", "Pricer", "cost_of"]

MILLION = Decimal(1_000_000)
_MISSING = object()


@dataclass(frozen=True, slots=True)
class PriceQuote:
    """A cost and the source that priced it."""

    cost: Decimal
    source: str


def cost_of(price: Price, usage: Usage) -> Decimal:
    """Cost in USD of ``usage`` at ``price`` (USD per 1M tokens)."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cached_price = price.cached_input if price.cached_input is not None else price.input
    total = (
        (usage.prompt_tokens - cached) * price.input
        + cached * cached_price
        + usage.completion_tokens * price.output
    )
    return total / MILLION


class Pricer:
    """Prices usage for a target.

    Args:
        overrides: ``usage.prices`` from the recipe: route or model name → :class:`Price`.
        use_genai_prices: fall back to the bundled ``genai-prices`` table.

    Example:
        >>> Pricer().quote(target_price=Price(Decimal("0.15"), Decimal("0.6")), route="a/m",
        ...                model="m", usage=Usage(prompt_tokens=10, completion_tokens=5))
        PriceQuote(cost=Decimal('0.0000045'), source='recipe')
    """

    def __init__(self, overrides: Mapping[str, Price] | None = None, *, use_genai_prices: bool = True) -> None:
        self.overrides = dict(overrides or {})
        self.use_genai_prices = use_genai_prices
        self._lookups: dict[tuple[str, str | None], Any] = {}

    def quote(
        self,
        *,
        target_price: Price | None,
        route: str,
        model: str,
        usage: Usage | None,
        response_model: str | None = None,
        provider: str | None = None,
    ) -> PriceQuote:
        """The cost of ``usage`` on this target, and which source priced it."""
        if usage is None or (usage.prompt_tokens == 0 and usage.completion_tokens == 0):
            source = "recipe" if target_price is not None else ("override" if self._override(route, model) else "unpriced")
            return PriceQuote(Decimal(0), source)
        if target_price is not None:
            return PriceQuote(cost_of(target_price, usage), "recipe")
        override = self._override(route, model)
        if override is not None:
            return PriceQuote(cost_of(override, usage), "override")
        if self.use_genai_prices:
            for name in dict.fromkeys(n for n in (model, response_model) if n):
                cost = self._genai_price(name, provider, usage)
                if cost is not None:
                    return PriceQuote(cost, "genai-prices")
        return PriceQuote(Decimal(0), "unpriced")

    def _override(self, route: str, model: str) -> Price | None:
        return self.overrides.get(route) or self.overrides.get(model)

    def _genai_price(self, model: str, provider: str | None, usage: Usage) -> Decimal | None:
        key = (model, provider)
        found = self._lookups.get(key, _MISSING)
        if found is _MISSING:
            found = self._lookups[key] = _lookup(model, provider)
        if found is None:
            return None
        gp_provider, gp_model = found
        from genai_prices import Usage as GPUsage

        gp_usage = GPUsage(
            input_tokens=usage.prompt_tokens,
            cache_read_tokens=min(usage.cached_tokens, usage.prompt_tokens) or None,
            output_tokens=usage.completion_tokens,
        )
        try:
            return Decimal(gp_model.calc_price(gp_usage, gp_provider).total_price)
        except Exception:  # noqa: BLE001 - an odd price entry must not break metering
            return None


def _lookup(model: str, provider: str | None) -> tuple[Any, Any] | None:
    try:
        from genai_prices import data_snapshot
    except ImportError:  # pragma: no cover - genai-prices is a dependency
        return None
    snapshot = data_snapshot.get_snapshot()
    for provider_id in ([provider, None] if provider else [None]):
        try:
            return snapshot.find_provider_model(model, None, provider_id, None)  # type: ignore[no-any-return]
        except (LookupError, ValueError):
            continue
    return None
