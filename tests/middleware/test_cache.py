"""CacheMiddleware in process (asyncio and trio) against a real fake upstream process.

Upstream calls are counted at the fake (``stats()["requests"]``), so "served from the
cache" means the upstream really was not called.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_llm.cache.policy import CachePolicy, CacheRule
from asgi_llm.context import Principal, RequestContext
from asgi_llm.middleware.cache import CacheMiddleware
from asgi_llm.middleware.context import ensure_context
from asgi_llm.providers.base import Timeouts
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.routing.router import ModelRoute, Router, Target
from asgi_llm.stack import Gateway, compose, gateway_lifespan
from asgi_llm.stores import StoreError
from asgi_llm.stores.cache import CacheStore, FlightLockSupport, MemoryCacheStore, RedisCacheStore
from asgi_llm.testing.processes import FakeUpstreamHandle
from tests.conftest import UPSTREAM_KEYS
from tests.harness import Recorded, call
from tests.services import redis_url

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "tell me"}]
EXPECTED = "Hello from provider-a. You said: tell me"
CHAT = {"model": "chat", "messages": MESSAGES, "temperature": 0}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class PrincipalFromHeaders:
    """Stands in for auth: org / key / admin scope from test headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            ctx, receive = await ensure_context(scope, receive)
            h = dict(scope["headers"])
            org = h.get(b"x-test-org", b"default").decode()
            scopes = frozenset({"inference", "admin"}) if b"x-test-admin" in h else frozenset({"inference"})
            ctx.principal = Principal(key_id=h.get(b"x-test-key", b"k1").decode(), org=org, scopes=scopes)
        await self.app(scope, receive, send)


