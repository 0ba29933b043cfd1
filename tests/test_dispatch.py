"""The pipeline in process (asyncio and trio) against a real fake upstream process.

Each `send` message is recorded, so these tests see chunk boundaries, the single
response start, and when the stream ended — what an HTTP client cannot show.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import anyio
import pytest

from asgi_llm.providers.base import Timeouts
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.routing.router import ModelRoute, Router, Target
from asgi_llm.stack import Gateway, compose, gateway_lifespan
from asgi_llm.testing.fake_upstream import count_tokens
from asgi_llm.testing.processes import FakeUpstreamHandle
from tests.conftest import UPSTREAM_KEYS
from tests.harness import call

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "tell me"}]
EXPECTED = "Hello from provider-a. You said: tell me"


async def wait_stats(upstream: FakeUpstreamHandle, predicate: Callable[[dict], bool], timeout: float = 3.0) -> dict:
    """Poll the fake's stats without blocking the loop (closing sockets needs the loop to run)."""
    with anyio.fail_after(timeout):
        while not predicate(stats := upstream.stats()):
            await anyio.sleep(0.02)
    return stats


@pytest.fixture
async def gateway(upstream_a: FakeUpstreamHandle) -> AsyncIterator[Gateway]:
    adapter = OpenAIAdapter(
        "provider-a",
        base_url=upstream_a.base_url,
        api_keys=[UPSTREAM_KEYS["provider-a"]],
        timeouts=Timeouts(attempt=3, ttft=1, idle=1),
    )
    router = Router([ModelRoute("chat", (Target("provider-a", "gpt-4o-mini"),))])
    gw = compose(providers={"provider-a": adapter}, router=router)
    async with gateway_lifespan(gw):
        yield gw


class TestDispatch:
    async def test_non_stream(self, gateway: Gateway) -> None:
        """One start, one body, relayed bytes, gateway headers."""
        rec = await call(gateway, body={"model": "chat", "messages": MESSAGES})
        assert rec.status == 200 and rec.starts == 1 and rec.complete
        assert rec.json()["choices"][0]["message"]["content"] == EXPECTED
        assert rec.headers["x-asgi-llm-route"] == "provider-a/gpt-4o-mini"
        assert int(rec.headers["content-length"]) == len(rec.body)

    async def test_stream_is_relayed_chunk_by_chunk(self, gateway: Gateway) -> None:
        """Each upstream event is its own body message; start sent once; [DONE] closes it."""
        rec = await call(gateway, body={"model": "chat", "messages": MESSAGES, "stream": True})
        assert rec.starts == 1 and rec.complete
        parts = rec.body_parts
        assert parts[-1] == b"data: [DONE]\n\n"
        # role chunk + one per word + finish chunk, each in its own message (usage chunk dropped)
        assert len(parts) - 1 == len(EXPECTED.split()) + 2
        assert all(p.startswith(b"data: ") and p.endswith(b"\n\n") and p.count(b"\n\n") == 1 for p in parts)
        text = "".join(json.loads(p[6:])["choices"][0]["delta"].get("content") or "" for p in parts[:-1])
        assert text == EXPECTED

    async def test_usage_chunk_only_when_asked(self, gateway: Gateway) -> None:
        """With include_usage the client gets the usage chunk; the context records usage either way."""
        rec = await call(gateway, body={"model": "chat", "messages": MESSAGES, "stream": True,
                                        "stream_options": {"include_usage": True}})
        last = json.loads(rec.sse_data()[-2])
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == count_tokens(EXPECTED)

    async def test_cut_stream_ends_with_error_event(self, gateway: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """A stream cut mid-answer ends with one error event, no [DONE], and the response is closed."""
        upstream_a.add_faults({"kind": "cut", "after_chunks": 2})
        rec = await call(gateway, body={"model": "chat", "messages": MESSAGES, "stream": True})
        assert rec.status == 200 and rec.complete and rec.starts == 1
        data = rec.sse_data()
        assert "[DONE]" not in data
        assert "error" in json.loads(data[-1])

    async def test_malformed_stream_ends_with_error_event(self, gateway: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """A malformed chunk after content ends the stream with an error event; no resource is left unclosed."""
        upstream_a.add_faults({"kind": "malformed", "after_chunks": 2})
        rec = await call(gateway, body={"model": "chat", "messages": MESSAGES, "stream": True})
        assert rec.complete and "[DONE]" not in rec.sse_data()
        assert json.loads(rec.sse_data()[-1])["error"]["code"] == "bad_upstream_response"

    async def test_failure_before_first_chunk_is_http_error(self, gateway: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """An upstream that accepts the stream and sends nothing gets a clean 504, not a 200 with an error."""
        upstream_a.add_faults({"kind": "slow_first_token", "delay_s": 3})
        rec = await call(gateway, body={"model": "chat", "messages": MESSAGES, "stream": True})
        assert rec.status == 504
        assert rec.json()["error"]["code"] == "upstream_timeout"

    async def test_client_disconnect_cancels_upstream(self, gateway: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """When the client disconnects after two chunks, the upstream connection is dropped."""
        upstream_a.add_faults({"kind": "chunk_delay", "delay_s": 0.2})
        rec = await call(gateway, body={"model": "chat", "messages": MESSAGES, "stream": True}, disconnect_after_parts=2)
        assert not rec.complete  # nothing more was sent after the disconnect
        stats = await wait_stats(upstream_a, lambda s: s["disconnects"] == 1 and s["in_flight"] == 0)
        assert stats["usage"]["completion_tokens"] < count_tokens(EXPECTED)

    async def test_upstream_status_error(self, gateway: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """A 503 upstream becomes a 502 naming the route."""
        upstream_a.add_faults({"kind": "status", "status": 503, "message": "overloaded"})
        rec = await call(gateway, body={"model": "chat", "messages": MESSAGES})
        assert rec.status == 502
        assert "provider-a/gpt-4o-mini" in rec.json()["error"]["message"]

    async def test_garbage_body(self, gateway: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """A 200 HTML body is a 502, never relayed."""
        upstream_a.add_faults({"kind": "garbage"})
        rec = await call(gateway, body={"model": "chat", "messages": MESSAGES})
        assert rec.status == 502 and rec.json()["error"]["code"] == "bad_upstream_response"

    async def test_models_and_unknown_path(self, gateway: Gateway) -> None:
        """/v1/models lists public names; unknown paths are OpenAI-shaped 404s."""
        rec = await call(gateway, method="GET", path="/v1/models")
        assert [m["id"] for m in rec.json()["data"]] == ["chat"]
        rec = await call(gateway, method="GET", path="/v2/whatever")
        assert rec.status == 404 and rec.json()["error"]["code"] == "not_found"
