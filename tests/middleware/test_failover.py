"""FailoverMiddleware in process: real adapters, dispatch and error layer, with recording
fake transports at the UpstreamTransport seam (asgi_llm.testing.transport)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from asgi_llm.errors import UpstreamConnectionError
from asgi_llm.middleware.failover import FailoverMiddleware, FailoverPolicy
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.routing.router import ModelRoute, Router
from asgi_llm.stack import Gateway, compose, gateway_lifespan
from asgi_llm.targets import Target
from asgi_llm.testing.transport import Answer, RecordingTransport
from tests.harness import call

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hi"}]


def completion(text: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }).encode()


def stream(*pieces: str) -> bytes:
    events = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    events.append({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def error(status: int, message: str, code: str | None = None) -> Answer:
    return Answer(status, json.dumps({"error": {"message": message, "type": "x", "param": None, "code": code}}).encode())


OK_A = Answer(200, completion("from a"))
OK_B = Answer(200, completion("from b"))


def gateway(a: RecordingTransport, b: RecordingTransport, **policy: Any) -> Gateway:
    providers = {
        "a": OpenAIAdapter("a", base_url="https://a.example/v1", api_keys=["sk-a"], transport=a),
        "b": OpenAIAdapter("b", base_url="https://b.example/v1", api_keys=["sk-b"], transport=b),
    }
    router = Router([ModelRoute("chat", (Target("a", "model-a"), Target("b", "model-b")))])
    pol = FailoverPolicy(backoff_base_s=0.0, max_retry_wait_s=0.0, **policy)
    return compose(providers=providers, router=router,
                   layers={"failover": lambda app: FailoverMiddleware(app, router=router, policy=pol)})


class TestFailoverInProcess:
    async def test_5xx_is_retried_once_then_the_next_target_answers(self) -> None:
        """Two 500s on a (one retry), then b: the client sees b's answer and 3 attempts."""
        a, b = RecordingTransport(error(500, "boom")), RecordingTransport(OK_B)
        gw = gateway(a, b)
        async with gateway_lifespan(gw):
            rec = await call(gw, body={"model": "chat", "messages": MESSAGES})
        assert rec.status == 200 and rec.starts == 1 and rec.complete
        assert rec.json()["choices"][0]["message"]["content"] == "from b"
        assert rec.headers["x-asgi-llm-route"] == "b/model-b" and rec.headers["x-asgi-llm-attempts"] == "3"
        assert [r["json"]["model"] for r in a.requests] == ["model-a", "model-a"]
        assert [r["json"]["model"] for r in b.requests] == ["model-b"]
        assert b.requests[0]["url"] == "https://b.example/v1/chat/completions"
        assert b.requests[0]["headers"]["authorization"] == "Bearer sk-b"

    async def test_connection_error_fails_over(self) -> None:
        """A refused connection on a is retried, then b answers."""
        a = RecordingTransport(UpstreamConnectionError("connection refused", retryable=True))
        b = RecordingTransport(OK_B)
        gw = gateway(a, b)
        async with gateway_lifespan(gw):
            rec = await call(gw, body={"model": "chat", "messages": MESSAGES})
        assert rec.status == 200 and rec.headers["x-asgi-llm-route"] == "b/model-b"
        assert len(a.requests) == 2 and len(b.requests) == 1

    async def test_429_moves_to_the_next_target_at_once(self) -> None:
        """A rate-limited target is not retried: b is tried next, once."""
        a, b = RecordingTransport(error(429, "slow down")), RecordingTransport(OK_B)
        gw = gateway(a, b)
        async with gateway_lifespan(gw):
            rec = await call(gw, body={"model": "chat", "messages": MESSAGES})
        assert rec.status == 200 and rec.headers["x-asgi-llm-attempts"] == "2"
        assert len(a.requests) == 1 and len(b.requests) == 1

    async def test_a_client_error_is_returned_at_once(self) -> None:
        """A 400 (bad parameters) is the caller's: no retry, no other target, OpenAI-shaped."""
        a, b = RecordingTransport(error(400, "bad temperature", "invalid_value")), RecordingTransport(OK_B)
        gw = gateway(a, b)
        async with gateway_lifespan(gw):
            rec = await call(gw, body={"model": "chat", "messages": MESSAGES})
        assert rec.status == 400 and set(rec.json()["error"]) >= {"message", "type", "param", "code"}
        assert len(a.requests) == 1 and b.requests == []

    async def test_attempts_are_bounded_when_everything_fails(self) -> None:
        """Every target failing ends after max_attempts sends, with a gateway error."""
        a, b = RecordingTransport(error(500, "boom")), RecordingTransport(error(503, "down"))
        gw = gateway(a, b, max_attempts=3)
        async with gateway_lifespan(gw):
            rec = await call(gw, body={"model": "chat", "messages": MESSAGES})
        assert rec.status >= 500 and "error" in rec.json()
        assert len(a.requests) + len(b.requests) == 3

    async def test_a_stream_fails_over_before_its_first_content(self) -> None:
        """A stream refused before any content leaves no trace: the client gets b's stream whole."""
        a = RecordingTransport(error(502, "bad gateway"))
        b = RecordingTransport(Answer(200, stream("Hel", "lo"), "text/event-stream", piece_bytes=11))
        gw = gateway(a, b)
        async with gateway_lifespan(gw):
            rec = await call(gw, body={"model": "chat", "messages": MESSAGES, "stream": True})
        assert rec.status == 200 and rec.starts == 1 and rec.complete
        data = rec.sse_data()
        assert data[-1] == "[DONE]"
        text = "".join((json.loads(d)["choices"][0]["delta"].get("content") or "") for d in data[:-1]
                       if json.loads(d).get("choices"))
        assert text == "Hello"
        assert rec.headers["x-asgi-llm-route"] == "b/model-b"
        assert b.requests[0]["json"]["stream"] is True
