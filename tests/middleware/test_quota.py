"""QuotaMiddleware in process (asyncio and trio) against a real fake upstream: reservations,
settlement on every exit path, headers, refusals, and the store-failure policy."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from asgi_llm.auth import KeyRing, MemoryKeyStore
from asgi_llm.config import AuthConfig, KeyLimits, StaticKey
from asgi_llm.context import Attempt, Principal, Usage
from asgi_llm.middleware.auth import AuthMiddleware
from asgi_llm.middleware.context import ContextMiddleware, ensure_context
from asgi_llm.middleware.errors import ErrorMiddleware
from asgi_llm.middleware.quota import _MAX_PLANS, QuotaMiddleware, format_reset, rate_limit_headers
from asgi_llm.providers.base import Timeouts
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.routing.router import ModelRoute, Price, Router, Target
from asgi_llm.stack import Gateway, compose
from asgi_llm.stores import StoreError
from asgi_llm.stores.state import Limit, LimitStatus, MemoryStateStore, Reservation
from asgi_llm.testing.processes import FakeUpstreamHandle
from tests.conftest import UPSTREAM_KEYS
from tests.harness import Recorded, call

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "tell me"}]
PRICE = Price(Decimal("1000"), Decimal("2000"))  # USD per 1M tokens: 1000 / 2000 micro-USD per token
MICRO = 10**6  # pico-USD per micro-USD: spend counters are in pico-USD


def bearer(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key}".encode())]


def keyring(*keys: StaticKey) -> KeyRing:
    return KeyRing.from_config(AuthConfig(keys=list(keys)), store=MemoryKeyStore(), environ={})


def make_gateway(upstream: FakeUpstreamHandle, ring: KeyRing, store: Any, **quota: Any) -> Gateway:
    adapter = OpenAIAdapter("provider-a", base_url=upstream.base_url, api_keys=[UPSTREAM_KEYS["provider-a"]],
                            timeouts=Timeouts(attempt=3, ttft=1, idle=1))
    router = Router([ModelRoute("chat", (Target("provider-a", "gpt-4o-mini", price=PRICE),)),
                     ModelRoute("other", (Target("provider-a", "gpt-4o-mini"),))])
    return compose(
        providers={"provider-a": adapter}, router=router, resources=[ring],
        layers={"auth": lambda app: AuthMiddleware(app, keys=ring),
                "quota": lambda app: QuotaMiddleware(app, store=store, router=router, **quota)},
    )


@pytest.fixture
def store() -> MemoryStateStore:
    return MemoryStateStore()


@pytest.fixture
async def gw_factory(upstream_a: FakeUpstreamHandle, store: MemoryStateStore) -> AsyncIterator[Callable[..., Any]]:
    """Start gateways on demand; all are shut down at the end."""
    gateways: list[Gateway] = []

    async def make(*keys: StaticKey, **quota: Any) -> Gateway:
        gw = make_gateway(upstream_a, keyring(*keys), quota.pop("store", store), **quota)
        await gw.startup()
        gateways.append(gw)
        return gw

    try:
        yield make
    finally:
        for gw in gateways:
            await gw.shutdown()


async def used(store: MemoryStateStore, kind: str, scope: str) -> int:
    adm = await store.reserve([Limit(kind, scope, 10**15, 0)], reservation_id="probe")  # type: ignore[arg-type]
    return adm.statuses[0].used


async def chat(gw: Gateway, key: str, **body: Any) -> Recorded:
    return await call(gw, body={"model": "chat", "messages": MESSAGES, **body}, headers=bearer(key))


class TestRequestsPerMinute:
    async def test_limit_then_429_with_headers(self, gw_factory: Callable[..., Any]) -> None:
        """rpm=3: three 200s counting down x-ratelimit-remaining-requests, then a 429 naming the limit."""
        gw = await gw_factory(StaticKey(key="sk-team-a-0001", org="team-a", name="team-a-key", limits=KeyLimits(rpm=3)))
        remaining = []
        for _ in range(3):
            rec = await chat(gw, "sk-team-a-0001")
            assert rec.status == 200
            assert rec.headers["x-ratelimit-limit-requests"] == "3"
            remaining.append(rec.headers["x-ratelimit-remaining-requests"])
            assert rec.headers["x-ratelimit-reset-requests"].endswith("s")
        assert remaining == ["2", "1", "0"]
        rec = await chat(gw, "sk-team-a-0001")
        assert rec.status == 429
        err = rec.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        assert "key 'team-a-key'" in err["message"] and "requests per minute" in err["message"] and "limit 3" in err["message"]
        assert 1 <= int(rec.headers["retry-after"]) <= 120
        assert rec.headers["x-ratelimit-remaining-requests"] == "0"
        assert "sk-team-a-0001" not in rec.body.decode()

    async def test_org_limit_spans_its_keys(self, gw_factory: Callable[..., Any]) -> None:
        """limits.org caps every key of the org together; another org is unaffected."""
        gw = await gw_factory(StaticKey(key="sk-team-a-0001", org="team-a"), StaticKey(key="sk-team-a-0002", org="team-a"),
                              StaticKey(key="sk-team-b-0001", org="team-b"), org_limits=KeyLimits(rpm=2))
        assert (await chat(gw, "sk-team-a-0001")).status == 200
        assert (await chat(gw, "sk-team-a-0002")).status == 200
        rec = await chat(gw, "sk-team-a-0001")
        assert rec.status == 429 and "org 'team-a'" in rec.json()["error"]["message"]
        assert (await chat(gw, "sk-team-b-0001")).status == 200

    async def test_key_model_limit(self, gw_factory: Callable[..., Any]) -> None:
        """model_limits caps one model for one key and leaves its other models alone."""
        gw = await gw_factory(StaticKey(key="sk-team-a-0001", org="a", name="k", model_limits={"chat": KeyLimits(rpm=1)}))
        assert (await chat(gw, "sk-team-a-0001")).status == 200
        rec = await chat(gw, "sk-team-a-0001")
        assert rec.status == 429 and "on model 'chat'" in rec.json()["error"]["message"]
        other = await call(gw, body={"model": "other", "messages": MESSAGES}, headers=bearer("sk-team-a-0001"))
        assert other.status == 200

    async def test_unknown_model_gets_no_limit_headers(self, gw_factory: Callable[..., Any]) -> None:
        """An unknown model is the router's 404 with no rate-limit headers (nothing to tell it from a hidden one)."""
        gw = await gw_factory(StaticKey(key="sk-team-a-0001", org="a", limits=KeyLimits(rpm=5)))
        rec = await call(gw, body={"model": "nope", "messages": MESSAGES}, headers=bearer("sk-team-a-0001"))
        assert rec.status == 404 and not any(h.startswith("x-ratelimit") for h in rec.headers)


