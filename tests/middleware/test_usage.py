"""UsageMiddleware in a real gateway (build_gateway) against the fake upstreams: one
ledger row per attempt, totals equal to what the upstreams billed; the usage admin API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_llm.config import config_from_dict
from asgi_llm.stack import Gateway, build_gateway, gateway_lifespan
from asgi_llm.testing.fake_upstream import count_tokens, prompt_tokens_for
from asgi_llm.testing.processes import FakeUpstreamHandle
from tests.conftest import UPSTREAM_KEYS
from tests.harness import Recorded, call

pytestmark = pytest.mark.anyio

ADMIN = "adm-test-0123456789"
TEAM_A = "sk-team-a-0123456789"
TEAM_B = "sk-team-b-0123456789"
ORG_ADMIN_B = "adm-org-b-0123456789"
MESSAGES = [{"role": "user", "content": "count my tokens please"}]
REPLY_A = "Hello from provider-a. You said: count my tokens please"
PRICE_A = {"input": "0.15", "output": "0.60"}
PRICE_B = {"input": "0.05", "output": "0.08"}


def recipe(a: FakeUpstreamHandle, b: FakeUpstreamHandle, ledger: str, spill: Path) -> dict[str, Any]:
    return {
        "providers": {
            "provider-a": {"base_url": a.base_url, "api_keys": [UPSTREAM_KEYS["provider-a"]], "timeout_s": 5, "ttft_timeout_s": 3},
            "provider-b": {"base_url": b.base_url, "api_keys": [UPSTREAM_KEYS["provider-b"]], "timeout_s": 5, "ttft_timeout_s": 3},
        },
        "models": {
            "chat": {"targets": [{"provider": "provider-a", "model": "gpt-4o-mini", "price": PRICE_A}]},
            "chat-b": {"targets": [{"provider": "provider-b", "model": "llama-3.1-8b", "price": PRICE_B}]},
            "fo": {"targets": [{"provider": "provider-a", "model": "gpt-4o-mini", "price": PRICE_A},
                               {"provider": "provider-b", "model": "llama-3.1-8b", "price": PRICE_B}]},
        },
        "stores": {"ledger": ledger},
        "auth": {"admin_keys": [ADMIN], "keys": [
            {"key": TEAM_A, "org": "team-a", "name": "a"},
            {"key": TEAM_B, "org": "team-b", "name": "b"},
            {"key": ORG_ADMIN_B, "org": "team-b", "name": "b-admin", "scopes": ["admin"]},
        ]},
        "cache": {"enabled": True},
        "routing": {"retries_per_target": 0, "health": {"probe_interval_s": 0}},
        "usage": {"flush_interval_s": 0.05, "prompt_estimate": "words", "spill_dir": str(spill),
                  "prompt_content_orgs": ["team-b"]},
    }


def with_query(app: ASGIApp) -> ASGIApp:
    """The harness sends no query string: split ``path?query``."""

    async def shim(scope: Scope, receive: Receive, send: Send) -> None:
        path, _, query = scope["path"].partition("?")
        await app({**scope, "path": path, "raw_path": path.encode(), "query_string": query.encode()}, receive, send)

    return shim


@pytest.fixture
async def gw(upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle, tmp_path: Path) -> AsyncIterator[Gateway]:
    cfg = config_from_dict(recipe(upstream_a, upstream_b, f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path / "spill"), environ={})
    gateway = build_gateway(cfg)
    async with gateway_lifespan(gateway):
        yield gateway


def auth(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key}".encode())]


async def chat(gw: Gateway, key: str = TEAM_A, **body: Any) -> Recorded:
    payload = {"model": "chat", "messages": MESSAGES, **body}
    return await call(gw, body=payload, headers=auth(key))


async def rows(gw: Gateway) -> list[dict[str, Any]]:
    await gw.services.ledger_writer.flush()
    return await gw.services.ledger_store.rows()  # type: ignore[no-any-return]


def billed(*ups: FakeUpstreamHandle) -> tuple[int, int]:
    stats = [u.stats()["usage"] for u in ups]
    return sum(s["prompt_tokens"] for s in stats), sum(s["completion_tokens"] for s in stats)


def totals(rs: list[dict[str, Any]]) -> tuple[int, int]:
    return sum(r["prompt_tokens"] for r in rs), sum(r["completion_tokens"] for r in rs)


class TestLedgerRows:
    async def test_non_stream_row(self, gw: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """A plain call is one row: the upstream's tokens, the recipe price, who and where."""
        rec = await chat(gw)
        assert rec.status == 200
        (r,) = await rows(gw)
        p, c = prompt_tokens_for(MESSAGES), count_tokens(REPLY_A)
        assert (r["prompt_tokens"], r["completion_tokens"]) == (p, c) == billed(upstream_a)
        assert Decimal(r["cost_usd"]) == (p * Decimal("0.15") + c * Decimal("0.60")) / 1_000_000
        assert (r["org"], r["key_id"], r["model"], r["route"], r["outcome"], r["status"]) == \
            ("team-a", "static:a", "chat", "provider-a/gpt-4o-mini", "ok", 200)
        assert r["request_id"] == rec.headers["x-request-id"] and r["price_source"] == "recipe"
        assert r["response_model"] == "gpt-4o-mini" and r["estimated"] is False and r["prompt_hash"]
        assert r["prompt_text"] is None  # team-a did not opt in

    async def test_stream_row_has_usage_and_ttft(self, gw: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """A stream (usage not asked by the client) is metered from the usage chunk, with TTFT."""
        rec = await chat(gw, stream=True)
        assert rec.status == 200 and rec.sse_data()[-1] == "[DONE]"
        (r,) = await rows(gw)
        assert totals([r]) == billed(upstream_a) and r["ttft_ms"] is not None and r["stream"] is True

    async def test_failover_records_every_attempt(self, gw: Gateway, upstream_a: FakeUpstreamHandle,
                                                  upstream_b: FakeUpstreamHandle) -> None:
        """A failed attempt is a row with zero tokens and zero cost; the serving one is billed."""
        upstream_a.add_faults({"kind": "status", "status": 503})
        rec = await chat(gw, model="fo")
        assert rec.status == 200 and rec.headers["x-asgi-llm-attempts"] == "2"
        first, second = sorted(await rows(gw), key=lambda r: r["attempt"])
        assert (first["outcome"], first["prompt_tokens"], first["completion_tokens"], first["cost_usd"]) == ("error", 0, 0, "0")
        assert first["route"] == "provider-a/gpt-4o-mini" and second["route"] == "provider-b/llama-3.1-8b"
        assert second["outcome"] == "ok" and first["request_id"] == second["request_id"]
        assert totals([first, second]) == billed(upstream_a, upstream_b)

    async def test_stream_cut_before_content_fails_over(self, gw: Gateway, upstream_a: FakeUpstreamHandle,
                                                        upstream_b: FakeUpstreamHandle) -> None:
        """An upstream that accepted the prompt and died before content billed the prompt: so does the ledger."""
        upstream_a.add_faults({"kind": "cut", "after_chunks": 0})
        rec = await chat(gw, model="fo", stream=True)
        assert rec.status == 200
        rs = await rows(gw)
        first, second = sorted(rs, key=lambda r: r["attempt"])
        # (the second may read 'aborted' under trio: dispatch sees the harness's disconnect
        # right after the last chunk — its usage chunk was still recorded)
        assert first["outcome"] == "error" and second["route"] == "provider-b/llama-3.1-8b"
        assert totals(rs) == billed(upstream_a, upstream_b)

    async def test_cut_after_commit_is_estimated(self, gw: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """A stream cut mid-answer has no usage chunk: content chunks and a prompt estimate, flagged."""
        upstream_a.add_faults({"kind": "cut", "after_chunks": 3})
        rec = await chat(gw, stream=True)
        assert "error" in rec.sse_data()[-1]
        (r,) = await rows(gw)
        assert r["outcome"] == "error" and r["estimated"] is True and r["completion_tokens"] == 3
        assert totals([r]) == billed(upstream_a)

    async def test_client_disconnect_is_metered(self, gw: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """A client that goes away mid-stream: the row is 'aborted' with what was generated."""
        upstream_a.add_faults({"kind": "chunk_delay", "delay_s": 0.05})
        await call(gw, body={"model": "chat", "messages": MESSAGES, "stream": True}, headers=auth(TEAM_A),
                   disconnect_after_parts=3)
        stats = upstream_a.wait_stats(lambda s: s["in_flight"] == 0 and s["usage"]["billed_requests"] >= 1, timeout=3)
        (r,) = await rows(gw)
        assert r["outcome"] == "aborted" and r["estimated"] is True
        if stats["disconnects"]:  # the upstream saw the cancel (the e2e test checks this with uvicorn)
            assert totals([r]) == billed(upstream_a)

    async def test_cache_hit_row(self, gw: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """A cache hit is one row: no tokens billed, cost 0, saved = what the call would have cost."""
        first = await chat(gw, temperature=0)
        second = await chat(gw, temperature=0)
        assert second.headers["x-asgi-llm-cache"] == "HIT" and first.body == second.body
        miss, hit = sorted(await rows(gw), key=lambda r: r["outcome"] == "cache_hit")
        assert hit["outcome"] == "cache_hit" and hit["cost_usd"] == "0" and hit["prompt_tokens"] == 0
        assert hit["saved_usd"] == miss["cost_usd"] and hit["route"] == miss["route"]
        assert totals([miss, hit]) == billed(upstream_a)

    async def test_prompt_text_only_for_opted_in_org(self, gw: Gateway) -> None:
        """Prompt content is stored only for an org that opted in; the hash is per org."""
        await chat(gw)
        await chat(gw, key=TEAM_B)
        by_org = {r["org"]: r for r in await rows(gw)}
        assert by_org["team-a"]["prompt_text"] is None
        assert json.loads(by_org["team-b"]["prompt_text"]) == MESSAGES
        assert by_org["team-a"]["prompt_hash"] != by_org["team-b"]["prompt_hash"]

    async def test_cost_is_on_the_context(self, gw: Gateway) -> None:
        """ctx.cost carries the request's total for outer layers (quota settlement)."""
        from asgi_llm.context import get_context

        seen: dict[str, Any] = {}

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await gw(scope, receive, send)
            seen["ctx"] = get_context(scope)

        await call(app, body={"model": "chat", "messages": MESSAGES}, headers=auth(TEAM_A))
        (r,) = await rows(gw)
        assert seen["ctx"].cost == Decimal(r["cost_usd"])


class TestUsageAdmin:
    async def _traffic(self, gw: Gateway) -> None:
        await chat(gw)
        await chat(gw, model="chat-b")
        await chat(gw, key=TEAM_B)
        await gw.services.ledger_writer.flush()

    async def test_report_json(self, gw: Gateway) -> None:
        """GET /admin/usage groups by the requested columns."""
        await self._traffic(gw)
        rec = await call(with_query(gw), method="GET", path="/admin/usage?group_by=org,model", headers=auth(ADMIN))
        assert rec.status == 200, rec.body
        doc = rec.json()
        assert doc["object"] == "usage.report" and doc["group_by"] == ["org", "model"]
        assert [(r["org"], r["model"], r["requests"]) for r in doc["data"]] == \
            [("team-a", "chat", 1), ("team-a", "chat-b", 1), ("team-b", "chat", 1)]

    async def test_report_csv(self, gw: Gateway) -> None:
        """format=csv answers CSV with a header line."""
        await self._traffic(gw)
        rec = await call(with_query(gw), method="GET", path="/admin/usage?group_by=route&format=csv", headers=auth(ADMIN))
        assert rec.headers["content-type"].startswith("text/csv")
        lines = rec.body.decode().splitlines()
        assert lines[0].startswith("route,requests,attempts") and len(lines) == 3

    async def test_org_admin_sees_only_its_org(self, gw: Gateway) -> None:
        """An admin key bound to an org reads only that org; asking for another is 403."""
        await self._traffic(gw)
        rec = await call(with_query(gw), method="GET", path="/admin/usage?group_by=org", headers=auth(ORG_ADMIN_B))
        assert [r["org"] for r in rec.json()["data"]] == ["team-b"]
        rec = await call(with_query(gw), method="GET", path="/admin/usage?org=team-a", headers=auth(ORG_ADMIN_B))
        assert rec.status == 403

    async def test_inference_key_cannot_read_usage(self, gw: Gateway) -> None:
        """A plain inference key gets 403 from the admin API."""
        rec = await call(with_query(gw), method="GET", path="/admin/usage", headers=auth(TEAM_A))
        assert rec.status == 403

    async def test_bad_parameters_are_400(self, gw: Gateway) -> None:
        """Unknown group_by or a bad date is a 400 in OpenAI's error shape."""
        for q in ("group_by=colour", "since=yesterday-ish", "format=xml"):
            rec = await call(with_query(gw), method="GET", path=f"/admin/usage?{q}", headers=auth(ADMIN))
            assert rec.status == 400 and set(rec.json()["error"]) == {"message", "type", "param", "code"}

    async def test_route_comparison_and_top_prompts(self, gw: Gateway) -> None:
        """The same prompt on two routes is compared side by side; top prompts rank by cost."""
        await self._traffic(gw)
        rec = await call(with_query(gw), method="GET", path="/admin/usage/compare?org=team-a", headers=auth(ADMIN))
        data = rec.json()["data"]
        assert [d["route"] for d in data] == ["provider-b/llama-3.1-8b", "provider-a/gpt-4o-mini"]
        assert Decimal(data[0]["cost_per_request_usd"]) < Decimal(data[1]["cost_per_request_usd"])
        rec = await call(with_query(gw), method="GET", path="/admin/usage/top-prompts?by=count", headers=auth(ADMIN))
        top = rec.json()["data"]
        assert top[0]["requests"] == 2 and "prompt_text" not in top[0]
        assert top[1]["prompt_text"]  # team-b opted in


async def test_sqlite_ledger_survives_trio_and_asyncio(gw: Gateway, upstream_a: FakeUpstreamHandle) -> None:
    """The whole metering path runs under both backends (this test is parametrised by anyio_backend)."""
    for _ in range(3):
        assert (await chat(gw)).status == 200
    rs = await rows(gw)
    assert len(rs) == 3 and totals(rs) == billed(upstream_a)


async def test_a_price_that_cannot_be_applied_keeps_the_row(anyio_backend: str) -> None:
    """An Infinity price times zero cached tokens is a Decimal InvalidOperation: it used to
    drop every row of the request (unmetered traffic). The row is kept, its cost 0 and
    flagged, its tokens recorded."""
    from asgi_llm.context import Usage
    from asgi_llm.middleware.usage import UsageMiddleware
    from asgi_llm.routing.router import Price, Target
    from asgi_llm.usage.records import LedgerRow, bounded

    mw = UsageMiddleware(None, sink=lambda row: None)  # type: ignore[arg-type]
    target = Target("node:n", model="m", price=Price(Decimal("Infinity"), Decimal("Infinity")))
    quote = mw.accountant.quote(target, Usage(prompt_tokens=10, completion_tokens=5), route="node:n/m", model="m",
                                provider="node:n")
    assert quote.cost.is_nan() and quote.source == "invalid"
    r = bounded(LedgerRow(request_id="r", org="o", key_id="k", model="m", route="node:n/m", provider="node:n",
                          upstream_model="m", prompt_tokens=10, completion_tokens=5, cost_usd=quote.cost,
                          price_source=quote.source))
    assert (r.cost_usd, r.flags, r.prompt_tokens) == (0, "cost_invalid", 10)
