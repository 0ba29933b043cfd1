"""What a cache entry holds, how a stream becomes one, and how one becomes a stream.

An entry is always the *non-streamed* form of an answer (``chat.completion``,
``text_completion`` or an embeddings list) plus a little metadata::

    {"v": 1, "endpoint": "chat", "response": {...}, "stored_at": 1718000000.0,
     "route": "provider-a/gpt-4o-mini"}

A streamed miss is assembled into that form chunk by chunk as it passes
(:class:`StreamAssembler`: content and every other string delta field concatenated,
tool calls merged by index, finish reasons, logprobs, usage, id/model/created kept);
a streamed hit is replayed from it as SSE (:func:`replay_events`). So either form of a
request can be served from either form of a stored answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asgi_llm._sse import encode_json
from asgi_llm.context import Usage

__all__ = ["ENTRY_VERSION", "Entry", "StreamAssembler", "is_complete", "json_bytes", "replay_events", "usage_dict"]

ENTRY_VERSION = 1
_TOP_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON of ``obj``. An upstream answer may hold a lone surrogate
    (``"\\ud800"`` decodes to one, UTF-8 cannot encode it): such a document is written
    ASCII-escaped instead, as the upstream sent it, rather than raising."""
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored answer."""

    endpoint: str
    response: dict[str, Any]
    stored_at: float
    route: str | None = None

    def encode(self) -> bytes:
        doc = {"v": ENTRY_VERSION, "endpoint": self.endpoint, "response": self.response,
               "stored_at": self.stored_at, "route": self.route}
        return json_bytes(doc)

    @classmethod
    def decode(cls, raw: bytes) -> Entry | None:
        """The entry, or ``None`` for bytes this version cannot read (treated as a miss)."""
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(doc, dict) or doc.get("v") != ENTRY_VERSION or not isinstance(doc.get("response"), dict):
            return None
        stored_at = doc.get("stored_at")
        if not isinstance(stored_at, (int, float)) or not isinstance(doc.get("endpoint"), str):
            return None
        route = doc.get("route")
        return cls(doc["endpoint"], doc["response"], float(stored_at), route if isinstance(route, str) else None)

    @property
    def usage(self) -> Usage | None:
        return Usage.from_openai(self.response.get("usage"))


def usage_dict(usage: Usage) -> dict[str, Any]:
    """A :class:`Usage` back in OpenAI's shape (for an entry whose stream hid its usage)."""
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if usage.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return out


def is_complete(endpoint: str, response: Any) -> bool:
    """Is this a whole, successful answer (worth storing)?

    Chat and completions: at least one choice, every choice with a finish reason.
    Embeddings: a ``data`` list. Anything carrying ``error`` is not.
    """
    if not isinstance(response, dict) or response.get("error") is not None:
        return False
    if endpoint == "embeddings":
        return isinstance(response.get("data"), list)
    choices = response.get("choices")
    return (
        isinstance(choices, list)
        and bool(choices)
        and all(isinstance(c, dict) and c.get("finish_reason") is not None for c in choices)
    )


def _merge_logprobs(into: dict[str, Any], part: Any) -> None:
    if not isinstance(part, Mapping):
        return
    for name, value in part.items():
        if isinstance(value, list):
            into.setdefault(name, []).extend(value)
        elif value is not None:
            into[name] = value


