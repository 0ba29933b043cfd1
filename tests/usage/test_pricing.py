"""Pricing: recipe prices, overrides, genai-prices (offline), unpriced."""

from __future__ import annotations

from decimal import Decimal

from asgi_llm.context import Usage
from asgi_llm.routing.router import Price
from asgi_llm.usage.accounting import Pricer, cost_of

P = Price(Decimal("0.15"), Decimal("0.60"))


class TestPricer:
    def test_recipe_price_wins(self) -> None:
        """The target's recipe price is used first, exactly."""
        q = Pricer().quote(target_price=P, route="a/gpt-4o-mini", model="gpt-4o-mini",
                           usage=Usage(prompt_tokens=1000, completion_tokens=100))
        assert q.source == "recipe" and q.cost == Decimal("0.00021")

    def test_cached_tokens_use_cached_price(self) -> None:
        """Cached prompt tokens are charged at the cached-input price (prompt includes cached)."""
        price = Price(Decimal("1"), Decimal("2"), Decimal("0.5"))
        assert cost_of(price, Usage(prompt_tokens=1000, cached_tokens=400, completion_tokens=10)) == Decimal("0.00082")
        assert cost_of(P, Usage(prompt_tokens=1000, cached_tokens=400)) == Decimal("0.00015")

    def test_override_by_route_then_model(self) -> None:
        """usage.prices overrides price nodes and custom models by route or name."""
        pricer = Pricer({"node:box/llama3": Price(Decimal("0.01"), Decimal("0.02")), "custom": P})
        q = pricer.quote(target_price=None, route="node:box/llama3", model="llama3", usage=Usage(1_000_000, 0))
        assert (q.source, q.cost) == ("override", Decimal("0.01"))
        assert pricer.quote(target_price=None, route="x/custom", model="custom", usage=Usage(0, 1_000_000)).cost == Decimal("0.6")

    def test_genai_prices_offline(self) -> None:
        """A well-known model without a recipe price is priced from the bundled genai-prices table."""
        q = Pricer().quote(target_price=None, route="openai/gpt-4o-mini", model="gpt-4o-mini", provider="openai",
                           usage=Usage(prompt_tokens=1000, completion_tokens=100))
        assert q.source == "genai-prices" and q.cost == Decimal("0.00021")

    def test_unknown_model_is_unpriced(self) -> None:
        """No price anywhere: cost 0, source 'unpriced'."""
        q = Pricer().quote(target_price=None, route="x/zz-unknown", model="zz-unknown-model-9", usage=Usage(10, 10))
        assert (q.cost, q.source) == (Decimal(0), "unpriced")

    def test_zero_usage_costs_nothing(self) -> None:
        """A failed attempt with no tokens costs 0."""
        assert Pricer().quote(target_price=P, route="a/m", model="m", usage=Usage()).cost == 0
