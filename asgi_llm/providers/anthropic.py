"""Adapter for Anthropic's Messages API (``kind: anthropic``).

Clients keep speaking OpenAI's Chat Completions; this adapter translates each request
to ``POST {base_url}/messages`` and each answer back — non-streamed and streamed —
so routing, failover, metering and the cache never see the difference.

Request mapping (OpenAI → Anthropic):
    system/developer messages → ``system``; user/assistant messages → ``messages``
    (consecutive same-role messages merged); ``image_url`` parts → ``image`` blocks
    (data URLs as base64, others as url); assistant ``tool_calls`` → ``tool_use`` blocks;
    ``tool`` messages → ``tool_result`` blocks; ``tools`` → ``{name, description,
    input_schema}``; ``tool_choice`` auto/required/none/function → auto/any/none/tool;
    ``parallel_tool_calls: false`` → ``disable_parallel_tool_use``; ``max_tokens`` /
    ``max_completion_tokens`` (default 4096: Anthropic requires it); ``stop`` →
    ``stop_sequences``; ``temperature``, ``top_p``; ``user`` → ``metadata.user_id``.
    Other OpenAI fields have no Anthropic equivalent and are not sent (Anthropic
    refuses unknown fields).
Response mapping: text blocks → ``content``; ``tool_use`` → ``tool_calls``;
    ``stop_reason`` end_turn/stop_sequence/pause_turn → stop, max_tokens → length,
    tool_use → tool_calls, refusal → content_filter; usage input (+ cache reads and
    writes) → ``prompt_tokens``, cache reads → ``prompt_tokens_details.cached_tokens``,
    output → ``completion_tokens``.
Streams: ``message_start`` → the role chunk; ``content_block_start`` (tool_use) and
    ``content_block_delta`` (text_delta, input_json_delta) → content / tool-call
    deltas; ``message_delta`` → the finish chunk; ``message_stop`` → the usage chunk
    and the end of the stream; ``error`` events → an upstream error.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any


from asgi_llm._sse import encode_json
from asgi_llm._timeout import fail_after
from asgi_llm.errors import InvalidRequestError, UpstreamError, UpstreamTimeoutError
from asgi_llm.providers.base import (
    Chunk,
    UpstreamReply,
    _error_from_body,
    _parse_json_object,
    describe_request,
    name_target,
    raise_for_upstream_status,
)
from asgi_llm.providers.http import HTTPAdapter

if TYPE_CHECKING:
    from asgi_llm.context import RequestContext
    from asgi_llm.targets import Target

__all__ = ["AnthropicAdapter", "to_anthropic_request", "to_openai_response"]

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _blocks(content: Any) -> list[dict[str, Any]]:
    """OpenAI message content → Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if url.startswith("data:") and ";base64," in url:
                media, data = url[5:].split(";base64,", 1)
                blocks.append({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})
            else:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
        else:
            raise InvalidRequestError(f"Content part type '{kind}' cannot be sent to an Anthropic model.", param="messages")
    return blocks


def to_anthropic_request(payload: Mapping[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
    """Translate an OpenAI chat request (already validated) to a Messages API body."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []

    def push(role: str, blocks: list[dict[str, Any]]) -> None:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for m in payload["messages"]:
        role = m["role"]
        if role in ("system", "developer"):
            system.append(_text_of(m.get("content")))
        elif role == "user":
            push("user", _blocks(m.get("content")))
        elif role == "assistant":
            blocks = _blocks(m.get("content"))
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    raise InvalidRequestError("tool_calls[].function.arguments must be JSON.", param="messages") from None
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": args})
            push("assistant", blocks)
        elif role in ("tool", "function"):
            push("user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id"), "content": _text_of(m.get("content"))}])
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": payload.get("max_completion_tokens") or payload.get("max_tokens") or DEFAULT_MAX_TOKENS,
    }
    if system:
        body["system"] = "\n\n".join(s for s in system if s)
    for key in ("temperature", "top_p", "top_k"):
        if payload.get(key) is not None:
            body[key] = payload[key]
    stop = payload.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if isinstance(payload.get("user"), str):
        body["metadata"] = {"user_id": payload["user"]}
    tools = payload.get("tools")
    if tools:
        body["tools"] = [
            {
                "name": t["function"]["name"],
                **({"description": t["function"]["description"]} if t["function"].get("description") else {}),
                "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}},
            }
            for t in tools
            if t.get("type") == "function" and isinstance(t.get("function"), dict)
        ]
        choice = payload.get("tool_choice")
        tc: dict[str, Any] | None = None
        if choice == "auto" or choice is None:
            tc = {"type": "auto"}
        elif choice == "required":
            tc = {"type": "any"}
        elif choice == "none":
            tc = {"type": "none"}
        elif isinstance(choice, dict) and choice.get("type") == "function":
            tc = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
        if tc is not None:
            if payload.get("parallel_tool_calls") is False and tc["type"] != "none":
                tc["disable_parallel_tool_use"] = True
            body["tool_choice"] = tc
    if stream:
        body["stream"] = True
    return body


def _usage(u: Mapping[str, Any] | None) -> dict[str, Any]:
    u = u or {}
    cached = int(u.get("cache_read_input_tokens") or 0)
    prompt = int(u.get("input_tokens") or 0) + cached + int(u.get("cache_creation_input_tokens") or 0)
    completion = int(u.get("output_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def to_openai_response(msg: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a Messages API response to an OpenAI ``chat.completion``."""
    text = ""
    calls = []
    for block in msg.get("content") or []:
        if block.get("type") == "text":
            text += block.get("text", "")
        elif block.get("type") == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": json.dumps(block.get("input") or {})}})
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": msg.get("id", ""),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": msg.get("model", ""),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _STOP_REASONS.get(msg.get("stop_reason") or "", "stop")}],
        "usage": _usage(msg.get("usage")),
    }