class TestSettlement:
    async def test_non_stream_settles_to_reported_usage(self, gw_factory: Callable[..., Any], store: MemoryStateStore) -> None:
        """After a call, the key's token and spend counters hold exactly the upstream's usage and its price."""
        gw = await gw_factory(StaticKey(key="sk-team-a-0001", org="a", name="k",
                                        limits=KeyLimits(tpm=100_000, spend_usd_per_day=10)))
        rec = await chat(gw, "sk-team-a-0001", max_tokens=50)
        usage = rec.json()["usage"]
        assert int(rec.headers["x-ratelimit-remaining-tokens"]) < 100_000 - 50  # the reservation, before settling
        assert await used(store, "tokens", "key:static:k") == usage["total_tokens"]
        cost = usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000
        assert await used(store, "spend_day", "key:static:k") == cost * MICRO

    async def test_stream_settles_to_the_usage_block(self, gw_factory: Callable[..., Any], store: MemoryStateStore) -> None:
        """A streamed call settles to the usage chunk's totals."""
        gw = await gw_factory(StaticKey(key="sk-team-a-0001", org="a", name="k", limits=KeyLimits(tpm=100_000)))
        rec = await chat(gw, "sk-team-a-0001", stream=True, stream_options={"include_usage": True})
        usage = json.loads(rec.sse_data()[-2])["usage"]
        assert await used(store, "tokens", "key:static:k") == usage["total_tokens"]

    async def test_upstream_error_refunds_everything(self, gw_factory: Callable[..., Any], store: MemoryStateStore,
                                                     upstream_a: FakeUpstreamHandle) -> None:
        """An upstream failure before any answer charges no tokens; the error carries rate-limit headers."""
        gw = await gw_factory(StaticKey(key="sk-team-a-0001", org="a", name="k", limits=KeyLimits(tpm=100_000)))
        upstream_a.add_faults({"kind": "status", "status": 400, "message": "nope"})
        rec = await chat(gw, "sk-team-a-0001")
        assert rec.status == 400 and "x-ratelimit-remaining-tokens" in rec.headers
        assert await used(store, "tokens", "key:static:k") == 0

    async def test_client_disconnect_settles_and_frees_the_slot(self, gw_factory: Callable[..., Any], store: MemoryStateStore,
                                                                upstream_a: FakeUpstreamHandle) -> None:
        """A client gone mid-stream: what was relayed is charged, the concurrency slot is released."""
        gw = await gw_factory(StaticKey(key="sk-team-a-0001", org="a", name="k", limits=KeyLimits(tpm=100_000, concurrency=1)))
        upstream_a.add_faults({"kind": "chunk_delay", "delay_s": 0.2})
        rec = await call(gw, body={"model": "chat", "messages": MESSAGES, "stream": True, "max_tokens": 100},
                         headers=bearer("sk-team-a-0001"), disconnect_after_parts=2)
        assert rec.starts == 1
        charged = await used(store, "tokens", "key:static:k")
        assert 0 < charged < 100  # the prompt and a few chunks, not the reservation
        assert (await chat(gw, "sk-team-a-0001")).status == 200  # the slot came back

    async def test_cancellation_settles(self, gw_factory: Callable[..., Any], store: MemoryStateStore,
                                        upstream_a: FakeUpstreamHandle) -> None:
        """A request cancelled from outside (server shutdown, timeout) still releases its slot and refunds."""
        gw = await gw_factory(StaticKey(key="sk-team-a-0001", org="a", name="k", limits=KeyLimits(tpm=100_000, concurrency=1)))
        upstream_a.add_faults({"kind": "silence"})
        with anyio.move_on_after(0.5):
            await chat(gw, "sk-team-a-0001")
        assert await used(store, "tokens", "key:static:k") == 0
        assert await used(store, "concurrency", "key:static:k") == 0

    async def test_failover_attempts_are_summed(self, anyio_backend: str, store: MemoryStateStore) -> None:
        """Settlement charges every attempt's usage: a failed attempt with none counts 0, a served one in full."""
        principal = Principal(key_id="k1", org="o", limits=KeyLimits(tpm=100_000))
        router = Router([ModelRoute("chat", (Target("p1", "m1", price=PRICE), Target("p2", "m2", price=Price(Decimal(1), Decimal(1)))))])

        async def two_attempts(scope: Scope, receive: Receive, send: Send) -> None:
            ctx, _ = await ensure_context(scope, receive)
            ctx.attempt_log.append(Attempt(number=1, route="p1/m1", provider="p1", model="m1", started_at=0, status=502))
            ctx.attempt_log.append(Attempt(number=2, route="p2/m2", provider="p2", model="m2", started_at=0, outcome="ok",
                                           usage=Usage(prompt_tokens=7, completion_tokens=5, total_tokens=12)))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        async def as_principal(scope: Scope, receive: Receive, send: Send) -> None:
            ctx, receive = await ensure_context(scope, receive)
            ctx.principal = principal
            await quota(scope, receive, send)

        quota = QuotaMiddleware(two_attempts, store=store, router=router, org_limits=KeyLimits(spend_usd_per_day=1))
        app = ErrorMiddleware(ContextMiddleware(as_principal))
        assert (await call(app, body={"model": "chat", "messages": MESSAGES, "max_tokens": 10})).status == 200
        assert await used(store, "tokens", "key:k1") == 12
        assert await used(store, "spend_day", "org:o") == 12 * MICRO  # priced at p2's 1 USD / 1M = 1 micro-USD per token


