"""The Anthropic adapter against recorded Messages API request/response shapes.

The upstream is a recording transport at the ``UpstreamTransport`` seam that answers
with bytes in the shapes Anthropic documents; the rest of the pipeline is real, and the
output is validated as the official openai SDK's own types.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from asgi_llm.providers.anthropic import AnthropicAdapter, to_anthropic_request
from asgi_llm.routing.router import ModelRoute, Router, Target
from asgi_llm.stack import compose, gateway_lifespan
from asgi_llm.testing.transport import RecordingTransport
from tests.harness import call

pytestmark = pytest.mark.anyio

TEXT_MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 6, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 0},
}
TOOL_MESSAGE = {
    "id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "I'll check the weather."},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"location": "San Francisco, CA"}}],
    "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 100, "output_tokens": 30},
}


def sse(events: list[tuple[str, dict[str, Any]]]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


TEXT_STREAM = sse([
    ("message_start", {"type": "message_start", "message": {"id": "msg_1nZd", "type": "message", "role": "assistant", "content": [],
                                                            "model": "claude-sonnet-4-5", "stop_reason": None, "stop_sequence": None,
                                                            "usage": {"input_tokens": 25, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": 15}}),
    ("message_stop", {"type": "message_stop"}),
])
TOOL_STREAM = sse([
    ("message_start", {"type": "message_start", "message": {"id": "msg_t", "type": "message", "role": "assistant", "content": [],
                                                            "model": "claude-sonnet-4-5", "usage": {"input_tokens": 50, "output_tokens": 1}}}),
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking."}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_01T", "name": "get_weather", "input": {}}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"location\": \"San"}}),
    ("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": " Francisco\"}"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 1}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 20}}),
    ("message_stop", {"type": "message_stop"}),
])


def gateway_for(transport: RecordingTransport):  # type: ignore[no-untyped-def]
    adapter = AnthropicAdapter("anthropic", base_url="https://api.anthropic.com/v1", api_keys=["sk-ant-test"], transport=transport)
    router = Router([ModelRoute("claude", (Target("anthropic", "claude-sonnet-4-5"),))])
    return compose(providers={"anthropic": adapter}, router=router)


class TestRequestTranslation:
    def test_full_request(self) -> None:
        """System, tools, tool_choice, tool results, images and stop translate to the Messages API."""
        payload = {
            "model": "claude", "max_tokens": 300, "temperature": 0.2, "stop": "END", "user": "u-1", "parallel_tool_calls": False,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\": \"SF\"}"}}]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
                {"role": "user", "content": "thanks"},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}],
            "tool_choice": "required",
            "logit_bias": {"1": 2},  # no Anthropic equivalent: not sent
        }
        body = to_anthropic_request(payload, "claude-sonnet-4-5", stream=False)
        assert body["model"] == "claude-sonnet-4-5" and body["max_tokens"] == 300
        assert body["system"] == "Be brief."
        assert body["stop_sequences"] == ["END"] and body["metadata"] == {"user_id": "u-1"}
        assert body["tools"] == [{"name": "get_weather", "description": "Weather",
                                  "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}]
        assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        assert body["messages"][0]["content"][1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}}
        assert body["messages"][1]["content"] == [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "SF"}}]
        # the tool result and the next user turn merge into one user message
        assert body["messages"][2]["content"] == [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                                                  {"type": "text", "text": "thanks"}]
        assert "logit_bias" not in body and "stream" not in body

    def test_max_tokens_default(self) -> None:
        """Anthropic requires max_tokens: a default is supplied."""
        body = to_anthropic_request({"model": "c", "messages": [{"role": "user", "content": "x"}]}, "m", stream=True)
        assert body["max_tokens"] == 4096 and body["stream"] is True


class TestThroughTheGateway:
    async def test_non_stream(self, anyio_backend: str) -> None:
        """A Messages API answer becomes a valid chat.completion with mapped usage and headers sent upstream."""
        transport = RecordingTransport.answering(200, json.dumps(TEXT_MESSAGE).encode())
        gw = gateway_for(transport)
        async with gateway_lifespan(gw):
            rec = await call(gw, body={"model": "claude", "messages": [{"role": "user", "content": "hi"}]})
        assert rec.status == 200
        completion = ChatCompletion.model_validate(rec.json())
        assert completion.choices[0].message.content == "Hello!"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage.prompt_tokens == 16 and completion.usage.completion_tokens == 6
        assert completion.usage.prompt_tokens_details.cached_tokens == 4
        sent = transport.requests[0]
        assert sent["url"] == "https://api.anthropic.com/v1/messages"
        assert sent["headers"]["x-api-key"] == "sk-ant-test" and sent["headers"]["anthropic-version"] == "2023-06-01"

    async def test_tool_use_non_stream(self, anyio_backend: str) -> None:
        """tool_use blocks become tool_calls with JSON arguments; stop_reason tool_use → tool_calls."""
        gw = gateway_for(RecordingTransport.answering(200, json.dumps(TOOL_MESSAGE).encode()))
        async with gateway_lifespan(gw):
            rec = await call(gw, body={"model": "claude", "messages": [{"role": "user", "content": "weather?"}]})
        completion = ChatCompletion.model_validate(rec.json())
        call0 = completion.choices[0].message.tool_calls[0]
        assert call0.id == "toolu_01A09q90qw90lq917835lq9" and call0.function.name == "get_weather"
        assert json.loads(call0.function.arguments) == {"location": "San Francisco, CA"}
        assert completion.choices[0].finish_reason == "tool_calls"

    async def test_text_stream(self, anyio_backend: str) -> None:
        """The event stream becomes OpenAI chunks: role, text deltas, finish, usage (when asked), [DONE]."""
        gw = gateway_for(RecordingTransport.answering(200, TEXT_STREAM, "text/event-stream"))
        async with gateway_lifespan(gw):
            rec = await call(gw, body={"model": "claude", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                                       "stream_options": {"include_usage": True}})
        data = rec.sse_data()
        assert data[-1] == "[DONE]"
        chunks = [ChatCompletionChunk.model_validate(json.loads(d)) for d in data[:-1]]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello!"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage.prompt_tokens == 25 and chunks[-1].usage.completion_tokens == 15
        assert {c.model for c in chunks} == {"claude-sonnet-4-5"}

    async def test_tool_stream(self, anyio_backend: str) -> None:
        """Streamed tool_use becomes tool-call deltas whose arguments join to the JSON input."""
        gw = gateway_for(RecordingTransport.answering(200, TOOL_STREAM, "text/event-stream"))
        async with gateway_lifespan(gw):
            rec = await call(gw, body={"model": "claude", "messages": [{"role": "user", "content": "w?"}], "stream": True})
        chunks = [ChatCompletionChunk.model_validate(json.loads(d)) for d in rec.sse_data()[:-1]]
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert calls[0].id == "toolu_01T" and calls[0].function.name == "get_weather"
        assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"location": "San Francisco"}
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        assert all(c.usage is None for c in chunks)  # not asked for

    async def test_overloaded_is_retryable_502(self, anyio_backend: str) -> None:
        """Anthropic's 529 overloaded_error maps to a retryable upstream error (502)."""
        body = json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}).encode()
        gw = gateway_for(RecordingTransport.answering(529, body))
        async with gateway_lifespan(gw):
            rec = await call(gw, body={"model": "claude", "messages": [{"role": "user", "content": "hi"}]})
        assert rec.status == 502 and "Overloaded" in rec.json()["error"]["message"]

    async def test_error_event_before_content_is_http_error(self, anyio_backend: str) -> None:
        """An error event before any content is a clean HTTP error, not a 200 stream."""
        stream = sse([("message_start", {"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}}),
                      ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})])
        gw = gateway_for(RecordingTransport.answering(200, stream, "text/event-stream"))
        async with gateway_lifespan(gw):
            rec = await call(gw, body={"model": "claude", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        assert rec.status == 502

    async def test_embeddings_refused_clearly(self, anyio_backend: str) -> None:
        """An Anthropic target asked for embeddings explains itself instead of sending nonsense."""
        adapter = AnthropicAdapter("anthropic", base_url="https://x/v1", transport=RecordingTransport.answering(200, b"{}"))
        gw = compose(providers={"anthropic": adapter}, router=Router([ModelRoute("e", (Target("anthropic", "claude"),))]))
        async with gateway_lifespan(gw):
            rec = await call(gw, path="/v1/embeddings", body={"model": "e", "input": "x"})
        assert rec.status == 502 and "chat completions only" in rec.json()["error"]["message"]
