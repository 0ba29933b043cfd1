"""End to end: a real gateway process, real fake upstreams, the official openai SDK."""

from __future__ import annotations

import base64
import json
import socket
import struct
import time

import httpx2
import openai
import pytest
from openai.types import CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from asgi_llm.testing.fake_upstream import count_tokens, prompt_tokens_for
from asgi_llm.testing.processes import FakeUpstreamHandle

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is an ASGI gateway"}]
EXPECTED = "Hello from provider-a. You said: what is an ASGI gateway"


def _last_body(upstream: FakeUpstreamHandle) -> dict:
    recent = upstream.stats()["recent"]
    return recent[-1]["body"]


class TestChat:
    def test_non_stream_roundtrip(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """A non-streamed chat completion comes back as the SDK's own type, usage intact."""
        raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
        reply = raw.parse()
        assert isinstance(reply, ChatCompletion)
        assert reply.choices[0].message.content == EXPECTED
        assert reply.choices[0].finish_reason == "stop"
        assert reply.model == "gpt-4o-mini"  # the model that actually served
        assert reply.usage is not None
        assert reply.usage.prompt_tokens == prompt_tokens_for(MESSAGES)
        assert reply.usage.completion_tokens == count_tokens(EXPECTED)
        assert raw.headers["x-asgi-llm-route"] == "provider-a/gpt-4o-mini"
        assert raw.headers["x-asgi-llm-attempts"] == "1"
        assert raw.headers["x-asgi-llm-cache"] == "BYPASS"
        assert float(raw.headers["x-asgi-llm-overhead-ms"]) >= 0
        assert raw.headers["x-request-id"].startswith("req_")

    def test_upstream_gets_rewritten_model_and_its_own_key(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """The upstream sees its own model name and the gateway's upstream key, never the client's key."""
        client.chat.completions.create(model="chat", messages=MESSAGES)
        recent = upstream_a.stats()["recent"][-1]
        assert recent["body"]["model"] == "gpt-4o-mini"
        assert recent["headers"]["authorization"] == "Bearer sk-upstream-a"
        assert "sk-client" not in json.dumps(recent)

    def test_unknown_fields_pass_through(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """Fields the gateway does not know reach the upstream untouched."""
        client.chat.completions.create(
            model="chat",
            messages=MESSAGES,
            temperature=0.3,
            seed=7,
            extra_body={"top_k": 40, "vendor_thing": {"nested": [1, 2]}},
        )
        body = _last_body(upstream_a)
        assert body["top_k"] == 40
        assert body["vendor_thing"] == {"nested": [1, 2]}
        assert body["temperature"] == 0.3 and body["seed"] == 7
        assert body["messages"] == MESSAGES
        assert "stream_options" not in body  # non-streamed calls are not given stream options

    def test_stream_chunks_in_order_with_done(self, gateway_url: str, upstream_a: FakeUpstreamHandle) -> None:
        """Every upstream chunk arrives once, in order, as its own SSE event, then [DONE]."""
        words = EXPECTED.split()
        with httpx2.Client(timeout=10) as http:
            with http.stream(
                "POST", gateway_url + "/chat/completions",
                json={"model": "chat", "messages": MESSAGES, "stream": True},
            ) as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"].startswith("text/event-stream")
                body = resp.read().decode()
        events = [b[6:] for b in body.split("\n\n") if b.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        deltas = [c["choices"][0]["delta"].get("content") for c in chunks]
        # role chunk, one chunk per word, the finish chunk; no usage chunk (not asked for)
        assert deltas[0] == "" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert deltas[1:-1] == [words[0]] + [" " + w for w in words[1:]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert all(c.get("usage") is None for c in chunks)
        assert len(chunks) == len(words) + 2

    def test_stream_with_sdk_and_usage_requested(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """The SDK's stream yields typed chunks; asking for usage gets exactly one usage chunk at the end."""
        stream = client.chat.completions.create(
            model="chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == EXPECTED
        usage_chunks = [c for c in chunks if c.usage is not None]
        assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and not chunks[-1].choices
        assert usage_chunks[0].usage.completion_tokens == count_tokens(EXPECTED)

    def test_usage_always_requested_upstream(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """Even when the client does not ask, the upstream is asked for usage (so streams can be metered)."""
        list(client.chat.completions.create(model="chat", messages=MESSAGES, stream=True))
        body = _last_body(upstream_a)
        assert body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert upstream_a.stats()["usage"]["completion_tokens"] == count_tokens(EXPECTED)

    def test_tools_non_stream_and_stream(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """Tool calls come back intact, streamed or not."""
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
        reply = client.chat.completions.create(model="chat", messages=MESSAGES, tools=tools)
        call = reply.choices[0].message.tool_calls[0]
        assert call.function.name == "lookup"
        assert json.loads(call.function.arguments) == {"echo": "what is an ASGI gateway"}
        assert reply.choices[0].finish_reason == "tool_calls"
        assert _last_body(upstream_a)["tools"] == tools

        stream = client.chat.completions.create(model="chat", messages=MESSAGES, tools=tools, stream=True)
        name, args, finish = "", "", None
        for chunk in stream:
            for choice in chunk.choices:
                for tc in choice.delta.tool_calls or []:
                    name += tc.function.name or "" if tc.function else ""
                    args += tc.function.arguments or "" if tc.function else ""
                finish = choice.finish_reason or finish
        assert name == "lookup" and json.loads(args) == {"echo": "what is an ASGI gateway"}
        assert finish == "tool_calls"

    def test_response_format_passes_through(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """response_format reaches the upstream and its JSON answer is relayed unchanged."""
        reply = client.chat.completions.create(model="chat", messages=MESSAGES, response_format={"type": "json_object"})
        assert json.loads(reply.choices[0].message.content) == {"reply": EXPECTED}
        assert _last_body(upstream_a)["response_format"] == {"type": "json_object"}

    def test_max_tokens_truncates(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """finish_reason 'length' and the truncated usage come through."""
        reply = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=3)
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 3

    def test_second_provider(self, client: openai.OpenAI, upstream_b: FakeUpstreamHandle) -> None:
        """A model on provider B is served by provider B."""
        raw = client.chat.completions.with_raw_response.create(model="chat-b", messages=MESSAGES)
        assert raw.parse().choices[0].message.content.startswith("Hello from provider-b.")
        assert raw.headers["x-asgi-llm-route"] == "provider-b/llama-3.1-8b"

    def test_request_id_is_kept(self, gateway_url: str, upstream_a: FakeUpstreamHandle) -> None:
        """A sane incoming x-request-id is echoed and forwarded upstream (under x-asgi-llm-request-id:
        engines such as llama-cpp-python's server reject non-UUID x-request-id values); a hostile one is replaced."""
        with httpx2.Client(timeout=10) as http:
            r = http.post(gateway_url + "/chat/completions", json={"model": "chat", "messages": MESSAGES},
                          headers={"x-request-id": "trace-123"})
            assert r.headers["x-request-id"] == "trace-123"
            sent = upstream_a.stats()["recent"][-1]["headers"]
            assert sent["x-asgi-llm-request-id"] == "trace-123" and "x-request-id" not in sent
            r = http.post(gateway_url + "/chat/completions", json={"model": "chat", "messages": MESSAGES},
                          headers={"x-request-id": "a b\tc" * 50})
            assert r.headers["x-request-id"].startswith("req_")


class TestOtherEndpoints:
    def test_embeddings_base64_and_float(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """Embeddings work with the SDK's default base64 encoding and with floats; the two agree."""
        res = client.embeddings.create(model="embed", input=["hello world", "bye"])
        assert isinstance(res, CreateEmbeddingResponse)
        assert len(res.data) == 2 and res.usage.prompt_tokens == 3
        floats = client.embeddings.create(model="embed", input=["hello world", "bye"], encoding_format="float")
        assert floats.data[0].embedding == pytest.approx(res.data[0].embedding, rel=1e-6)
        assert _last_body(upstream_a)["model"] == "text-embedding-3-small"

    def test_legacy_completions(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """Legacy completions pass through, streamed and not."""
        res = client.completions.create(model="chat", prompt="say hi")
        assert res.choices[0].text.startswith("Hello from provider-a.")
        streamed = "".join(c.choices[0].text for c in client.completions.create(model="chat", prompt="say hi", stream=True) if c.choices)
        assert streamed == res.choices[0].text

    def test_models_list_and_retrieve(self, client: openai.OpenAI) -> None:
        """GET /v1/models lists the public names; retrieve finds one and 404s an unknown one."""
        names = sorted(m.id for m in client.models.list())
        assert names == ["badkey", "chat", "chat-b", "embed", "limited", "nowhere", "tight"]
        model = client.models.retrieve("chat")
        assert isinstance(model, Model) and model.id == "chat"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-17")

    def test_health_and_ready(self, gateway_url: str) -> None:
        """/healthz and /readyz answer 200."""
        root = gateway_url.removesuffix("/v1")
        with httpx2.Client(timeout=5) as http:
            assert http.get(root + "/healthz").json() == {"status": "ok"}
            assert http.get(root + "/readyz").json() == {"status": "ready"}


def _post_raw(gateway_url: str, body: bytes, *, headers: dict | None = None, path: str = "/chat/completions") -> httpx2.Response:
    with httpx2.Client(timeout=10) as http:
        return http.post(gateway_url + path, content=body, headers={"content-type": "application/json", **(headers or {})})


def _assert_openai_error(resp: httpx2.Response, status: int, *, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    assert resp.headers["x-request-id"]
    return err


class TestBadInput:
    @pytest.mark.parametrize(
        ("body", "code", "param"),
        [
            (b"{not json", "invalid_json", None),
            (b"", "invalid_request_body", None),
            (b"[1, 2]", "invalid_request_body", None),
            (b'"just a string"', "invalid_request_body", None),
            (b'{"messages": [{"role": "user", "content": "x"}]}', "missing_required_parameter", "model"),
            (b'{"model": "chat"}', "missing_required_parameter", "messages"),
            (b'{"model": "chat", "messages": []}', None, "messages"),
            (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "invalid_type", "model"),
            (b'{"model": "chat", "messages": "hi"}', None, "messages"),
            (b'{"model": "chat", "messages": [{"role": "wizard", "content": "x"}]}', None, "messages[0].role"),
            (b'{"model": "chat", "messages": [{"role": "user", "content": 5}]}', None, "messages[0].content"),
            (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "invalid_type", "stream"),
            (b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', None, "max_tokens"),
            (b'\xff\xfe{"model"', "invalid_json", None),
        ],
    )
    def test_malformed_requests_get_400(self, gateway_url: str, body: bytes, code: str | None, param: str | None, upstream_a: FakeUpstreamHandle) -> None:
        """Malformed JSON, wrong types and missing fields → 400 in OpenAI's shape, upstream never called."""
        err = _assert_openai_error(_post_raw(gateway_url, body), 400, code=code, param=param)
        assert err["type"] == "invalid_request_error"
        assert upstream_a.stats()["requests"] == {}

    def test_unknown_model_404(self, client: openai.OpenAI) -> None:
        """An unknown model is a 404 model_not_found, as OpenAI answers."""
        with pytest.raises(openai.NotFoundError) as exc:
            client.chat.completions.create(model="gpt-17", messages=MESSAGES)
        assert exc.value.code == "model_not_found"
        assert "gpt-17" in exc.value.message

    def test_oversized_body_413(self, gateway_url: str, upstream_a: FakeUpstreamHandle) -> None:
        """A body over server.max_body_bytes is refused with 413, declared or chunked."""
        big = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "x" * 70000}]}).encode()
        _assert_openai_error(_post_raw(gateway_url, big), 413, code="request_too_large")

        def chunks():
            for _ in range(20):
                yield b" " * 4096  # no Content-Length: chunked transfer

        with httpx2.Client(timeout=10) as http:
            resp = http.post(gateway_url + "/chat/completions", content=chunks())
        _assert_openai_error(resp, 413, code="request_too_large")
        assert upstream_a.stats()["requests"] == {}

    def test_wrong_method_and_path(self, gateway_url: str) -> None:
        """Wrong method → 405 with Allow; unknown path → 404; both OpenAI-shaped."""
        with httpx2.Client(timeout=10) as http:
            resp = http.get(gateway_url + "/chat/completions")
            _assert_openai_error(resp, 405, code="method_not_allowed")
            assert resp.headers["allow"] == "POST"
            _assert_openai_error(http.post(gateway_url + "/models"), 405)
            _assert_openai_error(http.get(gateway_url + "/nope"), 404, code="not_found")
            _assert_openai_error(http.delete(gateway_url.removesuffix("/v1") + "/"), 404)


class TestUpstreamFaults:
    """A single target that keeps failing: the client gets a clean, bounded error."""

    def test_garbage_is_502(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """An upstream answering HTML with 200 is a 502 naming the route, never a success."""
        upstream_a.add_faults({"kind": "garbage", "times": None})
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="chat", messages=MESSAGES)
        assert exc.value.status_code == 502
        assert exc.value.code == "bad_upstream_response"
        assert "provider-a/gpt-4o-mini" in exc.value.message

    def test_upstream_500_is_502(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """An upstream 5xx is reported as 502 with the upstream's message."""
        upstream_a.add_faults({"kind": "status", "status": 500, "message": "kaboom", "times": None})
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="chat", messages=MESSAGES)
        assert exc.value.status_code == 502 and "kaboom" in exc.value.message

    def test_upstream_429_keeps_retry_after(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """An upstream 429 stays a 429 and its Retry-After reaches the client."""
        upstream_a.add_faults({"kind": "status", "status": 429, "retry_after": 7, "match": {"model": "limited-model"}})
        with pytest.raises(openai.RateLimitError) as exc:
            client.chat.completions.create(model="limited", messages=MESSAGES)
        assert exc.value.response.headers["retry-after"] == "7"
        # The upstream asked for 7 s of quiet: the next call is not sent (no hammering);
        # the client gets a 429 with the remaining wait instead.
        with pytest.raises(openai.RateLimitError) as exc:
            client.chat.completions.create(model="limited", messages=MESSAGES)
        assert 1 <= int(exc.value.response.headers["retry-after"]) <= 7
        assert upstream_a.stats()["requests"].get("/v1/chat/completions") == 1

    def test_context_length_is_relayed_as_400(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """The upstream's context_length_exceeded 400 is relayed with its code and param."""
        upstream_a.add_faults({"kind": "context_length"})
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="chat", messages=MESSAGES)
        assert exc.value.code == "context_length_exceeded"
        assert exc.value.param == "messages"

    def test_upstream_rejecting_gateway_key_is_not_a_client_401(self, client: openai.OpenAI) -> None:
        """Upstream 401 (the gateway's provider key is wrong) is a 502, not the client's auth error."""
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="badkey", messages=MESSAGES)
        assert exc.value.status_code == 502

    def test_connection_refused_is_502(self, client: openai.OpenAI) -> None:
        """Nothing listening upstream → 502 upstream_connection_error, quickly."""
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="nowhere", messages=MESSAGES)
        assert exc.value.status_code == 502 and exc.value.code == "upstream_connection_error"
        assert time.monotonic() - t0 < 5

    def test_reset_before_headers_is_502(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """A connection reset before any response is a 502."""
        upstream_a.add_faults({"kind": "reset", "times": None})
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="chat", messages=MESSAGES)
        assert exc.value.status_code == 502

    @pytest.mark.parametrize("stream", [False, True])
    def test_silent_upstream_times_out_504(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle, stream: bool) -> None:
        """A silent upstream gives a 504 after the configured limit, not a hang."""
        upstream_a.add_faults({"kind": "silence", "match": {"model": "tight-model"}})
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="tight", messages=MESSAGES, stream=stream)
        elapsed = time.monotonic() - t0
        assert exc.value.status_code == 504 and exc.value.code == "upstream_timeout"
        assert 0.9 < elapsed < 5

    def test_slow_first_token_times_out(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """A stream whose first token is later than ttft_timeout_s is a 504 (nothing was sent yet)."""
        upstream_a.add_faults({"kind": "slow_first_token", "delay_s": 3, "match": {"model": "tight-model"}})
        with pytest.raises(openai.APIStatusError) as exc:
            list(client.chat.completions.create(model="tight", messages=MESSAGES, stream=True))
        assert exc.value.status_code == 504


def _sse_events(gateway_url: str, model: str = "chat") -> tuple[int, list[str]]:
    with httpx2.Client(timeout=10) as http:
        with http.stream("POST", gateway_url + "/chat/completions",
                         json={"model": model, "messages": MESSAGES, "stream": True}) as resp:
            body = resp.read().decode()
    return resp.status_code, [b[6:] for b in body.split("\n\n") if b.startswith("data: ")]


class TestBrokenStreams:
    """Without failover, a stream that breaks after it started must end in an error event."""

    @pytest.mark.parametrize(
        "fault",
        [
            {"kind": "cut", "after_chunks": 3},
            {"kind": "malformed", "after_chunks": 2},
            {"kind": "no_done"},
        ],
        ids=["cut", "malformed", "no-done"],
    )
    def test_broken_stream_ends_with_error_event(self, gateway_url: str, upstream_a: FakeUpstreamHandle, fault: dict) -> None:
        """A cut, malformed or unterminated stream ends with a terminal error event and no [DONE]."""
        upstream_a.add_faults(fault)
        status, events = _sse_events(gateway_url)
        assert status == 200
        assert "[DONE]" not in events
        last = json.loads(events[-1])
        assert set(last["error"]) == {"message", "type", "param", "code"}
        assert last["error"]["code"] in {"bad_upstream_response", "upstream_connection_error"}

    def test_sdk_raises_on_truncated_stream(self, client: openai.OpenAI, upstream_a: FakeUpstreamHandle) -> None:
        """The openai SDK turns the terminal error event into an exception: no silent truncation."""
        upstream_a.add_faults({"kind": "cut", "after_chunks": 2})
        with pytest.raises(openai.APIError):
            list(client.chat.completions.create(model="chat", messages=MESSAGES, stream=True))

    def test_stall_mid_stream_ends_with_timeout_event(self, gateway_url: str, upstream_a: FakeUpstreamHandle) -> None:
        """A stream that stalls longer than idle_timeout_s ends with an upstream_timeout event."""
        upstream_a.add_faults({"kind": "stall", "after_chunks": 2, "match": {"model": "tight-model"}})
        t0 = time.monotonic()
        status, events = _sse_events(gateway_url, model="tight")
        assert time.monotonic() - t0 < 5
        assert json.loads(events[-1])["error"]["code"] == "upstream_timeout"


class TestClientDisconnect:
    def test_disconnect_mid_stream_cancels_upstream(self, gateway_url: str, upstream_a: FakeUpstreamHandle) -> None:
        """A client that goes away mid-stream makes the gateway drop the upstream call."""
        upstream_a.add_faults({"kind": "chunk_delay", "delay_s": 0.3})
        host, port = gateway_url.removeprefix("http://").removesuffix("/v1").split(":")
        body = json.dumps({"model": "chat", "messages": MESSAGES, "stream": True}).encode()
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode() + body
            )
            received = b""
            while b"Hello" not in received:
                received += sock.recv(65536)
        # The socket is closed; the upstream must see its stream abandoned well before it would end.
        stats = upstream_a.wait_stats(lambda s: s["disconnects"] >= 1 and s["in_flight"] == 0, timeout=3)
        assert stats["disconnects"] == 1
        # Billed tokens show the generation stopped early.
        assert stats["usage"]["completion_tokens"] < count_tokens(EXPECTED)


class TestEmbeddingFloatDecoding:
    def test_base64_payload_is_float32(self, gateway_url: str, upstream_a: FakeUpstreamHandle) -> None:
        """The base64 embedding the gateway relays decodes to the same floats the upstream computed."""
        with httpx2.Client(timeout=10) as http:
            b64 = http.post(gateway_url + "/embeddings", json={"model": "embed", "input": "x", "encoding_format": "base64"}).json()
            flt = http.post(gateway_url + "/embeddings", json={"model": "embed", "input": "x"}).json()
        raw = base64.b64decode(b64["data"][0]["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert decoded == pytest.approx(flt["data"][0]["embedding"], rel=1e-6)