class TestSpend:
    async def test_budget_reserves_the_maximum_and_keeps_the_real_cost(self, gw_factory: Callable[..., Any]) -> None:
        """A daily budget admits while the worst case fits; the 429 says which budget and when it resets."""
        # Each call reserves about (body/4 + 10) tokens; 2000 micro-USD per output token → ~0.03 USD.
        gw = await gw_factory(StaticKey(key="sk-team-a-0001", org="a", name="k", limits=KeyLimits(spend_usd_per_day=Decimal("0.05"))))
        assert (await chat(gw, "sk-team-a-0001", max_tokens=10)).status == 200  # real cost ≈ 0.02
        rec = await chat(gw, "sk-team-a-0001", max_tokens=10)
        assert rec.status == 429
        err = rec.json()["error"]
        assert err["code"] == "insufficient_quota" and "USD per day" in err["message"] and "$0.05" in err["message"]
        assert 1 <= int(rec.headers["retry-after"]) <= 86_400


class TestStoreFailure:
    class Down(MemoryStateStore):
        async def reserve(self, limits: Sequence[Limit], *, reservation_id: str, lease_s: float = 660.0) -> Any:
            raise StoreError("Redis state store failed during rate-limit admission: Connection refused")

    async def test_fail_closed_is_503(self, gw_factory: Callable[..., Any], upstream_a: FakeUpstreamHandle) -> None:
        """Policy closed (default): an unreachable store refuses with a 503 that says why — never a 500."""
        gw = await gw_factory(StaticKey(key="sk-team-a-0001", org="a", limits=KeyLimits(rpm=5)), store=self.Down())
        rec = await chat(gw, "sk-team-a-0001")
        assert rec.status == 503 and rec.json()["error"]["code"] == "store_unavailable"
        assert "state_failure" in rec.json()["error"]["message"] and rec.headers["retry-after"] == "1"
        assert upstream_a.stats()["requests"] == {}

    async def test_fail_open_admits(self, gw_factory: Callable[..., Any]) -> None:
        """Policy open: an unreachable store admits the request without limits."""
        gw = await gw_factory(StaticKey(key="sk-team-a-0001", org="a", limits=KeyLimits(rpm=5)), store=self.Down(), failure="open")
        rec = await chat(gw, "sk-team-a-0001")
        assert rec.status == 200 and "x-ratelimit-limit-requests" not in rec.headers