class StreamAssembler:
    """Rebuild the non-streamed answer from a stream's chunks, as they pass.

    Example:
        >>> a = StreamAssembler("chat")
        >>> a.feed({"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]})
        >>> a.feed({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        >>> a.result()["choices"][0]["message"]["content"]
        'Hi'
    """

    __slots__ = ("endpoint", "_top", "_choices", "_usage", "_broken")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._top: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._usage: dict[str, Any] | None = None
        self._broken = False

    def feed(self, chunk: Any) -> None:
        """Add one decoded ``data:`` chunk."""
        if not isinstance(chunk, dict) or chunk.get("error") is not None:
            self._broken = True
            return
        for name in _TOP_FIELDS:
            if name not in self._top and chunk.get(name) is not None:
                self._top[name] = chunk[name]
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                self._broken = True
                continue
            index = choice.get("index", 0)
            if not isinstance(index, int):
                self._broken = True
                continue
            slot = self._choices.setdefault(index, {"fields": {}, "tools": {}, "logprobs": None, "finish": None})
            if choice.get("finish_reason") is not None:
                slot["finish"] = choice["finish_reason"]
            if isinstance(choice.get("logprobs"), Mapping):
                slot["logprobs"] = slot["logprobs"] or {}
                _merge_logprobs(slot["logprobs"], choice["logprobs"])
            if self.endpoint == "completions":
                if isinstance(choice.get("text"), str):
                    slot["fields"]["text"] = slot["fields"].get("text", "") + choice["text"]
            elif isinstance(choice.get("delta"), Mapping):
                self._merge_delta(slot, choice["delta"])

    @staticmethod
    def _merge_delta(slot: dict[str, Any], delta: Mapping[str, Any]) -> None:
        fields: dict[str, Any] = slot["fields"]
        for name, value in delta.items():
            if value is None:
                continue
            if name == "tool_calls" and isinstance(value, list):
                for call in value:
                    if not isinstance(call, Mapping):
                        continue
                    tool = slot["tools"].setdefault(
                        call.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                    )
                    if call.get("id"):
                        tool["id"] = call["id"]
                    if call.get("type"):
                        tool["type"] = call["type"]
                    fn = call.get("function")
                    if isinstance(fn, Mapping):
                        tool["function"]["name"] += fn.get("name") or ""
                        tool["function"]["arguments"] += fn.get("arguments") or ""
            elif name == "role":
                fields["role"] = value
            elif isinstance(value, str):
                fields[name] = fields.get(name, "") + value
            elif name == "function_call" and isinstance(value, Mapping):
                fc = fields.setdefault("function_call", {"name": "", "arguments": ""})
                fc["name"] += value.get("name") or ""
                fc["arguments"] += value.get("arguments") or ""
            else:
                fields[name] = value

    def result(self, fallback_usage: Usage | None = None) -> dict[str, Any] | None:
        """The assembled answer, or ``None`` if the stream was not a whole success."""
        if self._broken or not self._choices:
            return None
        choices = []
        for index in sorted(self._choices):
            slot = self._choices[index]
            if slot["finish"] is None:
                return None
            if self.endpoint == "completions":
                choices.append({"text": slot["fields"].get("text", ""), "index": index,
                                "logprobs": slot["logprobs"], "finish_reason": slot["finish"]})
                continue
            message = {"role": "assistant", "content": None, **slot["fields"]}
            if slot["tools"]:
                message["tool_calls"] = [slot["tools"][i] for i in sorted(slot["tools"])]
            choices.append({"index": index, "message": message, "logprobs": slot["logprobs"], "finish_reason": slot["finish"]})
        obj = "text_completion" if self.endpoint == "completions" else "chat.completion"
        response: dict[str, Any] = {**self._top, "object": obj, "choices": choices}
        usage = self._usage if self._usage is not None else (usage_dict(fallback_usage) if fallback_usage else None)
        if usage is not None:
            response["usage"] = usage
        return response


def replay_events(endpoint: str, response: Mapping[str, Any], *, include_usage: bool) -> list[bytes]:
    """The SSE events (without ``[DONE]``) that stream a stored answer.

    Chat: per choice a role chunk (with tool-call heads), a chunk with the content and
    any other message fields, tool-call arguments, a finish chunk; then the usage chunk
    only if the client asked for it. Completions: a text chunk and a finish chunk per
    choice.
    """
    base = {k: response[k] for k in _TOP_FIELDS if response.get(k) is not None}
    usage_null = {"usage": None} if include_usage else {}
    events: list[bytes] = []

    def emit(choices: list[dict[str, Any]]) -> None:
        obj = "text_completion" if endpoint == "completions" else "chat.completion.chunk"
        events.append(encode_json({**base, "object": obj, "choices": choices, **usage_null}))

    for choice in response.get("choices") or ():
        index = choice.get("index", 0)
        finish = choice.get("finish_reason")
        if endpoint == "completions":
            emit([{"text": choice.get("text") or "", "index": index, "logprobs": choice.get("logprobs"), "finish_reason": None}])
            emit([{"text": "", "index": index, "logprobs": None, "finish_reason": finish}])
            continue
        message = choice.get("message") or {}
        tools = message.get("tool_calls") or []
        head: dict[str, Any] = {"role": message.get("role") or "assistant", "content": None if tools else ""}
        if tools:
            head["tool_calls"] = [
                {"index": i, "id": t.get("id"), "type": t.get("type", "function"),
                 "function": {"name": (t.get("function") or {}).get("name", ""), "arguments": ""}}
                for i, t in enumerate(tools)
            ]
        emit([{"index": index, "delta": head, "logprobs": None, "finish_reason": None}])
        rest = {k: v for k, v in message.items() if k not in ("role", "tool_calls") and v is not None and v != ""}
        if rest or choice.get("logprobs"):
            emit([{"index": index, "delta": rest, "logprobs": choice.get("logprobs"), "finish_reason": None}])
        args = [
            {"index": i, "function": {"arguments": (t.get("function") or {}).get("arguments", "")}}
            for i, t in enumerate(tools) if (t.get("function") or {}).get("arguments")
        ]
        if args:
            emit([{"index": index, "delta": {"tool_calls": args}, "logprobs": None, "finish_reason": None}])
        emit([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}])
    if include_usage and response.get("usage") is not None:
        obj = "text_completion" if endpoint == "completions" else "chat.completion.chunk"
        events.append(encode_json({**base, "object": obj, "choices": [], "usage": response["usage"]}))
    return events
