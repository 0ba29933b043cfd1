"""Entries: a stream assembles into the non-streamed answer, and replays back into a stream."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_llm.cache.entry import Entry, StreamAssembler, is_complete, replay_events
from asgi_llm.context import Usage

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def chat_response(content: Any = "Hello there", tools: list | None = None, finish: str = "stop", n: int = 1) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tools:
        message["tool_calls"] = tools
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": i, "message": dict(message), "logprobs": None, "finish_reason": finish} for i in range(n)],
        "usage": USAGE,
    }


def parse(events: list[bytes]) -> list[dict]:
    return [json.loads(e[6:]) for e in events]


def assemble(endpoint: str, events: list[bytes], usage: Usage | None = None) -> dict | None:
    a = StreamAssembler(endpoint)
    for chunk in parse(events):
        a.feed(chunk)
    return a.result(fallback_usage=usage)


class TestRoundTrip:
    @settings(max_examples=60)
    @given(st.text(max_size=50), st.integers(1, 3), st.sampled_from(["stop", "length"]))
    def test_chat_replay_reassembles(self, content: str, n: int, finish: str) -> None:
        """Replaying an answer as SSE and assembling it again gives the same answer."""
        response = chat_response(content, n=n, finish=finish)
        again = assemble("chat", replay_events("chat", response, include_usage=True))
        assert again == response

    def test_tool_calls(self) -> None:
        """Tool calls survive replay and reassembly (content None)."""
        tools = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}},
                 {"id": "call_2", "type": "function", "function": {"name": "other", "arguments": "{}"}}]
        response = chat_response(None, tools=tools, finish="tool_calls")
        assert assemble("chat", replay_events("chat", response, include_usage=True)) == response

    def test_extra_message_fields(self) -> None:
        """Fields a vendor adds to the message (reasoning_content) are kept."""
        response = chat_response("42")
        response["choices"][0]["message"]["reasoning_content"] = "thinking…"
        assert assemble("chat", replay_events("chat", response, include_usage=True)) == response

    def test_completions(self) -> None:
        """Legacy completions replay as text chunks and reassemble."""
        response = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                    "choices": [{"text": "hi there", "index": 0, "logprobs": None, "finish_reason": "stop"}], "usage": USAGE}
        events = replay_events("completions", response, include_usage=True)
        assert all(c["object"] == "text_completion" for c in parse(events))
        assert assemble("completions", events) == response

    def test_usage_chunk_only_when_asked(self) -> None:
        """The usage chunk is replayed only for include_usage; fallback usage fills a hidden one."""
        response = chat_response()
        quiet = parse(replay_events("chat", response, include_usage=False))
        assert all("usage" not in c for c in quiet)
        loud = parse(replay_events("chat", response, include_usage=True))
        assert loud[-1]["choices"] == [] and loud[-1]["usage"] == USAGE
        rebuilt = assemble("chat", replay_events("chat", response, include_usage=False), usage=Usage(5, 3, 8))
        assert rebuilt == response


class TestIncomplete:
    def test_missing_finish_is_not_an_answer(self) -> None:
        """A stream without a finish reason (cut) assembles to nothing."""
        events = replay_events("chat", chat_response(), include_usage=False)[:-1]
        assert assemble("chat", events) is None

    def test_error_chunk_breaks(self) -> None:
        """An error event anywhere marks the stream broken."""
        a = StreamAssembler("chat")
        for chunk in parse(replay_events("chat", chat_response(), include_usage=False)):
            a.feed(chunk)
        a.feed({"error": {"message": "boom"}})
        assert a.result() is None

    def test_is_complete(self) -> None:
        """Errors, empty choices and missing finish reasons are not complete answers."""
        assert is_complete("chat", chat_response())
        assert not is_complete("chat", {"error": {"message": "x"}})
        assert not is_complete("chat", {**chat_response(), "choices": []})
        assert not is_complete("chat", chat_response(finish=None))  # type: ignore[arg-type]
        assert is_complete("embeddings", {"object": "list", "data": []})
        assert not is_complete("embeddings", {"object": "list"})

    def test_entry_codec(self) -> None:
        """Entries round-trip; foreign bytes decode to None (a miss)."""
        e = Entry("chat", chat_response(), stored_at=12.5, route="provider-a/gpt-4o-mini")
        assert Entry.decode(e.encode()) == e
        assert e.usage == Usage(5, 3, 8)
        for junk in (b"", b"not json", b"[]", b'{"v": 99, "response": {}}', b'{"v":1,"endpoint":"chat","response":{}}'):
            assert Entry.decode(junk) is None
