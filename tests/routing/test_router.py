"""Router: strategies, rules, overrides, health filtering."""

from __future__ import annotations

import json
import random
from collections import Counter
from decimal import Decimal

import pytest

from asgi_llm.config import RoutingRule
from asgi_llm.context import Principal, RequestContext
from asgi_llm.errors import InvalidRequestError, ModelNotFoundError, RateLimitError, ServiceUnavailableError
from asgi_llm.routing.health import BreakerPolicy, HealthTracker
from asgi_llm.routing.router import ModelRoute, Price, Router, Target

A = Target("a", "m-a", price=Price(Decimal("2"), Decimal("8")), weight=3, context_window=8000)
B = Target("b", "m-b", price=Price(Decimal("0.1"), Decimal("0.4")), weight=1)
C = Target("c", "m-c", price=None, weight=1)
N = Target("node-1", "llama", price=Price(Decimal(0), Decimal(0)), kind="node")


def ctx_for(model: str = "chat", *, org: str = "acme", **extra: object) -> RequestContext:
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return RequestContext(request_id="r", endpoint="chat", payload=payload, body=json.dumps(payload).encode(),
                          model=model, principal=Principal(key_id="k1", org=org))


def router(strategy: str = "priority", targets: tuple[Target, ...] = (A, B, C), **kw: object) -> Router:
    models = [ModelRoute("chat", targets, strategy), ModelRoute("other", (B,)), ModelRoute("local", (N,))]
    return Router(models, **kw)  # type: ignore[arg-type]


def routes(targets: list[Target]) -> list[str]:
    return [t.route for t in targets]


class TestStrategies:
    def test_priority_keeps_recipe_order(self) -> None:
        """priority: the recipe order."""
        assert routes(router().plan(ctx_for())) == ["a/m-a", "b/m-b", "c/m-c"]

    def test_weighted_split_within_bounds(self) -> None:
        """weighted: the first pick follows the weights (3:1:1) within statistical bounds."""
        r = router("weighted", rng=random.Random(42))
        firsts = Counter(r.plan(ctx_for())[0].route for _ in range(5000))
        assert abs(firsts["a/m-a"] / 5000 - 0.6) < 0.03
        assert abs(firsts["b/m-b"] / 5000 - 0.2) < 0.03
        # every plan still contains every target once (the rest are fallbacks)
        assert sorted(routes(r.plan(ctx_for()))) == ["a/m-a", "b/m-b", "c/m-c"]

    def test_cheapest_by_estimated_cost(self) -> None:
        """cheapest: lowest estimated cost first; unknown price last."""
        assert routes(router("cheapest").plan(ctx_for())) == ["b/m-b", "a/m-a", "c/m-c"]

    def test_fastest_by_ewma_unmeasured_first(self) -> None:
        """fastest: unmeasured targets first (to measure them), then by latency EWMA."""
        health = HealthTracker()
        health.success("a/m-a", latency_s=0.9)
        health.success("b/m-b", latency_s=0.1)
        assert routes(router("fastest", health=health).plan(ctx_for())) == ["c/m-c", "b/m-b", "a/m-a"]
        health.success("c/m-c", latency_s=0.5)
        assert routes(router("fastest", health=health).plan(ctx_for())) == ["b/m-b", "c/m-c", "a/m-a"]

    def test_least_busy_spreads_load(self) -> None:
        """least-busy: fewest in flight first; as requests start, the next goes elsewhere."""
        health = HealthTracker()
        r = router("least-busy", health=health)
        picks = []
        for _ in range(6):
            t = r.plan(ctx_for())[0]
            health.begin(t.route)
            picks.append(t.route)
        assert Counter(picks) == {"a/m-a": 2, "b/m-b": 2, "c/m-c": 2}


