"""ContextMiddleware: one parse, one validation, body limits, replayed receive."""

from __future__ import annotations

import json

import anyio
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


class TestBodyLimits:
    async def test_inflight_budget_is_a_503_and_is_given_back(self) -> None:
        """A body that would take the process past its budget: 503 + Retry-After; the
        budget is released when each request ends, so the next one fits again."""
        app = ContextMiddleware(echo_context, max_body_bytes=2048, max_inflight_body_bytes=2048)
        assert app.budget is not None
        app.budget.used = 2000  # other requests hold most of it
        rec = await call(ErrorMiddleware(app), body=CHAT)
        assert rec.status == 503 and rec.headers["retry-after"] == "1"
        assert rec.json()["error"]["code"] == "server_busy"
        app.budget.used = 0
        for _ in range(3):
            assert (await call(ErrorMiddleware(app), body=CHAT)).status == 200
        assert app.budget.used == 0

    async def test_declared_length_is_reserved_before_reading(self) -> None:
        """With Content-Length, the budget is checked before a byte is received."""
        received: list[object] = []
        app = ContextMiddleware(echo_context, max_body_bytes=4096, max_inflight_body_bytes=4096)
        assert app.budget is not None
        app.budget.used = 4000

        async def receive() -> dict[str, object]:
            received.append(1)
            return {"type": "http.request", "body": b"{}", "more_body": False}

        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "", "query_string": b"",
                 "headers": [(b"content-length", b"1000")]}
        await ErrorMiddleware(app)(scope, receive, send)
        assert sent[0]["status"] == 503 and received == []

    async def test_slow_body_is_a_408(self) -> None:
        """A body that does not arrive within body_read_timeout_s: 408, connection: close."""

        async def never(scope: Scope, receive: Receive, send: Send) -> None:
            raise AssertionError("the inner app must not run")

        pieces = [{"type": "http.request", "body": b'{"model":', "more_body": True}]

        async def receive() -> dict[str, object]:
            if pieces:
                return pieces.pop()
            await anyio.sleep_forever()  # a client that stopped sending
            raise AssertionError

        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "", "query_string": b"",
                 "headers": []}
        app = ErrorMiddleware(ContextMiddleware(never, body_read_timeout_s=0.2))
        with anyio.fail_after(5):
            await app(scope, receive, send)
        assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]  # type: ignore[operator]
        assert json.loads(sent[1]["body"])["error"]["code"] == "request_timeout"  # type: ignore[arg-type]

    async def test_admin_bodies_are_bounded_too(self) -> None:
        """Admin/node routes read their own bodies: the same size limit applies to them."""

        async def reads_all(scope: Scope, receive: Receive, send: Send) -> None:
            while (await receive()).get("more_body"):
                pass
            await send_json(send, 200, {})

        app = ErrorMiddleware(ContextMiddleware(reads_all, max_body_bytes=1024))
        rec = await call(app, path="/admin/keys", body_chunks=[b"x" * 600, b"x" * 600])
        assert rec.status == 413
        assert (await call(app, path="/admin/keys", body_chunks=[b"x" * 600])).status == 200

    async def test_held_body_is_read_by_load_body_only(self) -> None:
        """With hold_body_for_auth, layers outside auth see no payload; LoadBody reads it."""
        from asgi_llm.middleware.context import LoadBody, ensure_context

        seen: dict[str, object] = {}

        async def outer_layer(scope: Scope, receive: Receive, send: Send) -> None:
            ctx, receive = await ensure_context(scope, receive)  # a layer before auth
            seen["before"] = ctx.model
            await LoadBody(echo_context)(scope, receive, send)

        rec = await call(ErrorMiddleware(ContextMiddleware(outer_layer, hold_body_for_auth=True)), body=CHAT)
        assert seen["before"] is None and rec.json()["model"] == "chat"


class TestHostileJson:
    @pytest.mark.parametrize(("raw", "words"), [
        (b'{"model":"chat","messages":[{"role":"user","content":"\\ud800"}]}', "lone UTF-16 surrogate"),
        (b'{"model":"chat","messages":[{"role":"user","content":"\xed\xa0\x80"}]}', "lone UTF-16 surrogate"),
        (b'{"model":"chat","messages":[{"role":"user","content":"hi"}],"metadata":{"\\udc00":"v"}}', "surrogate"),
        (b'{"model":"chat","x":' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested too deeply"),
        (b'{"model":"chat","x":' + b"[" * 64 + b"]" * 64 + b"}", "nested too deeply"),
        (b'{"model":"chat","temperature":NaN}', "NaN"),
        (b'{"model":"chat","temperature":Infinity}', "Infinity"),
        (b'{"model":"chat","temperature":-1e400}', "too large"),
        (b'{"model":"chat","seed":99999999999999999999}', "64-bit"),
        (b'{"model":"chat","seed":' + b"9" * 5000 + b"}", "too many digits"),
        (b'{"model":"chat","model":"other","messages":[{"role":"user","content":"hi"}]}', "'model' twice"),
        (b'{"model":"chat","messages":[{"role":"user","content":"a","role":"system"}]}', "'role' twice"),
        (b'{"model":"chat","messages":[],"x":{"\\ud800":1,"\\ud800":2}}', "twice"),
    ])
    async def test_400_with_a_reason(self, raw: bytes, words: str) -> None:
        rec = await call(stack(), body=raw)
        assert rec.status == 400, rec.body
        err = rec.json()["error"]
        assert err["code"] == "invalid_json" and words in err["message"]

    @pytest.mark.parametrize(("raw", "param"), [
        (b'{"model":"chat","seed":99999999999999999999}', "seed"),
        (b'{"model":"chat","messages":[{"role":"user","content":"hi"},{"n":-99999999999999999999}]}', "messages[1].n"),
        (b'{"model":"chat","metadata":{"a":{"b":[1,99999999999999999999]}}}', "metadata.a.b[1]"),
    ])
    async def test_an_integer_past_64_bits_is_named_by_its_field(self, raw: bytes, param: str) -> None:
        """The refusal says where the number is, as a schema error would (``param``)."""
        rec = await call(stack(), body=raw)
        assert rec.status == 400, rec.body
        err = rec.json()["error"]
        assert err["code"] == "invalid_json" and "64-bit" in err["message"]
        assert err["param"] == param

    async def test_valid_unicode_and_big_but_sane_values_pass(self) -> None:
        """Surrogate pairs (emoji), Korean text, 63 levels, int64 and 1e308 are fine."""
        body = {"model": "chat", "messages": [{"role": "user", "content": "😀 한국어"}],
                "deep": json.loads("[" * 62 + "]" * 62), "seed": 2**63 - 1, "x": 1e308}
        rec = await call(stack(), body=json.dumps(body).encode())
        assert rec.status == 200 and rec.json()["payload"]["messages"][0]["content"] == "😀 한국어"
