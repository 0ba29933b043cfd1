"""End-to-end tests of the fake upstream process and the process helpers."""

from __future__ import annotations

import base64
import json
import math
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from asgi_llm.testing.fake_upstream import count_tokens, prompt_tokens_for
from asgi_llm.testing.processes import FakeUpstreamHandle, fake_upstream, free_port, managed_process

pytestmark = pytest.mark.e2e

NAME = "provider-a"
USER = "what is the answer"
REPLY = f"Hello from {NAME}. You said: {USER}"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": USER}]
PROMPT_TOKENS = prompt_tokens_for(MESSAGES)


# --------------------------------------------------------------------------- #
# Fixtures and helpers
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstreamHandle]:
    with fake_upstream(NAME, models=["m1", "m2"]) as handle:
        yield handle
        assert handle.process is not None
        assert "Traceback" not in handle.process.log_text()


@pytest.fixture()
def up(server: FakeUpstreamHandle) -> FakeUpstreamHandle:
    server.reset()
    return server


@pytest.fixture()
def sdk(up: FakeUpstreamHandle) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=up.base_url, api_key="x", max_retries=0, timeout=5.0)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture()
def http(up: FakeUpstreamHandle) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=up.url, timeout=5.0) as client:
        yield client


def chat_body(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": MESSAGES, "stream": stream, **extra}


def sse_events(lines: list[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def content_of(events: list[str]) -> str:
    text = ""
    for event in events:
        if event == "[DONE]":
            continue
        for choice in json.loads(event)["choices"]:
            text += choice["delta"].get("content") or ""
    return text


def raw_request(port: int, data: bytes, *, timeout: float = 3.0) -> bytes:
    """Send raw bytes and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def post_bytes(path: str, body: dict[str, Any], *, close: bool = True) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n"
    )
    if close:
        head += "connection: close\r\n"
    return head.encode() + b"\r\n" + payload


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #
class TestTokenCounting:
    def test_count_tokens_splits_on_whitespace(self) -> None:
        """count_tokens counts whitespace-separated words."""
        assert count_tokens("") == 0
        assert count_tokens("  a b\tc\n") == 3

    def test_prompt_tokens_for_messages(self) -> None:
        """prompt_tokens_for adds one per message and reads text parts."""
        messages = [
            {"role": "system", "content": "a b"},
            {"role": "user", "content": [{"type": "text", "text": "c d e"}, {"type": "image_url", "image_url": {}}]},
            {"role": "assistant", "content": None},
        ]
        assert prompt_tokens_for(messages) == 3 + 4 + 1


class TestProcesses:
    def test_free_port_is_bindable(self) -> None:
        """free_port returns a port that can be bound."""
        port = free_port()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))

    def test_early_exit_raises_with_log_tail(self) -> None:
        """A process exiting before readiness raises RuntimeError with its log."""
        args = [sys.executable, "-c", "print('boom-marker'); raise SystemExit(3)"]
        with pytest.raises(RuntimeError, match="boom-marker"):
            with managed_process(args, ready_url=f"http://127.0.0.1:{free_port()}/health", timeout=5):
                pass  # pragma: no cover

    def test_readiness_timeout_kills_process(self) -> None:
        """A process that never becomes ready is killed after the timeout."""
        args = [sys.executable, "-c", "import time; time.sleep(30)"]
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="not ready"):
            with managed_process(args, ready_url=f"http://127.0.0.1:{free_port()}/health", timeout=0.5):
                pass  # pragma: no cover
        assert time.monotonic() - start < 5

    def test_process_is_terminated_on_exit(self) -> None:
        """The fake upstream process is gone once the context exits."""
        with fake_upstream("short-lived") as handle:
            assert handle.base_url == f"http://127.0.0.1:{handle.port}/v1"
            assert handle.process is not None
            proc = handle.process.proc
            assert "listening" in handle.process.log_text()
        assert proc.poll() is not None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", handle.port), timeout=1).close()


    def test_module_runs_as_script(self) -> None:
        """The module prints its usage with --help."""
        out = subprocess.run(
            [sys.executable, "-m", "asgi_llm.testing.fake_upstream", "--help"],
            capture_output=True, text=True, timeout=20, check=True,
        )
        assert "--fault" in out.stdout


class TestEndpoints:
    def test_health_and_metrics(self, http: httpx2.Client) -> None:
        """/health answers ok and /metrics exposes vLLM-style gauges."""
        assert http.get("/health").json() == {"status": "ok"}
        metrics = http.get("/metrics").text
        assert "vllm:num_requests_running" in metrics
        assert "vllm:num_requests_waiting" in metrics

    def test_models(self, sdk: openai.OpenAI) -> None:
        """/v1/models lists the configured models owned by the provider."""
        models = sdk.models.list()
        assert [m.id for m in models.data] == ["m1", "m2"]
        assert {m.owned_by for m in models.data} == {NAME}

    def test_chat_completion(self, sdk: openai.OpenAI) -> None:
        """A chat completion echoes the last user message with exact usage."""
        resp = sdk.chat.completions.create(model="any-model", messages=MESSAGES)  # type: ignore[arg-type]
        assert resp.model == "any-model"
        assert resp.id.startswith("chatcmpl-")
        assert resp.choices[0].message.content == REPLY
        assert resp.choices[0].finish_reason == "stop"
        assert resp.usage is not None
        assert resp.usage.prompt_tokens == PROMPT_TOKENS
        assert resp.usage.completion_tokens == len(REPLY.split())
        assert resp.usage.total_tokens == PROMPT_TOKENS + len(REPLY.split())

    def test_max_tokens_truncates(self, sdk: openai.OpenAI) -> None:
        """max_tokens / max_completion_tokens truncate with finish_reason length."""
        resp = sdk.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
        assert resp.choices[0].message.content == "Hello from provider-a."
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage is not None and resp.usage.completion_tokens == 3
        resp = sdk.chat.completions.create(
            model="m1", messages=MESSAGES, max_completion_tokens=2  # type: ignore[arg-type]
        )
        assert resp.choices[0].message.content == "Hello from"

    def test_chat_stream_with_usage(self, sdk: openai.OpenAI) -> None:
        """Streaming sends role, one chunk per word, finish, usage chunk."""
        stream = sdk.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
        )
        with stream:
            chunks = list(stream)
        words = REPLY.split()
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].delta.content for c in chunks[1 : 1 + len(words)]] == [
            w if i == 0 else " " + w for i, w in enumerate(words)
        ]
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == len(words)
        assert all(c.usage is None for c in chunks[:-1])

    def test_chat_stream_wire_format(self, http: httpx2.Client) -> None:
        """The raw stream is chunked SSE ending with [DONE]."""
        with http.stream("POST", "/v1/chat/completions", json=chat_body(True)) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["transfer-encoding"] == "chunked"
            events = sse_events(list(resp.iter_lines()))
        assert events[-1] == "[DONE]"
        assert content_of(events) == REPLY
        assert all("usage" not in json.loads(e) for e in events[:-1])

    def test_tool_call(self, sdk: openai.OpenAI) -> None:
        """With tools the reply is one call to the first tool echoing the user text."""
        tools = [
            {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}},
        ]
        resp = sdk.chat.completions.create(model="m1", messages=MESSAGES, tools=tools)  # type: ignore[arg-type]
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.function.name == "lookup"  # type: ignore[union-attr]
        assert json.loads(call.function.arguments) == {"echo": USER}  # type: ignore[union-attr]
        assert resp.usage is not None
        assert resp.usage.completion_tokens == count_tokens(call.function.arguments)  # type: ignore[union-attr]
        none = sdk.chat.completions.create(
            model="m1", messages=MESSAGES, tools=tools, tool_choice="none"  # type: ignore[arg-type]
        )
        assert none.choices[0].message.content == REPLY

    def test_tool_call_stream(self, sdk: openai.OpenAI) -> None:
        """Streamed tool calls use the OpenAI delta shape and reassemble."""
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        stream = sdk.chat.completions.create(
            model="m1", messages=MESSAGES, tools=tools, stream=True  # type: ignore[arg-type]
        )
        with stream:
            chunks = list(stream)
        head = chunks[0].choices[0].delta.tool_calls
        assert head is not None and head[0].id and head[0].type == "function"
        assert head[0].function is not None and head[0].function.name == "lookup"
        assert head[0].function.arguments == ""
        fragments = [
            c.choices[0].delta.tool_calls[0].function.arguments  # type: ignore[index, union-attr]
            for c in chunks[1:]
            if c.choices and c.choices[0].delta.tool_calls
        ]
        assert len(fragments) >= 1
        assert json.loads("".join(f or "" for f in fragments)) == {"echo": USER}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

    def test_json_mode(self, sdk: openai.OpenAI) -> None:
        """response_format json_object wraps the reply in a JSON object."""
        resp = sdk.chat.completions.create(
            model="m1", messages=MESSAGES, response_format={"type": "json_object"}  # type: ignore[arg-type]
        )
        content = resp.choices[0].message.content or ""
        assert json.loads(content) == {"reply": REPLY}
        assert resp.usage is not None and resp.usage.completion_tokens == count_tokens(content)
        stream = sdk.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        )
        with stream:
            pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len([p for p in pieces if p]) > 1
        assert json.loads("".join(pieces)) == {"reply": REPLY}

    def test_legacy_completions(self, sdk: openai.OpenAI) -> None:
        """/v1/completions answers text choices, streamed or not."""
        resp = sdk.completions.create(model="m1", prompt="say hi")
        assert resp.object == "text_completion"
        assert resp.choices[0].text == f"Hello from {NAME}. You said: say hi"
        assert resp.usage is not None and resp.usage.prompt_tokens == 2
        stream = sdk.completions.create(model="m1", prompt="say hi", stream=True, max_tokens=4)
        with stream:
            chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks) == f"Hello from {NAME}. You"
        assert chunks[-1].choices[0].finish_reason == "length"

    def test_embeddings(self, sdk: openai.OpenAI, http: httpx2.Client) -> None:
        """Embeddings are deterministic, L2-normalised, float or base64."""
        resp = sdk.embeddings.create(model="e1", input=["hello world", "bye"])  # SDK asks for base64
        assert len(resp.data) == 2
        vec = resp.data[0].embedding
        assert len(vec) == 8
        assert math.isclose(sum(v * v for v in vec), 1.0, rel_tol=1e-5)
        assert resp.usage.prompt_tokens == 3 and resp.usage.total_tokens == 3
        floats = http.post("/v1/embeddings", json={"model": "e1", "input": "hello world"}).json()
        assert floats["data"][0]["embedding"] == pytest.approx(vec, rel=1e-6)
        b64 = http.post(
            "/v1/embeddings", json={"model": "e1", "input": [[1, 2, 3]], "encoding_format": "base64"}
        ).json()
        raw = base64.b64decode(b64["data"][0]["embedding"])
        assert len(struct.unpack("<8f", raw)) == 8
        assert b64["usage"]["prompt_tokens"] == 3

    def test_errors_are_openai_shaped(self, http: httpx2.Client) -> None:
        """Malformed JSON gives 400 and unknown paths 404, OpenAI-shaped."""
        bad = http.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
        assert bad.status_code == 400
        assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
        missing = http.get("/v1/nothing")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "invalid_request_error"

    def test_api_key_required(self) -> None:
        """--api-key rejects requests without the matching bearer token."""
        with fake_upstream("keyed", api_key="sekret") as handle:
            bad = openai.OpenAI(base_url=handle.base_url, api_key="wrong", max_retries=0)
            good = openai.OpenAI(base_url=handle.base_url, api_key="sekret", max_retries=0)
            with bad, good:
                with pytest.raises(openai.AuthenticationError) as err:
                    bad.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
                assert err.value.code == "invalid_api_key"
                with pytest.raises(openai.AuthenticationError):
                    bad.models.list()
                assert good.chat.completions.create(model="m", messages=MESSAGES).choices  # type: ignore[arg-type]

    def test_stats_and_recent(self, up: FakeUpstreamHandle, sdk: openai.OpenAI) -> None:
        """Stats count requests per path and model, bill usage and keep recent requests."""
        sdk.chat.completions.create(model="m2", messages=MESSAGES, extra_headers={"X-Trace": "t1"})  # type: ignore[arg-type]
        sdk.models.list()
        stats = up.stats()
        assert stats["requests"] == {"/v1/chat/completions": 1, "/v1/models": 1}
        assert stats["by_model"] == {"m2": 1}
        assert stats["usage"] == {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": len(REPLY.split()),
            "billed_requests": 1,
        }
        first = stats["recent"][0]
        assert first["path"] == "/v1/chat/completions"
        assert first["headers"]["x-trace"] == "t1"
        assert first["body"]["model"] == "m2"
        assert stats["in_flight"] == 0 and stats["disconnects"] == 0

    def test_keep_alive_pipelining(self, up: FakeUpstreamHandle) -> None:
        """Two pipelined requests on one connection get two responses in order."""
        data = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n" + post_bytes("/v1/chat/completions", chat_body())
        raw = raw_request(up.port, data)
        assert raw.count(b"HTTP/1.1 200 OK") == 2
        assert raw.index(b'{"status":"ok"}') < raw.index(b"chat.completion")


class TestFaults:
    def test_status_with_retry_headers(self, up: FakeUpstreamHandle, sdk: openai.OpenAI) -> None:
        """A status fault returns that status, error body and retry headers once."""
        up.add_faults({"kind": "status", "status": 503, "message": "overloaded", "retry_after": 2,
                       "retry_after_ms": 150})
        with pytest.raises(openai.InternalServerError) as err:
            sdk.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
        assert err.value.status_code == 503
        assert err.value.response.headers["retry-after"] == "2"
        assert err.value.response.headers["retry-after-ms"] == "150"
        assert err.value.message.endswith("overloaded") or "overloaded" in err.value.message
        assert sdk.chat.completions.create(model="m1", messages=MESSAGES).choices  # type: ignore[arg-type]
        stats = up.stats()
        assert stats["usage"]["billed_requests"] == 1 and stats["faults_pending"] == 0

    def test_rate_limit_times_and_persistent(self, up: FakeUpstreamHandle, sdk: openai.OpenAI) -> None:
        """times counts down; times=null persists until cleared."""
        up.add_faults({"kind": "status", "status": 429, "times": 2})
        for _ in range(2):
            with pytest.raises(openai.RateLimitError):
                sdk.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
        sdk.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
        up.add_faults({"kind": "status", "status": 500, "times": None})
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                sdk.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
        assert up.stats()["faults_pending"] == 1
        up.clear_faults()
        sdk.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]

    def test_match_path_and_model(self, up: FakeUpstreamHandle, sdk: openai.OpenAI) -> None:
        """A fault with match only applies to the matching path and model."""
        up.add_faults({"kind": "status", "status": 502, "match": {"path": "/v1/chat/completions", "model": "m2"}})
        sdk.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
        sdk.embeddings.create(model="m2", input="x")
        with pytest.raises(openai.InternalServerError):
            sdk.chat.completions.create(model="m2", messages=MESSAGES)  # type: ignore[arg-type]

    def test_context_length_and_content_filter(self, up: FakeUpstreamHandle, sdk: openai.OpenAI) -> None:
        """context_length and content_filter give OpenAI's 400 codes."""
        up.add_faults({"kind": "context_length"}, {"kind": "content_filter"})
        with pytest.raises(openai.BadRequestError) as err:
            sdk.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
        assert err.value.code == "context_length_exceeded"
        assert err.value.param == "messages"
        assert "maximum context length" in err.value.message
        with pytest.raises(openai.BadRequestError) as err:
            sdk.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
        assert err.value.code == "content_policy_violation"
        assert up.stats()["usage"]["billed_requests"] == 0

    def test_reject_prefill_only_matches_assistant_last(self, up: FakeUpstreamHandle, sdk: openai.OpenAI) -> None:
        """reject_prefill stays pending until the last message is from the assistant."""
        up.add_faults({"kind": "reject_prefill"})
        sdk.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
        assert up.stats()["faults_pending"] == 1
        prefill = [*MESSAGES, {"role": "assistant", "content": "Sure:"}]
        with pytest.raises(openai.BadRequestError, match="prefill"):
            sdk.chat.completions.create(model="m1", messages=prefill)  # type: ignore[arg-type]

    def test_reset(self, up: FakeUpstreamHandle, sdk: openai.OpenAI) -> None:
        """reset aborts the connection with a TCP RST and no response."""
        up.add_faults({"kind": "reset"})
        with pytest.raises(ConnectionResetError):
            raw_request(up.port, post_bytes("/v1/chat/completions", chat_body()))
        up.add_faults({"kind": "reset"})
        with pytest.raises(openai.APIConnectionError):
            sdk.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
        assert up.stats()["usage"]["billed_requests"] == 0

    def test_silence(self, up: FakeUpstreamHandle) -> None:
        """silence never answers and keeps the request in flight until the client leaves."""
        up.add_faults({"kind": "silence"})
        with httpx2.Client(timeout=0.3) as client:
            with pytest.raises(httpx2.ReadTimeout):
                client.post(up.base_url + "/chat/completions", json=chat_body())
        up.wait_stats(lambda s: s["in_flight"] == 0)
        assert up.stats()["usage"]["billed_requests"] == 0

    def test_silence_is_in_flight(self, up: FakeUpstreamHandle) -> None:
        """A silenced request shows up in in_flight and the running gauge."""
        up.add_faults({"kind": "silence"})
        with socket.create_connection(("127.0.0.1", up.port), timeout=2) as sock:
            sock.sendall(post_bytes("/v1/chat/completions", chat_body()))
            stats = up.wait_stats(lambda s: s["in_flight"] == 1)
            assert stats["faults_pending"] == 0
            with httpx2.Client() as client:
                assert "vllm:num_requests_running{" in client.get(up.url + "/metrics").text
        up.wait_stats(lambda s: s["in_flight"] == 0)

    def test_delay(self, up: FakeUpstreamHandle, sdk: openai.OpenAI) -> None:
        """delay waits before answering normally."""
        up.add_faults({"kind": "delay", "delay_s": 0.3})
        start = time.monotonic()
        resp = sdk.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
        assert time.monotonic() - start >= 0.3
        assert resp.choices[0].message.content == REPLY

    def test_slow_first_token(self, up: FakeUpstreamHandle, http: httpx2.Client) -> None:
        """slow_first_token sends headers at once and delays the first chunk."""
        up.add_faults({"kind": "slow_first_token", "delay_s": 0.4})
        start = time.monotonic()
        with http.stream("POST", "/v1/chat/completions", json=chat_body(True)) as resp:
            headers_at = time.monotonic() - start
            lines = resp.iter_lines()
            first = next(line for line in lines if line)
            first_at = time.monotonic() - start
            rest = list(lines)
        assert first_at - headers_at >= 0.3
        assert content_of(sse_events([first, *rest])) == REPLY

    def test_chunk_delay(self, up: FakeUpstreamHandle, http: httpx2.Client) -> None:
        """chunk_delay slows every chunk but completes the stream."""
        up.add_faults({"kind": "chunk_delay", "delay_s": 0.03})
        start = time.monotonic()
        with http.stream("POST", "/v1/chat/completions", json=chat_body(True)) as resp:
            events = sse_events(list(resp.iter_lines()))
        n_events = len(events)
        assert time.monotonic() - start >= 0.03 * (n_events - 1)
        assert events[-1] == "[DONE]" and content_of(events) == REPLY

    def test_cut(self, up: FakeUpstreamHandle, http: httpx2.Client) -> None:
        """cut closes the stream after N content chunks without terminator or [DONE]."""
        up.add_faults({"kind": "cut", "after_chunks": 3})
        lines: list[str] = []
        with pytest.raises(httpx2.RemoteProtocolError):
            with http.stream("POST", "/v1/chat/completions", json=chat_body(True)) as resp:
                for line in resp.iter_lines():
                    lines.append(line)
        events = sse_events(lines)
        assert "[DONE]" not in events
        assert content_of(events) == " ".join(REPLY.split()[:3])
        stats = up.wait_stats(lambda s: s["in_flight"] == 0)
        assert stats["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 3, "billed_requests": 1}
        assert stats["disconnects"] == 0

    def test_cut_raw_has_no_terminating_chunk(self, up: FakeUpstreamHandle) -> None:
        """On the wire a cut stream lacks the 0-length chunk."""
        up.add_faults({"kind": "cut", "after_chunks": 1})
        raw = raw_request(up.port, post_bytes("/v1/chat/completions", chat_body(True)))
        assert b"transfer-encoding: chunked" in raw
        assert not raw.endswith(b"0\r\n\r\n")
        assert b"[DONE]" not in raw

    def test_stall(self, up: FakeUpstreamHandle) -> None:
        """stall stops writing after N chunks; the client leaving counts a disconnect."""
        up.add_faults({"kind": "stall", "after_chunks": 2})
        lines: list[str] = []
        with httpx2.Client(timeout=0.4) as client:
            with pytest.raises(httpx2.ReadTimeout):
                with client.stream("POST", up.base_url + "/chat/completions", json=chat_body(True)) as resp:
                    for line in resp.iter_lines():
                        lines.append(line)
        assert content_of(sse_events(lines)) == " ".join(REPLY.split()[:2])
        stats = up.wait_stats(lambda s: s["disconnects"] == 1)
        assert stats["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2, "billed_requests": 1}

    def test_malformed(self, up: FakeUpstreamHandle, http: httpx2.Client) -> None:
        """malformed injects a broken event and then continues normally."""
        up.add_faults({"kind": "malformed", "after_chunks": 2})
        with http.stream("POST", "/v1/chat/completions", json=chat_body(True)) as resp:
            events = sse_events(list(resp.iter_lines()))
        assert events[3] == '{"choices": [oops'
        good = [e for i, e in enumerate(events) if i != 3]
        assert good[-1] == "[DONE]" and content_of(good) == REPLY

    def test_no_done(self, up: FakeUpstreamHandle, http: httpx2.Client) -> None:
        """no_done ends the stream cleanly but without [DONE]."""
        up.add_faults({"kind": "no_done"})
        with http.stream("POST", "/v1/chat/completions", json=chat_body(True)) as resp:
            events = sse_events(list(resp.iter_lines()))
        assert "[DONE]" not in events
        assert json.loads(events[-1])["choices"][0]["finish_reason"] == "stop"
        assert up.stats()["usage"]["billed_requests"] == 1

    def test_garbage(self, up: FakeUpstreamHandle, http: httpx2.Client) -> None:
        """garbage answers 200 text/html."""
        up.add_faults({"kind": "garbage"})
        resp = http.post("/v1/chat/completions", json=chat_body())
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/html"
        assert resp.text == "<html>oops</html>"
        assert up.stats()["usage"]["billed_requests"] == 0

    def test_stream_only_faults_skip_non_stream(self, up: FakeUpstreamHandle, sdk: openai.OpenAI) -> None:
        """Stream-only faults stay pending for non-streaming requests."""
        up.add_faults({"kind": "cut"}, {"kind": "no_done"})
        sdk.chat.completions.create(model="m1", messages=MESSAGES)  # type: ignore[arg-type]
        assert len(up.faults()) == 2

    def test_client_disconnect_mid_stream(self, up: FakeUpstreamHandle) -> None:
        """A client leaving mid-stream is counted and billed for what was written."""
        up.add_faults({"kind": "chunk_delay", "delay_s": 0.1})
        with socket.create_connection(("127.0.0.1", up.port), timeout=2) as sock:
            sock.sendall(post_bytes("/v1/chat/completions", chat_body(True)))
            received = b""
            while received.count(b'"content":') < 3:  # role chunk + 2 words
                received += sock.recv(65536)
        stats = up.wait_stats(lambda s: s["disconnects"] == 1)
        assert stats["usage"]["billed_requests"] == 1
        assert stats["usage"]["prompt_tokens"] == PROMPT_TOKENS
        assert 2 <= stats["usage"]["completion_tokens"] < len(REPLY.split())

    def test_preloaded_faults_and_validation(self) -> None:
        """--fault pre-loads faults; invalid faults are rejected by the control API."""
        with fake_upstream("preloaded", faults=[{"kind": "status", "status": 418}]) as handle:
            with httpx2.Client() as client:
                assert client.post(handle.base_url + "/chat/completions", json=chat_body()).status_code == 418
            with pytest.raises(RuntimeError, match="unknown fault kind"):
                handle.add_faults({"kind": "explode"})