class TestRulesAndOverrides:
    def test_rule_by_metadata_keeps_private_on_nodes(self) -> None:
        """A rule: requests marked private never leave the org's own nodes."""
        rule = RoutingRule(name="private", match={"metadata": {"private": True}}, only=["nodes"])
        r = Router([ModelRoute("chat", (A, N))], rules=[rule])
        assert routes(r.plan(ctx_for(metadata={"private": "true"}))) == ["node-1/llama"]
        assert routes(r.plan(ctx_for())) == ["a/m-a", "node-1/llama"]

    def test_rule_by_org_picks_strategy(self) -> None:
        """A rule matching an org switches the strategy; others keep the model's."""
        rule = RoutingRule(match={"org": ["frugal"]}, strategy="cheapest")
        r = router(rules=[rule])
        assert routes(r.plan(ctx_for(org="frugal")))[0] == "b/m-b"
        assert routes(r.plan(ctx_for(org="acme")))[0] == "a/m-a"

    def test_rule_by_header(self) -> None:
        """Header rules match case-insensitively on the name."""
        rule = RoutingRule(match={"header": {"X-Tier": "batch"}}, exclude=["a"])
        r = router(rules=[rule])
        assert routes(r.plan(ctx_for(), [(b"x-tier", b"batch")])) == ["b/m-b", "c/m-c"]

    def test_openrouter_provider_object(self) -> None:
        """provider.order/only/ignore/sort/max_price/allow_fallbacks narrow and reorder the plan."""
        r = router()
        assert routes(r.plan(ctx_for(provider={"order": ["c", "b"]}))) == ["c/m-c", "b/m-b", "a/m-a"]
        assert routes(r.plan(ctx_for(provider={"only": ["a", "c"]}))) == ["a/m-a", "c/m-c"]
        assert routes(r.plan(ctx_for(provider={"ignore": ["a"]}))) == ["b/m-b", "c/m-c"]
        assert routes(r.plan(ctx_for(provider={"sort": "price"})))[0] == "b/m-b"
        assert routes(r.plan(ctx_for(provider={"max_price": {"prompt": 1}}))) == ["b/m-b", "c/m-c"]
        assert routes(r.plan(ctx_for(provider={"allow_fallbacks": False}))) == ["a/m-a"]

    def test_models_and_fallbacks_lists(self) -> None:
        """OpenRouter models[] and LiteLLM fallbacks append other models' targets, without duplicates."""
        r = router(targets=(A,))
        assert routes(r.plan(ctx_for(models=["other"]))) == ["a/m-a", "b/m-b"]
        assert routes(r.plan(ctx_for(fallbacks=["other", "chat"]))) == ["a/m-a", "b/m-b"]

    def test_bad_overrides_are_400_with_param(self) -> None:
        """Malformed overrides are a 400 naming the field; unknown fallback models a 404."""
        r = router()
        for bad, param in [({"provider": "x"}, "provider"), ({"provider": {"sort": "vibes"}}, "provider.sort"),
                           ({"provider": {"max_price": {"prompt": "cheap"}}}, "provider.max_price"),
                           ({"provider": {"frob": 1}}, "provider"), ({"models": "other"}, "models")]:
            with pytest.raises(InvalidRequestError) as exc:
                r.plan(ctx_for(**bad))
            assert exc.value.param == param
        with pytest.raises(ModelNotFoundError) as nf:
            r.plan(ctx_for(fallbacks=["nope"]))
        assert nf.value.param == "fallbacks[0]"

    def test_allow_list_hides_models(self) -> None:
        """A key whose allow-list lacks the model gets model_not_found, as if it did not exist."""
        c = ctx_for()
        c.principal = Principal(key_id="k", org="o", models=frozenset({"other"}))
        with pytest.raises(ModelNotFoundError):
            router().plan(c)

    def test_prefill_skips_targets_without_it(self) -> None:
        """A request ending in an assistant message skips targets declared prefill: false."""
        no_prefill = Target("b", "m-b", prefill=False)
        r = router(targets=(no_prefill, A))
        payload_ctx = ctx_for()
        payload_ctx.payload["messages"].append({"role": "assistant", "content": "Sure:"})
        plan = r.make_plan(payload_ctx)
        assert routes(plan.targets) == ["a/m-a"]
        assert plan.steps == [{"route": "b/m-b", "skipped": "does not accept an assistant prefill"}]