class TestFormat:
    @pytest.mark.parametrize(("s", "text"), [(0, "0s"), (0.02, "20ms"), (1.5, "1.5s"), (59.9999, "60s"), (360, "6m0s"), (61.4, "1m1s")])
    def test_reset_format(self, s: float, text: str) -> None:
        """Reset durations use OpenAI's compact format."""
        assert format_reset(s) == text


class TestPlans:
    """Limit plans are cached per (key, model), never past a change of the key."""

    def test_changed_limits_take_effect(self) -> None:
        """A key updated in the key store (same id, new limits) gets its new limits at once."""
        q = QuotaMiddleware(lambda *a: None, store=MemoryStateStore(), org_limits=KeyLimits(rpm=9))
        before = q.limits_for(Principal(key_id="k1", org="o", limits=KeyLimits(rpm=5)), "chat", tokens=1, spend=0)
        after = q.limits_for(Principal(key_id="k1", org="o", limits=KeyLimits(rpm=7, tpm=50)), "chat", tokens=3, spend=0)
        assert [(lim.kind, lim.limit, lim.cost) for lim in before] == [("requests", 5, 1), ("requests", 9, 1)]
        assert [(lim.kind, lim.limit, lim.cost) for lim in after] == [("requests", 7, 1), ("tokens", 50, 3), ("requests", 9, 1)]

    def test_costs_are_per_request(self) -> None:
        """Token and spend limits carry each request's own estimate; an equal principal reuses the plan."""
        q = QuotaMiddleware(lambda *a: None, store=MemoryStateStore())
        limits = KeyLimits(rpm=5, tpm=100, concurrency=2, spend_usd_per_day=Decimal("0.5"), spend_usd_per_month=3)
        first = q.limits_for(Principal(key_id="k1", org="o", limits=limits), "chat", tokens=10, spend=20)
        second = q.limits_for(Principal(key_id="k1", org="o", limits=limits), "chat", tokens=11, spend=21)
        assert [lim.cost for lim in first] == [1, 10, 1, 20, 20] and [lim.cost for lim in second] == [1, 11, 1, 21, 21]
        assert [lim.limit for lim in second] == [5, 100, 2, 500_000 * MICRO, 3_000_000 * MICRO]
        assert first[0] is second[0]

    def test_cache_is_bounded(self) -> None:
        """Many keys do not grow the plan cache past its bound."""
        q = QuotaMiddleware(lambda *a: None, store=MemoryStateStore())
        for i in range(_MAX_PLANS + 5):
            q.limits_for(Principal(key_id=f"k{i}", org="o", limits=KeyLimits(rpm=1)), "chat", tokens=1, spend=0)
        assert len(q._plans) <= _MAX_PLANS


