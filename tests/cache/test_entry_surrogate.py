"""Cache entries of upstream answers holding a lone surrogate (issue 12 follow-up, item 4)."""

from __future__ import annotations

import json

from asgi_llm.cache.entry import Entry, json_bytes
from asgi_llm.usage.accounting import _str_bytes


def test_lone_surrogate_round_trips() -> None:
    """Encoded ASCII-escaped instead of raising; decoded back to the same answer."""
    answer = {"choices": [{"message": {"role": "assistant", "content": "ok\ud800"}}]}
    assert json.loads(json_bytes(answer)) == answer
    assert json_bytes({"content": "héllo"}) == '{"content":"héllo"}'.encode()
    entry = Entry(endpoint="chat", response=answer, stored_at=1.0)
    decoded = Entry.decode(entry.encode())
    assert decoded is not None and decoded.response == answer


def test_answer_bytes_count_a_lone_surrogate() -> None:
    assert _str_bytes("ok\ud800") == 5
    assert _str_bytes("é") == 2