class _AnthropicReply(UpstreamReply):
    async def body(self) -> tuple[bytes, dict[str, Any]]:
        _raw, msg = await super().body()
        if msg.get("type") == "error":
            raise _error_from_body(msg, 502, self.target, None)
        obj = to_openai_response(msg)
        return json.dumps(obj, separators=(",", ":")).encode(), obj

    async def chunks(self) -> AsyncIterator[Chunk]:
        state: dict[str, Any] = {"id": "", "model": "", "created": int(time.time()), "usage": {}, "tools": {}}

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: dict[str, Any] | None = None) -> Chunk:
            obj: dict[str, Any] = {"id": state["id"], "object": "chat.completion.chunk", "created": state["created"],
                                   "model": state["model"],
                                   "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if usage is not None:
                obj["usage"] = usage
            return encode_json(obj), obj

        async with contextlib.aclosing(self.events(lambda e: e.event == "message_stop", "message_stop")) as events:
            async for event in events:
                kind = event.event
                if kind in (None, "ping"):
                    continue
                data = _parse_json_object(event.data, self.target, what="stream event")
                if kind == "error" or data.get("type") == "error":
                    raise _error_from_body(data, 502, self.target, None)
                if kind == "message_start":
                    message = data.get("message") or {}
                    state["id"], state["model"] = message.get("id", ""), message.get("model", "")
                    state["usage"] = dict(message.get("usage") or {})
                    yield chunk({"role": "assistant", "content": ""})
                elif kind == "content_block_start":
                    block = data.get("content_block") or {}
                    if block.get("type") == "tool_use":
                        index = len(state["tools"])
                        state["tools"][data.get("index")] = index
                        self._content()
                        yield chunk({"tool_calls": [{"index": index, "id": block.get("id"), "type": "function",
                                                     "function": {"name": block.get("name"), "arguments": ""}}]})
                elif kind == "content_block_delta":
                    delta = data.get("delta") or {}
                    if delta.get("type") == "text_delta" and delta.get("text"):
                        self._content()
                        yield chunk({"content": delta["text"]})
                    elif delta.get("type") == "input_json_delta":
                        index = state["tools"].get(data.get("index"), 0)
                        yield chunk({"tool_calls": [{"index": index, "function": {"arguments": delta.get("partial_json", "")}}]})
                elif kind == "message_delta":
                    state["usage"].update(data.get("usage") or {})
                    reason = (data.get("delta") or {}).get("stop_reason")
                    if reason:
                        self._content()
                        yield chunk({}, finish=_STOP_REASONS.get(reason, "stop"))
                elif kind == "message_stop":
                    yield chunk(None, usage=_usage(state["usage"]))
                    return

    def _content(self) -> None:
        if self.first_content_at is None:
            self.first_content_at = time.perf_counter()


class AnthropicAdapter(HTTPAdapter):
    """An Anthropic Messages API provider (chat completions only). Arguments as for
    :class:`~asgi_llm.providers.http.HTTPAdapter`; ``base_url`` is e.g.
    ``https://api.anthropic.com/v1``."""

    default_headers = {**HTTPAdapter.default_headers, "anthropic-version": ANTHROPIC_VERSION}

    def key_headers(self, api_key: str | None) -> dict[str, str]:
        return {"x-api-key": api_key} if api_key else {}

    async def send(self, ctx: RequestContext, target: Target, *, api_key: str | None = None) -> UpstreamReply:
        route = target.route
        if ctx.endpoint != "chat":
            raise UpstreamError(
                f"{route} is an Anthropic model: it serves chat completions only, not {ctx.endpoint}.",
                target=route, retryable=True,
            )
        body = json.dumps(to_anthropic_request(ctx.payload, target.model, stream=ctx.stream), separators=(",", ":")).encode()
        headers = {**self._static_headers, **self.key_headers(api_key)}
        if self.request_id_header:
            headers[self.request_id_header] = ctx.request_id
        if ctx.stream:
            headers["accept"] = "text/event-stream"
        limit = self.timeouts.ttft if ctx.stream else self.timeouts.attempt
        sent_at = time.perf_counter()
        try:
            async with fail_after(limit):
                response = await self.transport.send("POST", self.base_url + "/messages", headers=headers, body=body)
        except TimeoutError:
            raise UpstreamTimeoutError(f"{route} did not answer within {limit:g} s.", target=route) from None
        except UpstreamError as exc:
            raise name_target(exc, route) from exc.__cause__
        if not 200 <= response.status < 300:
            await raise_for_upstream_status(response, route, sent=describe_request(
                "POST", self.base_url + "/messages", ctx.payload, model=target.model, stream=ctx.stream,
                request_id_header=self.request_id_header))
        return _AnthropicReply(response, target=route, timeouts=self.timeouts, sent_at=sent_at)