_statuses = st.lists(st.builds(
    lambda kind, limit, remaining, reset: LimitStatus(Limit(kind, "s", limit, 1), 0, remaining, reset),
    st.sampled_from(["requests", "tokens", "concurrency"]), st.integers(1, 5), st.integers(0, 3), st.sampled_from([0.0, 0.02, 1.5, 61.4])),
    max_size=6)


class TestHeaders:
    @given(_statuses)
    def test_tightest_limit_per_kind(self, statuses: list[LimitStatus]) -> None:
        """Per kind, the status with the fewest remaining, then the longest reset, then the first, in OpenAI's order."""
        expected: list[tuple[bytes, bytes]] = []
        for kind in ("requests", "tokens"):
            candidates = [s for s in statuses if s.limit.kind == kind]
            if candidates:
                s = min(candidates, key=lambda s: (s.remaining, -s.reset_s))
                expected += [(f"x-ratelimit-limit-{kind}".encode(), str(s.limit.limit).encode()),
                             (f"x-ratelimit-remaining-{kind}".encode(), str(s.remaining).encode()),
                             (f"x-ratelimit-reset-{kind}".encode(), format_reset(s.reset_s).encode())]
        assert rate_limit_headers(statuses) == expected


class TestSettleTimeout:
    class Slow(MemoryStateStore):
        settle_never_awaits = False

        async def settle(self, reservation: Reservation, *, tokens: int, spend: int) -> None:
            await anyio.sleep(30)

    async def test_slow_settlement_is_bounded(self) -> None:
        """A store whose settle can wait gets the settle timeout: the request ends anyway."""
        async def ok(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        async def as_principal(scope: Scope, receive: Receive, send: Send) -> None:
            ctx, receive = await ensure_context(scope, receive)
            ctx.principal = Principal(key_id="k1", org="o", limits=KeyLimits(rpm=5))
            await quota(scope, receive, send)

        quota = QuotaMiddleware(ok, store=self.Slow(), settle_timeout_s=0.05)
        started = time.monotonic()
        rec = await call(ErrorMiddleware(ContextMiddleware(as_principal)), body={"model": "chat", "messages": MESSAGES})
        assert rec.status == 200 and time.monotonic() - started < 5
