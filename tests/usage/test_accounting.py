"""Accounting: one price for the router, the quota layer and the ledger.

In process (asyncio and trio), with the real quota, usage and failover layers against a
real fake upstream: for every pricing source the reservation covers the settled cost, and
the settled cost is the ledger rows' cost to the pico-dollar. Plus the reservation's
candidate set (fallbacks, models[], nodes, filters), per-attempt settlement, and the
plausibility check of reported usage.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from asgi_llm.auth import KeyRing, MemoryKeyStore
from asgi_llm.config import AuthConfig, KeyLimits, StaticKey
from asgi_llm.context import Attempt, Principal, RequestContext, Usage
from asgi_llm.middleware.auth import AuthMiddleware
from asgi_llm.middleware.context import ContextMiddleware, ensure_context
from asgi_llm.middleware.errors import ErrorMiddleware
from asgi_llm.middleware.failover import FailoverMiddleware
from asgi_llm.middleware.quota import QuotaMiddleware
from asgi_llm.middleware.usage import UsageMiddleware
from asgi_llm.providers.base import Timeouts
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.routing.router import ModelRoute, NodeTargets, Price, Router, Target
from asgi_llm.stack import Gateway, compose
from asgi_llm.stores.state import Limit, MemoryStateStore
from asgi_llm.testing.processes import FakeUpstreamHandle
from asgi_llm.usage.accounting import (
    HIDDEN_TOKENS_MAX,
    PART_TOKENS,
    PROMPT_SLACK,
    USAGE_SLACK,
    Accountant,
    Pricer,
    Seen,
    answer_bytes,
    estimate_request,
    plausible_usage,
)
from asgi_llm.usage.records import LedgerRow, to_pico
from tests.conftest import UPSTREAM_KEYS
from tests.harness import Recorded, call

KEY = "sk-budget-0001"
MESSAGES = [{"role": "user", "content": "tell me a story about budgets"}]
RECIPE = Price(Decimal("3"), Decimal("15"))
OVERRIDE = Price(Decimal("0.5"), Decimal("1.5"))
OWNER = Price(Decimal("7"), Decimal("21"))
CHEAP = Price(Decimal("0.01"), Decimal("0.01"))
PRICEY = Price(Decimal("500"), Decimal("1000"))


def _node_resolver(spec: NodeTargets, ctx: RequestContext) -> list[Target]:
    """What the node registry does: the live node, at its owner's price."""
    return [Target("node:box", spec.model, price=OWNER, kind="node")]