class TestHealth:
    def test_open_breaker_skips_target_and_explains(self) -> None:
        """A target whose breaker is open is skipped, with the reason recorded."""
        now = [100.0]
        health = HealthTracker(BreakerPolicy(failure_threshold=2, cooldown_s=10), clock=lambda: now[0])
        r = router(health=health)
        health.failure("a/m-a")
        assert routes(r.plan(ctx_for()))[0] == "a/m-a"
        health.failure("a/m-a")
        plan = r.make_plan(ctx_for())
        assert routes(plan.targets) == ["b/m-b", "c/m-c"]
        assert {"route": "a/m-a", "skipped": "unhealthy (open)"} in plan.steps
        now[0] += 10.5  # cooldown over: half-open, one request may try
        assert routes(r.plan(ctx_for()))[0] == "a/m-a"
        health.begin("a/m-a")
        assert routes(r.plan(ctx_for()))[0] == "b/m-b"  # the half-open slot is taken
        health.end("a/m-a")
        health.failure("a/m-a")  # the probe failed: open again, for twice as long
        now[0] += 15
        assert routes(r.plan(ctx_for()))[0] == "b/m-b"
        now[0] += 6
        health.success("a/m-a", latency_s=0.2)  # e.g. an active probe + live success
        assert routes(r.plan(ctx_for()))[0] == "a/m-a"

    def test_all_unhealthy_is_503_with_retry_after(self) -> None:
        """When every target is open the answer is a 503 with Retry-After, not an attempt."""
        now = [0.0]
        health = HealthTracker(BreakerPolicy(failure_threshold=1, cooldown_s=7), clock=lambda: now[0])
        r = router(targets=(A, B), health=health)
        health.failure("a/m-a")
        health.failure("b/m-b")
        with pytest.raises(ServiceUnavailableError) as exc:
            r.plan(ctx_for())
        assert exc.value.headers["retry-after"] == "7"

    def test_all_rate_limited_is_429(self) -> None:
        """When every target is cooling from upstream 429s the answer is a 429 with the wait."""
        now = [0.0]
        health = HealthTracker(clock=lambda: now[0])
        r = router(targets=(A,), health=health)
        health.cool_down("a/m-a", "", 12)
        with pytest.raises(RateLimitError) as exc:
            r.plan(ctx_for())
        assert exc.value.headers["retry-after"] == "12"

    def test_key_cooldown_is_per_key(self) -> None:
        """One key cooling down leaves the route usable through the others."""
        health = HealthTracker()
        health.cool_down("a/m-a", "k0", 60)
        assert health.route_usable("a/m-a", ["k0", "k1"])
        assert not health.key_usable("a/m-a", "k0")
        health.cool_down("a/m-a", "k1", 60)
        assert not health.route_usable("a/m-a", ["k0", "k1"])


class TestAccountantPrices:
    """cheapest and provider.max_price price targets as the quota layer and the ledger do:
    recipe price, then usage.prices overrides, then genai-prices."""

    def test_cheapest_sees_overrides(self) -> None:
        """A target priced only by a usage.prices override is ordered by that price."""
        from asgi_llm.usage.accounting import Accountant, Pricer

        r = router("cheapest", accountant=Accountant(Pricer({"c/m-c": Price(Decimal("0.01"), Decimal("0.01"))})))
        assert routes(r.plan(ctx_for())) == ["c/m-c", "b/m-b", "a/m-a"]

    def test_max_price_sees_genai_prices(self) -> None:
        """A target with no recipe price is still subject to max_price, at its genai-prices price."""
        g = Target("openai", "gpt-4o-mini")  # genai-prices: $0.15 / $0.60 per 1M
        r = router(targets=(g, B))
        assert routes(r.plan(ctx_for(provider={"max_price": {"prompt": 0.12}}))) == ["b/m-b"]
        assert routes(r.plan(ctx_for(provider={"max_price": {"prompt": 0.2, "completion": 0.7}}))) == ["openai/gpt-4o-mini", "b/m-b"]
