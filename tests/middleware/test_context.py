"""ContextMiddleware: one parse, one validation, body limits, replayed receive."""

from __future__ import annotations

import json

import pytest
from starlette.types import Receive, Scope, Send

from asgi_llm._asgi import send_json
from asgi_llm.context import get_context
from asgi_llm.middleware.context import ContextMiddleware
from asgi_llm.middleware.errors import ErrorMiddleware
from tests.harness import call

pytestmark = pytest.mark.anyio

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "stream_options": {"include_usage": True}, "custom": 1}


async def echo_context(scope: Scope, receive: Receive, send: Send) -> None:
    """Inner app: report what the context holds and what re-reading the body gives."""
    ctx = get_context(scope)
    assert ctx is not None
    message = await receive()
    await send_json(send, 200, {
        "endpoint": ctx.endpoint, "model": ctx.model, "stream": ctx.stream,
        "include_usage": ctx.include_usage, "payload": ctx.payload,
        "replayed": message.get("body", b"").decode(), "request_id": ctx.request_id,
    })


def stack(**kwargs: int) -> ErrorMiddleware:
    return ErrorMiddleware(ContextMiddleware(echo_context, **kwargs))


class TestContext:
    async def test_parses_once_and_replays_body(self) -> None:
        """The context carries the parsed request; inner apps can still read the same body."""
        raw = json.dumps(CHAT).encode()
        rec = await call(stack(), body=raw)
        out = rec.json()
        assert out["endpoint"] == "chat" and out["model"] == "chat"
        assert out["stream"] is True and out["include_usage"] is True
        assert out["payload"]["custom"] == 1
        assert out["replayed"] == raw.decode()

    async def test_body_in_many_messages(self) -> None:
        """A body that arrives in pieces is joined before parsing."""
        raw = json.dumps(CHAT).encode()
        rec = await call(stack(), body_chunks=[raw[:5], raw[5:20], raw[20:]])
        assert rec.json()["model"] == "chat"

    async def test_limit_by_declared_length(self) -> None:
        """A declared Content-Length over the limit is refused before reading."""
        rec = await call(stack(max_body_bytes=1024), body=b"{}", headers=[(b"content-length", b"5000")])
        assert rec.status == 413

    async def test_limit_while_streaming_body(self) -> None:
        """An undeclared body that grows past the limit is refused."""
        rec = await call(stack(max_body_bytes=1024), body_chunks=[b" " * 600, b" " * 600])
        assert rec.status == 413

    async def test_non_gateway_paths_untouched(self) -> None:
        """A host app's own path passes through without its body being read or validated."""
        seen = {}

        async def host(scope: Scope, receive: Receive, send: Send) -> None:
            seen["body"] = (await receive())["body"]
            seen["endpoint"] = get_context(scope).endpoint
            await send_json(send, 200, {})

        rec = await call(ErrorMiddleware(ContextMiddleware(host)), path="/my/route", body=b"not json at all")
        assert rec.status == 200
        assert seen == {"body": b"not json at all", "endpoint": "other"}

    async def test_mounted_under_root_path(self) -> None:
        """Mounted at /llm, /llm/v1/chat/completions is the chat endpoint."""
        rec = await call(stack(), body=CHAT, root_path="/llm")
        assert rec.json()["endpoint"] == "chat"

    async def test_request_id_sanitised(self) -> None:
        """A sane x-request-id is kept; one with odd characters is replaced."""
        rec = await call(stack(), body=CHAT, headers=[(b"x-request-id", b"abc-123")])
        assert rec.json()["request_id"] == "abc-123"
        rec = await call(stack(), body=CHAT, headers=[(b"x-request-id", b"<script>")])
        assert rec.json()["request_id"].startswith("req_")

    async def test_error_carries_request_id(self) -> None:
        """Errors raised while reading the body still carry x-request-id."""
        rec = await call(stack(), body=b"{", headers=[(b"x-request-id", b"trace-9")])
        assert rec.status == 400 and rec.headers["x-request-id"] == "trace-9"

    async def test_double_wrapping_is_a_configuration_error(self) -> None:
        """ContextMiddleware twice in one stack is refused with a hint."""
        app = ContextMiddleware(ContextMiddleware(echo_context))
        with pytest.raises(RuntimeError, match="ran twice"):
            await call(app, body=CHAT)

    async def test_embeddings_never_stream(self) -> None:
        """`stream` on an embeddings request does not make it a stream."""
        rec = await call(stack(), path="/v1/embeddings", body={"model": "e", "input": "x", "stream": True})
        assert rec.json()["stream"] is False