class Stack:
    """An in-process gateway: auth → quota → usage → failover → dispatch, one accountant."""

    def __init__(self, upstream: FakeUpstreamHandle, limits: KeyLimits) -> None:
        self.store = MemoryStateStore()
        self.rows: list[LedgerRow] = []
        self.contexts: list[RequestContext] = []

        def adapter(name: str) -> OpenAIAdapter:
            return OpenAIAdapter(name, base_url=upstream.base_url, api_keys=[UPSTREAM_KEYS["provider-a"]],
                                 timeouts=Timeouts(attempt=5, ttft=3, idle=3))

        self.router = Router([
            ModelRoute("recipe", (Target("provider-a", "gpt-4o-mini", price=RECIPE),)),
            ModelRoute("override", (Target("ovr", "gpt-4o-mini"),)),
            ModelRoute("genai", (Target("provider-a", "gpt-4o-mini"),)),
            ModelRoute("node", (NodeTargets("any", "gpt-4o-mini"),)),
            ModelRoute("cheap", (Target("cheap", "gpt-4o-mini", price=CHEAP),)),
            ModelRoute("pricey", (Target("pricey", "gpt-4o-mini", price=PRICEY),)),
        ], node_resolver=_node_resolver)
        self.accountant = Accountant(Pricer({"ovr/gpt-4o-mini": OVERRIDE}), router=self.router)
        self.router.accountant = self.accountant
        ring = KeyRing.from_config(AuthConfig(keys=[StaticKey(key=KEY, org="o", name="k", limits=limits)]),
                                   store=MemoryKeyStore(), environ={})
        self.gateway: Gateway = compose(
            providers={n: adapter(n) for n in ("provider-a", "ovr", "node:box", "cheap", "pricey")},
            router=self.router, resources=[ring],
            layers={"auth": lambda app: AuthMiddleware(app, keys=ring),
                    "quota": lambda app: QuotaMiddleware(app, store=self.store, router=self.router, accountant=self.accountant),
                    "usage": lambda app: UsageMiddleware(app, sink=self.rows.append, accountant=self.accountant),
                    "failover": lambda app: FailoverMiddleware(app, router=self.router)},
        )

    async def chat(self, **body: Any) -> tuple[Recorded, RequestContext]:
        seen: list[RequestContext] = []

        async def capture(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await self.gateway(scope, receive, send)
            finally:
                ctx = scope.get("asgi_llm")
                if ctx is not None:
                    seen.append(ctx)

        rec = await call(capture, body={"messages": MESSAGES, **body}, headers=[(b"authorization", f"Bearer {KEY}".encode())])
        return rec, seen[0]

    async def spent(self) -> int:
        adm = await self.store.reserve([Limit("spend_day", "key:static:k", 2**62, 0)], reservation_id="probe")
        return adm.statuses[0].used


@pytest.fixture
async def stack_factory(upstream_a: FakeUpstreamHandle) -> AsyncIterator[Callable[..., Any]]:
    made: list[Stack] = []

    async def make(limits: KeyLimits | None = None) -> Stack:
        s = Stack(upstream_a, limits or KeyLimits(spend_usd_per_day=Decimal(100)))
        await s.gateway.startup()
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            await s.gateway.shutdown()


@pytest.mark.anyio
class TestEverySourceAgrees:
    @pytest.mark.parametrize(("model", "source"), [("recipe", "recipe"), ("override", "override"),
                                                   ("genai", "genai-prices"), ("node", "recipe")])
    @pytest.mark.parametrize("stream", [False, True])
    async def test_reserved_covers_settled_and_settled_is_the_ledger(self, stack_factory: Callable[..., Any], model: str,
                                                                     source: str, stream: bool) -> None:
        """Recipe, usage.prices override, genai-prices, node owner price: reserved ≥ settled > 0,
        settled == the ledger row's cost in pico-USD == the budget's counter."""
        s = await stack_factory()
        extra: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        rec, ctx = await s.chat(model=model, max_tokens=40, **extra)
        assert rec.status == 200
        quota = ctx.quota
        assert quota is not None
        (row,) = s.rows
        assert row.price_source == source and not row.estimated and row.completion_tokens > 0
        if model == "node":
            assert row.route == "node:box/gpt-4o-mini" and row.cost_usd == (row.prompt_tokens * OWNER.input
                                                                             + row.completion_tokens * OWNER.output) / 10**6
        assert quota.reserved_spend_pico_usd >= quota.spend_pico_usd > 0
        assert quota.spend_pico_usd == to_pico(row.cost_usd) == await s.spent()

    async def test_failed_over_attempts_are_each_charged(self, stack_factory: Callable[..., Any],
                                                         upstream_a: FakeUpstreamHandle) -> None:
        """Two attempts (a 503, then an answer): settlement == the sum of both ledger rows."""
        s = await stack_factory()
        s.router._models["two"] = ModelRoute("two", (Target("pricey", "gpt-4o-mini", price=PRICEY),
                                                     Target("cheap", "gpt-4o-mini", price=CHEAP)))
        upstream_a.add_faults({"kind": "status", "status": 503, "message": "busy"})
        rec, ctx = await s.chat(model="two", max_tokens=20)
        assert rec.status == 200 and len(s.rows) == 2
        assert ctx.quota.spend_pico_usd == sum(to_pico(r.cost_usd) for r in s.rows) == await s.spent()


@pytest.mark.anyio
class TestReservation:
    async def test_fallbacks_and_provider_ignore_cannot_dodge_the_budget(self, stack_factory: Callable[..., Any]) -> None:
        """cheap + fallbacks:[pricey] + provider.ignore:[cheap]: reserved at pricey's price, so
        the budget refuses what it cannot pay for, and the counter == the ledger."""
        s = await stack_factory(KeyLimits(spend_usd_per_day=Decimal("0.05")))
        body = {"model": "cheap", "fallbacks": ["pricey"], "provider": {"ignore": ["cheap"]}, "max_tokens": 20}
        statuses = []
        for _ in range(30):
            rec, _ctx = await s.chat(**body)
            statuses.append(rec.status)
            if rec.status == 429:
                err = rec.json()["error"]
                assert err["code"] == "insufficient_quota" and int(rec.headers["retry-after"]) >= 1
        assert statuses.count(200) < 30 and 429 in statuses
        assert all(r.route == "pricey/gpt-4o-mini" for r in s.rows)
        spent = await s.spent()
        assert spent == sum(to_pico(r.cost_usd) for r in s.rows) <= 50_000_000_000  # $0.05 in pico-USD

    async def test_models_list_is_priced_too(self, stack_factory: Callable[..., Any]) -> None:
        """OpenRouter models[] reaches 'pricey': the reservation is pricey's worst case."""
        s = await stack_factory()
        rec, ctx = await s.chat(model="cheap", models=["pricey"], max_tokens=10)
        prompt, completion = estimate_request(ctx)
        worst = (prompt * PRICEY.input + 10 * PRICEY.output) * 10**6
        assert rec.status == 200 and completion == 10
        assert ctx.quota.reserved_spend_pico_usd == int(worst)

    async def test_unknown_fallback_is_a_404_not_a_free_pass(self, stack_factory: Callable[..., Any]) -> None:
        """A fallback model that does not exist is the router's 404 before anything is reserved."""
        s = await stack_factory()
        rec, _ = await s.chat(model="cheap", fallbacks=["nope"])
        assert rec.status == 404 and rec.json()["error"]["param"] == "fallbacks[0]"
        assert await s.spent() == 0


def _ctx(payload: dict[str, Any], endpoint: str = "chat") -> RequestContext:
    body = json.dumps(payload).encode()
    return RequestContext(request_id="r", endpoint=endpoint, payload=payload, body=body, model=payload.get("model"),  # type: ignore[arg-type]
                          principal=Principal(key_id="k", org="o"))


class TestReachable:
    def router(self) -> Router:
        return Router([
            ModelRoute("cheap", (Target("cheap", "m", price=CHEAP), NodeTargets("any", "m"))),
            ModelRoute("pricey", (Target("pricey", "m", price=PRICEY),)),
            ModelRoute("free", (Target("free", "zz-no-such-model-anywhere"),)),
        ], node_resolver=_node_resolver)

    def test_fallbacks_models_and_nodes(self) -> None:
        """The model's targets, resolved nodes, fallbacks and models[] are all candidates."""
        ctx = _ctx({"model": "cheap", "fallbacks": ["pricey"], "models": ["free"]})
        assert [t.route for t in self.router().reachable(ctx)] == [
            "cheap/m", "node:box/m", "free/zz-no-such-model-anywhere", "pricey/m"]  # models[] first, as make_plan

    def test_filters_only_remove(self) -> None:
        """provider.only / ignore narrow the candidates exactly as the plan will."""
        r = self.router()
        assert [t.route for t in r.reachable(_ctx({"model": "cheap", "fallbacks": ["pricey"], "provider": {"only": ["pricey"]}}))] \
            == ["pricey/m"]
        assert [t.route for t in r.reachable(_ctx({"model": "cheap", "provider": {"ignore": ["nodes"]}}))] == ["cheap/m"]

    def test_plan_uses_the_nodes_admission_priced(self) -> None:
        """Nodes are resolved once per request: the plan's node targets are the ones priced."""
        calls = []

        def resolver(spec: NodeTargets, ctx: RequestContext) -> list[Target]:
            calls.append(spec)
            return [Target("node:box", spec.model, price=OWNER, kind="node")]

        r = Router([ModelRoute("n", (NodeTargets("any", "m"),))], node_resolver=resolver)
        ctx = _ctx({"model": "n"})
        priced = r.reachable(ctx)
        assert r.make_plan(ctx).targets == priced and len(calls) == 1

    def test_unpriced_adds_nothing_and_is_flagged(self, caplog: pytest.LogCaptureFixture) -> None:
        """A target with no price is billed 0, so it adds 0 to the worst case; it is reported."""
        r = self.router()
        acct = Accountant(router=r)
        targets = r.reachable(_ctx({"model": "free", "fallbacks": ["cheap"]}))
        pico, unpriced = acct.reservation(targets, 100, 10)
        assert unpriced == ["free/zz-no-such-model-anywhere"]
        assert pico == int((100 * OWNER.input + 10 * OWNER.output) * 10**6)  # the node is the dearest
        assert "spend budgets do not limit" in caplog.text


class TestTieredGenaiPrices:
    @pytest.mark.parametrize(("prompt", "completion"), [(1_000, 500), (300_000, 8_000)])
    def test_reservation_covers_both_tiers(self, prompt: int, completion: int) -> None:
        """genai-prices tiers keyed on the prompt's size (gemini-2.5-pro above 200k tokens):
        the reservation at the top tier is never below what the ledger bills."""
        target = Target("google", "gemini-2.5-pro")
        acct = Accountant()
        billed = acct.target_cost(target, prompt, completion)
        assert billed.source == "genai-prices"
        assert acct.reservation([target], prompt, completion)[0] >= to_pico(billed.cost) > 0


class TestSettlementUnits:
    def test_every_attempt_and_node_attempts_are_charged(self) -> None:
        """Settlement charges each attempt at its target's price: a failed-over attempt that
        consumed the prompt, and a node attempt at its owner's price (from the plan)."""
        router = Router([ModelRoute("m", (Target("p", "m", price=RECIPE), NodeTargets("any", "m")))], node_resolver=_node_resolver)
        acct = Accountant(router=router)
        ctx = _ctx({"model": "m"})
        ctx.plan = router.plan(ctx)
        ctx.attempt_log += [
            Attempt(number=1, route="p/m", provider="p", model="m", started_at=0, usage=Usage(10, 0, 10)),
            Attempt(number=2, route="node:box/m", provider="node:box", model="m", started_at=0, outcome="ok",
                    usage=Usage(10, 5, 15)),
        ]
        charges = acct.charges(ctx)
        assert [c.source for c in charges] == ["recipe", "recipe"]
        assert [c.pico for c in charges] == [to_pico(10 * RECIPE.input / 10**6),
                                             to_pico((10 * OWNER.input + 5 * OWNER.output) / 10**6)]
        assert acct.charges(ctx) is charges  # computed once per request: quota reuses the ledger's


class TestPlausibility:
    def test_honest_usage_is_kept(self) -> None:
        """Usage within every bound is returned as is, unflagged."""
        ctx = _ctx({"model": "m", "messages": MESSAGES, "max_tokens": 50})
        u = Usage(prompt_tokens=12, completion_tokens=40, total_tokens=52, cached_tokens=4)
        assert plausible_usage(u, ctx, answer_size=200, hidden_ok=False) is u

    def test_absurd_report_is_clamped_and_flagged(self) -> None:
        """3·10¹² tokens against a short prompt and answer: clamped to body bytes and answer bytes."""
        ctx = _ctx({"model": "m", "messages": MESSAGES})
        u = plausible_usage(Usage(3 * 10**12, 3 * 10**12, 6 * 10**12, cached_tokens=3 * 10**12, reasoning_tokens=3 * 10**12),
                            ctx, answer_size=30, hidden_ok=False)
        assert u.estimated
        assert u.prompt_tokens == len(ctx.body) + PROMPT_SLACK and u.completion_tokens == 30 + USAGE_SLACK
        assert u.cached_tokens == u.prompt_tokens and u.reasoning_tokens == u.completion_tokens
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    def test_max_tokens_bounds_completion(self) -> None:
        """A provider's hidden reasoning is allowed, but never past max_tokens × n."""
        ctx = _ctx({"model": "m", "messages": MESSAGES, "max_completion_tokens": 100, "n": 2})
        u = plausible_usage(Usage(5, 10**6, reasoning_tokens=10**6), ctx, answer_size=10, hidden_ok=True)
        assert u.completion_tokens == 200 + USAGE_SLACK and u.estimated
        kept = Usage(5, 180, 185, reasoning_tokens=170)
        assert plausible_usage(kept, ctx, answer_size=10, hidden_ok=True) is kept  # reasoning within the cap
        assert plausible_usage(kept, ctx, answer_size=10, hidden_ok=False).completion_tokens == 10 + USAGE_SLACK  # a node

    def test_hidden_reasoning_is_bounded_without_a_cap(self) -> None:
        """No cap: reported reasoning counts up to HIDDEN_TOKENS_MAX."""
        ctx = _ctx({"model": "m", "messages": MESSAGES})
        u = plausible_usage(Usage(5, 10**9, reasoning_tokens=10**9), ctx, answer_size=10, hidden_ok=True)
        assert u.completion_tokens == 10 + HIDDEN_TOKENS_MAX + USAGE_SLACK

    def test_images_allow_prompt_tokens(self) -> None:
        """Each image part allows PART_TOKENS prompt tokens beyond the body's bytes (and the slack)."""
        content = [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]
        ctx = _ctx({"model": "m", "messages": [{"role": "user", "content": content}]})
        top = len(ctx.body) + PROMPT_SLACK + PART_TOKENS
        u = Usage(prompt_tokens=top, completion_tokens=1, total_tokens=top + 1)
        assert plausible_usage(u, ctx, answer_size=4, hidden_ok=False) is u
        assert plausible_usage(Usage(top + 1, 1, top + 2), ctx, answer_size=4, hidden_ok=False).prompt_tokens == top

    def test_cache_hit_usage_is_checked_too(self) -> None:
        """A cached answer from a lying node cannot inflate saved_usd: its usage is clamped
        against the replayed answer, like a live attempt's."""
        ctx = _ctx({"model": "m", "messages": MESSAGES})
        seen = Seen()
        seen.body = json.dumps({"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 3 * 10**12}}).encode()
        u = Accountant().replayed_usage(ctx, Usage(3 * 10**12, 3 * 10**12, 6 * 10**12), "node:box/m", seen)
        assert u is not None and u.estimated and u.completion_tokens == 2 + USAGE_SLACK
        assert u.prompt_tokens == len(ctx.body) + PROMPT_SLACK

    def test_answer_bytes(self) -> None:
        """Generated text in every place it can be: content, reasoning, tool calls, completions text."""
        obj = {"choices": [{"delta": {"content": "héllo", "reasoning_content": "ab",
                                      "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}},
                           {"text": "xyz"}, "junk"]}
        assert answer_bytes(obj) == 6 + 2 + 1 + 2 + 3
        assert answer_bytes({"choices": "nope"}) == 0