class Seen:
    """Stands in for the usage layer: keeps each request's context to inspect afterwards."""

    def __init__(self, app: ASGIApp, seen: list[RequestContext]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            ctx, receive = await ensure_context(scope, receive)
            self.seen.append(ctx)
        await self.app(scope, receive, send)


class DownStore:
    """A cache store whose backend is unreachable."""

    async def get(self, key: Any) -> bytes | None:
        raise StoreError("cache down")

    async def set(self, key: Any, value: bytes, *, ttl_s: float) -> None:
        raise StoreError("cache down")

    async def purge(self, *, org: str | None = None, model: str | None = None) -> int:
        raise StoreError("cache down")

    async def start(self, task_group: Any) -> None: ...

    async def aclose(self) -> None: ...


Make = Callable[..., Awaitable[tuple[Gateway, list[RequestContext]]]]


@pytest.fixture
async def make(upstream_a: FakeUpstreamHandle) -> AsyncIterator[Make]:
    """Build a gateway: test principal → context recorder → cache → dispatch to provider A."""
    async with contextlib.AsyncExitStack() as stack:

        async def _make(*, store: CacheStore | None = None, policy: CachePolicy | None = None,
                        clock: Callable[[], float] | None = None) -> tuple[Gateway, list[RequestContext]]:
            from asgi_llm.admin.cache import cache_admin_routes

            adapter = OpenAIAdapter("provider-a", base_url=upstream_a.base_url, api_keys=[UPSTREAM_KEYS["provider-a"]],
                                    timeouts=Timeouts(attempt=3, ttft=2, idle=1))
            target = Target("provider-a", "gpt-4o-mini")
            router = Router([ModelRoute("chat", (target,)), ModelRoute("chat2", (target,)),
                             ModelRoute("embed", (Target("provider-a", "text-embedding-3-small"),))])
            st = store if store is not None else MemoryCacheStore()
            seen: list[RequestContext] = []
            kw: dict[str, Any] = {"clock": clock} if clock is not None else {}
            gw = compose(
                providers={"provider-a": adapter}, router=router, resources=[st],
                layers={
                    "auth": PrincipalFromHeaders,
                    "usage": lambda app: Seen(app, seen),
                    "cache": lambda app: CacheMiddleware(app, store=st, policy=policy or CachePolicy(), router=router, **kw),
                },
                admin_routes=cache_admin_routes(st),
            )
            await stack.enter_async_context(gateway_lifespan(gw))
            return gw, seen

        yield _make


def with_query(app: ASGIApp) -> ASGIApp:
    """The harness sends no query string: split ``path?query`` for the admin calls."""

    async def shim(scope: Scope, receive: Receive, send: Send) -> None:
        path, _, query = scope["path"].partition("?")
        await app({**scope, "path": path, "raw_path": path.encode(), "query_string": query.encode()}, receive, send)

    return shim


def upstream_calls(upstream: FakeUpstreamHandle, path: str = "/v1/chat/completions") -> int:
    return int(upstream.stats()["requests"].get(path, 0))


def hdrs(**kw: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in kw.items()]


def stream_text(rec: Recorded) -> str:
    out = ""
    for data in rec.sse_data():
        if data == "[DONE]":
            continue
        for choice in json.loads(data).get("choices", []):
            out += choice.get("delta", {}).get("content") or choice.get("text") or ""
    return out


class TestHitAndMiss:
    async def test_second_identical_call_is_a_hit(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """MISS then HIT with the same body and key hash; the upstream is called once."""
        gw, seen = await make()
        first = await call(gw, body=CHAT)
        second = await call(gw, body={"messages": MESSAGES, "temperature": 0.0, "model": "chat"})
        assert first.headers["x-asgi-llm-cache"] == "MISS" and second.headers["x-asgi-llm-cache"] == "HIT"
        assert first.headers["x-asgi-llm-cache-key"] == second.headers["x-asgi-llm-cache-key"]
        assert second.json() == first.json() and second.json()["choices"][0]["message"]["content"] == EXPECTED
        assert int(second.headers["content-length"]) == len(second.body) and second.headers["age"] == "0"
        assert second.headers["x-asgi-llm-attempts"] == "0" and "x-asgi-llm-route" not in second.headers
        assert upstream_calls(upstream_a) == 1
        hit = seen[-1]
        assert hit.cache_status == "HIT" and hit.usage is not None and hit.usage.completion_tokens == len(EXPECTED.split())
        assert hit.cache_hit.route == "provider-a/gpt-4o-mini"
        assert hit.cache_hit.usage == hit.usage and not hit.attempt_log

    async def test_stream_miss_then_stream_hit(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """A streamed miss passes chunk by chunk; the replayed hit has the same content, one start, [DONE]."""
        gw, _ = await make()
        body = {**CHAT, "stream": True}
        first = await call(gw, body=body)
        assert first.headers["x-asgi-llm-cache"] == "MISS"
        assert len(first.body_parts) == len(EXPECTED.split()) + 3  # relayed as the upstream sent it
        second = await call(gw, body=body)
        assert second.headers["x-asgi-llm-cache"] == "HIT" and second.starts == 1 and second.complete
        assert second.headers["content-type"].startswith("text/event-stream")
        assert stream_text(second) == stream_text(first) == EXPECTED
        chunks = [json.loads(d) for d in second.sse_data()[:-1]]
        assert second.sse_data()[-1] == "[DONE]"
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert all(c["object"] == "chat.completion.chunk" and c["model"] == "gpt-4o-mini" for c in chunks)
        assert all("usage" not in c for c in chunks)
        assert upstream_calls(upstream_a) == 1

    async def test_usage_chunk_replayed_only_when_asked(self, make: Make) -> None:
        """include_usage on the hit gets the usage chunk even if the stored stream's client did not ask."""
        gw, _ = await make()
        await call(gw, body={**CHAT, "stream": True})
        rec = await call(gw, body={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
        assert rec.headers["x-asgi-llm-cache"] == "HIT"
        last = json.loads(rec.sse_data()[-2])
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(EXPECTED.split())

    async def test_stream_and_json_serve_each_other(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """A stored JSON answer serves a streamed request, and a stored stream a JSON request."""
        gw, _ = await make()
        plain = await call(gw, body=CHAT)
        streamed = await call(gw, body={**CHAT, "stream": True})
        assert streamed.headers["x-asgi-llm-cache"] == "HIT" and stream_text(streamed) == EXPECTED
        body = {**CHAT, "tools": TOOLS}
        await call(gw, body={**body, "stream": True})
        as_json = await call(gw, body=body)
        assert as_json.headers["x-asgi-llm-cache"] == "HIT"
        choice = as_json.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"echo": "tell me"}
        assert as_json.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
        assert upstream_calls(upstream_a) == 2

    async def test_completions_and_embeddings(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """Legacy completions (stream → JSON) and embeddings are cached too."""
        gw, _ = await make()
        body = {"model": "chat", "prompt": "say hi", "temperature": 0}
        s = await call(gw, path="/v1/completions", body={**body, "stream": True})
        j = await call(gw, path="/v1/completions", body=body)
        assert j.headers["x-asgi-llm-cache"] == "HIT" and j.json()["choices"][0]["text"] == stream_text(s)
        emb = {"model": "embed", "input": ["a", "b"]}
        e1 = await call(gw, path="/v1/embeddings", body=emb)
        e2 = await call(gw, path="/v1/embeddings", body=emb)
        assert (e1.headers["x-asgi-llm-cache"], e2.headers["x-asgi-llm-cache"]) == ("MISS", "HIT")
        assert e2.json() == e1.json()
        assert upstream_calls(upstream_a, "/v1/completions") == 1 and upstream_calls(upstream_a, "/v1/embeddings") == 1

    async def test_other_paths_pass_through(self, make: Make) -> None:
        """/v1/models and unknown models are untouched by the cache."""
        gw, _ = await make()
        rec = await call(gw, method="GET", path="/v1/models")
        assert rec.status == 200 and "x-asgi-llm-cache-key" not in rec.headers
        rec = await call(gw, body={**CHAT, "model": "nope"})
        assert rec.status == 404 and rec.headers["x-asgi-llm-cache"] == "BYPASS"


class TestCorrectness:
    async def test_tenant_isolation(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """Org B never gets org A's entry for the same request."""
        gw, _ = await make()
        a1 = await call(gw, body=CHAT, headers=hdrs(x_test_org="org-a"))
        b1 = await call(gw, body=CHAT, headers=hdrs(x_test_org="org-b"))
        a2 = await call(gw, body=CHAT, headers=hdrs(x_test_org="org-a", x_test_key="k2"))
        assert [r.headers["x-asgi-llm-cache"] for r in (a1, b1, a2)] == ["MISS", "MISS", "HIT"]
        assert a1.headers["x-asgi-llm-cache-key"] != b1.headers["x-asgi-llm-cache-key"]
        assert upstream_calls(upstream_a) == 2

    async def test_partition_by_key(self, make: Make) -> None:
        """partition=key: two keys of one org do not share entries."""
        gw, _ = await make(policy=CachePolicy(partition="key"))
        await call(gw, body=CHAT, headers=hdrs(x_test_key="k1"))
        other = await call(gw, body=CHAT, headers=hdrs(x_test_key="k2"))
        same = await call(gw, body=CHAT, headers=hdrs(x_test_key="k1"))
        assert (other.headers["x-asgi-llm-cache"], same.headers["x-asgi-llm-cache"]) == ("MISS", "HIT")

    async def test_any_parameter_splits(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """A changed known or unknown parameter is a miss; user/metadata are not."""
        gw, _ = await make()
        await call(gw, body=CHAT)
        assert (await call(gw, body={**CHAT, "max_tokens": 3})).headers["x-asgi-llm-cache"] == "MISS"
        assert (await call(gw, body={**CHAT, "vendor_knob": 1})).headers["x-asgi-llm-cache"] == "MISS"
        assert (await call(gw, body={**CHAT, "model": "chat2"})).headers["x-asgi-llm-cache"] == "MISS"
        rec = await call(gw, body={**CHAT, "user": "u1", "metadata": {"t": "x"}})
        assert rec.headers["x-asgi-llm-cache"] == "HIT"
        assert upstream_calls(upstream_a) == 4

    async def test_nondeterministic_bypass_unless_policy(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """temperature > 0 without seed and n > 1 bypass; a seed, or the policy, makes them cacheable."""
        gw, _ = await make(policy=CachePolicy(models={"chat2": CacheRule(cache_nondeterministic=True)}))
        sampled = {**CHAT, "temperature": 0.7}
        assert [(await call(gw, body=sampled)).headers["x-asgi-llm-cache"] for _ in range(2)] == ["BYPASS", "BYPASS"]
        assert (await call(gw, body={"model": "chat", "messages": MESSAGES})).headers["x-asgi-llm-cache"] == "BYPASS"
        seeded = {**sampled, "seed": 7}
        assert [(await call(gw, body=seeded)).headers["x-asgi-llm-cache"] for _ in range(2)] == ["MISS", "HIT"]
        allowed = {**sampled, "model": "chat2"}
        assert [(await call(gw, body=allowed)).headers["x-asgi-llm-cache"] for _ in range(2)] == ["MISS", "HIT"]
        assert upstream_calls(upstream_a) == 5

    async def test_errors_are_never_stored(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """An upstream error is not stored: the next identical call goes upstream."""
        gw, _ = await make()
        upstream_a.add_faults({"kind": "status", "status": 503})
        assert (await call(gw, body=CHAT)).status == 502
        rec = await call(gw, body=CHAT)
        assert rec.status == 200 and rec.headers["x-asgi-llm-cache"] == "MISS"
        assert upstream_calls(upstream_a) == 2

    # (A malformed chunk is the same case for the cache; it is left out in process because
    # the httpx2 transport under trio leaks its stream generator on it -- see the report.)
    @pytest.mark.parametrize("fault", [{"kind": "cut", "after_chunks": 2}, {"kind": "no_done"}], ids=["cut", "no-done"])
    async def test_cut_stream_is_never_stored(self, make: Make, upstream_a: FakeUpstreamHandle, fault: dict) -> None:
        """A cut, unterminated or malformed stream is not stored; the next call is a fresh miss."""
        gw, _ = await make()
        upstream_a.add_faults(fault)
        broken = await call(gw, body={**CHAT, "stream": True})
        assert "[DONE]" not in broken.sse_data()
        rec = await call(gw, body={**CHAT, "stream": True})
        assert rec.headers["x-asgi-llm-cache"] == "MISS" and stream_text(rec) == EXPECTED
        assert upstream_calls(upstream_a) == 2

    async def test_client_disconnect_is_not_stored(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """A stream the client abandoned is not stored."""
        gw, _ = await make()
        upstream_a.add_faults({"kind": "chunk_delay", "delay_s": 0.1})
        await call(gw, body={**CHAT, "stream": True}, disconnect_after_parts=2)
        rec = await call(gw, body=CHAT)
        assert rec.headers["x-asgi-llm-cache"] == "MISS"

    async def test_store_outage_is_bypass(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """With the store down every request is still served, as BYPASS."""
        gw, _ = await make(store=DownStore())
        for body in (CHAT, {**CHAT, "stream": True}):
            rec = await call(gw, body=body)
            assert rec.status == 200 and rec.headers["x-asgi-llm-cache"] == "BYPASS"
        assert upstream_calls(upstream_a) == 2


class TestControls:
    async def test_no_cache_refreshes_and_no_store_skips(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """no-cache skips the lookup and stores the fresh answer; no-store leaves nothing behind."""
        gw, _ = await make()
        rec = await call(gw, body=CHAT, headers=hdrs(cache_control="no-store"))
        assert rec.headers["x-asgi-llm-cache"] == "BYPASS"
        rec = await call(gw, body={**CHAT, "cache": {"no-store": True}})
        assert rec.headers["x-asgi-llm-cache"] == "BYPASS"
        assert (await call(gw, body=CHAT)).headers["x-asgi-llm-cache"] == "MISS"
        assert (await call(gw, body=CHAT, headers=hdrs(cache_control="no-cache"))).headers["x-asgi-llm-cache"] == "MISS"
        assert (await call(gw, body={**CHAT, "cache": {"no-cache": True}})).headers["x-asgi-llm-cache"] == "MISS"
        # no-store may still be answered from an existing entry (RFC 9111 §5.2.1.5)
        assert (await call(gw, body=CHAT, headers=hdrs(cache_control="no-store"))).headers["x-asgi-llm-cache"] == "HIT"
        assert upstream_calls(upstream_a) == 5
        assert "cache" not in upstream_a.stats()["recent"][-1]["body"]  # never forwarded upstream

    async def test_ttls_and_max_age(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """Policy TTL, client TTL (header / body, capped by max_ttl_s) and max-age, on a fake clock."""
        clock = FakeClock()
        gw, _ = await make(store=MemoryCacheStore(timer=clock), clock=clock,
                           policy=CachePolicy(ttl_s=300, max_ttl_s=1000, models={"chat2": CacheRule(ttl_s=30)}))

        async def status(body: dict, **h: str) -> str:
            return (await call(gw, body=body, headers=hdrs(**h))).headers["x-asgi-llm-cache"]

        assert await status(CHAT) == "MISS"
        clock.now += 100
        assert await status(CHAT, cache_control="max-age=60") == "MISS"  # too old for this client: refreshed
        assert await status(CHAT, cache_control="max-age=60") == "HIT"
        clock.now += 301
        assert await status(CHAT) == "MISS"  # the policy TTL ran out
        short = {**CHAT, "model": "chat2"}
        assert await status(short) == "MISS"
        clock.now += 31
        assert await status(short) == "MISS"  # per-model TTL
        q = {**CHAT, "messages": [{"role": "user", "content": "ttl"}]}
        assert await status(q, x_asgi_llm_cache_ttl="10") == "MISS"
        clock.now += 11
        assert await status(q) == "MISS"  # header TTL
        q2 = {**CHAT, "messages": [{"role": "user", "content": "ttl2"}]}
        assert await status({**q2, "cache": {"ttl": 5000}}) == "MISS"
        clock.now += 999
        assert await status(q2) == "HIT"
        clock.now += 2
        assert await status(q2) == "MISS"  # capped by max_ttl_s
        assert (await call(gw, body=q, headers=hdrs(x_asgi_llm_cache_ttl="soon"))).status == 400

    async def test_policy_disabled_model(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """A model (or org) rule can switch the cache off."""
        gw, _ = await make(policy=CachePolicy(models={"chat2": CacheRule(enabled=False)},
                                              orgs={"quiet": CacheRule(enabled=False)}))
        for _ in range(2):
            assert (await call(gw, body={**CHAT, "model": "chat2"})).headers["x-asgi-llm-cache"] == "BYPASS"
            assert (await call(gw, body=CHAT, headers=hdrs(x_test_org="quiet"))).headers["x-asgi-llm-cache"] == "BYPASS"


async def many(gw: Gateway, n: int, body: dict) -> list[Recorded]:
    out: list[Recorded] = []

    async def one() -> None:
        out.append(await call(gw, body=body))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return out


class TestSingleFlight:
    @pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
    async def test_n_concurrent_identical_one_upstream_call(self, make: Make, upstream_a: FakeUpstreamHandle, stream: bool) -> None:
        """N concurrent identical requests make one upstream call; all get the answer."""
        gw, _ = await make()
        upstream_a.add_faults({"kind": "slow_first_token", "delay_s": 0.4})
        recs = await many(gw, 8, {**CHAT, "stream": stream})
        assert upstream_calls(upstream_a) == 1
        assert sorted(r.headers["x-asgi-llm-cache"] for r in recs) == ["HIT"] * 7 + ["MISS"]
        texts = {stream_text(r) if stream else r.json()["choices"][0]["message"]["content"] for r in recs}
        assert texts == {EXPECTED}

    async def test_failed_leader_hands_over(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """When the leader's stream fails, one waiter leads and the rest are served from it."""
        gw, _ = await make()
        upstream_a.add_faults({"kind": "stall", "after_chunks": 2})
        recs = await many(gw, 4, {**CHAT, "stream": True})
        good = [r for r in recs if "[DONE]" in r.sse_data()]
        assert len(good) == 3 and all(stream_text(r) == EXPECTED for r in good)
        assert sorted(r.headers["x-asgi-llm-cache"] for r in good) == ["HIT", "HIT", "MISS"]
        assert upstream_calls(upstream_a) == 2

    async def test_wait_is_bounded(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """A waiter gives up after wait_s and goes upstream itself."""
        gw, _ = await make(policy=CachePolicy(wait_s=0.1))
        upstream_a.add_faults({"kind": "delay", "delay_s": 0.6})
        recs = await many(gw, 2, CHAT)
        assert [r.headers["x-asgi-llm-cache"] for r in recs] == ["MISS", "MISS"]
        assert upstream_calls(upstream_a) == 2


class TestAdminPurge:
    async def test_purge_by_org_and_model(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """DELETE /admin/cache purges one org's (or one model's) entries; others stay."""
        gw, _ = await make()
        gw = with_query(gw)  # type: ignore[assignment]
        for org in ("org-a", "org-b"):
            for model in ("chat", "chat2"):
                await call(gw, body={**CHAT, "model": model}, headers=hdrs(x_test_org=org))
        admin = hdrs(x_test_org="*", x_test_admin="1")
        rec = await call(gw, method="DELETE", path="/admin/cache?org=org-a", headers=admin)
        assert rec.status == 200 and rec.json() == {"object": "cache.purge", "org": "org-a", "model": None, "purged": 2}
        rec = await call(gw, method="DELETE", path="/admin/cache?model=chat2", headers=admin)
        assert rec.json()["purged"] == 1
        statuses = {(org, model): (await call(gw, body={**CHAT, "model": model}, headers=hdrs(x_test_org=org))).headers["x-asgi-llm-cache"]
                    for org in ("org-a", "org-b") for model in ("chat", "chat2")}
        assert statuses == {("org-a", "chat"): "MISS", ("org-a", "chat2"): "MISS",
                            ("org-b", "chat"): "HIT", ("org-b", "chat2"): "MISS"}

    async def test_org_admin_is_confined(self, make: Make) -> None:
        """An org-bound admin purges its own org only; an empty request is a 400; non-admins get 403."""
        gw, _ = await make()
        gw = with_query(gw)  # type: ignore[assignment]
        org_admin = hdrs(x_test_org="org-a", x_test_admin="1")
        assert (await call(gw, method="DELETE", path="/admin/cache?org=org-b", headers=org_admin)).status == 403
        rec = await call(gw, method="DELETE", path="/admin/cache", headers=org_admin)
        assert rec.status == 200 and rec.json()["org"] == "org-a"
        root = hdrs(x_test_org="*", x_test_admin="1")
        assert (await call(gw, method="DELETE", path="/admin/cache", headers=root)).status == 400
        assert (await call(gw, method="DELETE", path="/admin/cache?all=true", headers=root)).status == 200
        assert (await call(gw, method="DELETE", path="/admin/cache?all=true", headers=hdrs(x_test_org="x"))).status == 403


class TestRedisBackend:
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"  # redis.asyncio

    async def test_replicas_share_entries_and_flights(self, make: Make, upstream_a: FakeUpstreamHandle) -> None:
        """Two gateways on one Redis: a hit across replicas, and one upstream call for concurrent misses."""
        url = redis_url(13)
        gw1, _ = await make(store=RedisCacheStore(url))
        gw2, _ = await make(store=RedisCacheStore(url))
        assert (await call(gw1, body=CHAT)).headers["x-asgi-llm-cache"] == "MISS"
        assert (await call(gw2, body=CHAT)).headers["x-asgi-llm-cache"] == "HIT"
        upstream_a.add_faults({"kind": "slow_first_token", "delay_s": 0.4})
        body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "flight"}]}
        recs: list[Recorded] = []

        async def one(gw: Gateway) -> None:
            recs.append(await call(gw, body=body))

        async with anyio.create_task_group() as tg:
            for gw in (gw1, gw2, gw1, gw2):
                tg.start_soon(one, gw)
        assert upstream_calls(upstream_a) == 2
        assert sorted(r.headers["x-asgi-llm-cache"] for r in recs) == ["HIT", "HIT", "HIT", "MISS"]
        assert all(stream_text(r) == "Hello from provider-a. You said: flight" for r in recs)


class TestComposition:
    async def test_double_wrapping_is_an_error(self, anyio_backend: str) -> None:
        """Two cache layers on one request is a configuration error with a hint."""

        async def never(scope: Scope, receive: Receive, send: Send) -> None:
            raise AssertionError("not reached")

        store = MemoryCacheStore()
        app = CacheMiddleware(CacheMiddleware(never, store=store), store=store)
        with pytest.raises(RuntimeError, match="ran twice"):
            await call(app, body=CHAT)

    async def test_build_gateway_wires_the_layer(self, anyio_backend: str) -> None:
        """A recipe with the cache on gets the layer, its store in services and the purge route; off gets none."""
        from asgi_llm.config import config_from_dict
        from asgi_llm.stack import build_gateway

        base = {"providers": {"a": {"base_url": "http://127.0.0.1:1/v1"}}, "models": {"chat": {"targets": [{"provider": "a", "model": "m"}]}}}
        on = build_gateway(config_from_dict({**base, "cache": {"enabled": False, "models": {"chat": {"enabled": True}}}}, environ={}))
        assert isinstance(on.services.cache_store, MemoryCacheStore)
        off = build_gateway(config_from_dict(base, environ={}))
        assert off.services.cache_store is None
        assert not isinstance(MemoryCacheStore(), FlightLockSupport)
