"""SSE encoding and the incremental parser."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from asgi_llm._sse import SSEParser, encode_data, encode_event, encode_json


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


class TestParser:
    def test_single_line_events(self) -> None:
        """Plain `data:` events come out in order, with their raw bytes for relaying."""
        p = SSEParser()
        events = p.feed(b'data: {"a":1}\n\ndata: [DONE]\n\n')
        assert [e.data for e in events] == ['{"a":1}', "[DONE]"]
        assert events[0].raw == b'data: {"a":1}\n\n'
        assert p.pending == b""

    def test_partial_feeds_keep_tail(self) -> None:
        """An event split across feeds is emitted once complete; the tail is kept."""
        p = SSEParser()
        assert p.feed(b"data: hel") == []
        assert p.pending == b"data: hel"
        assert [e.data for e in p.feed(b"lo\n\n")] == ["hello"]

    def test_crlf_and_cr_line_endings(self) -> None:
        """\\r\\n and \\r line endings are accepted, even when \\r\\n is split between feeds."""
        p = SSEParser()
        # "\r" alone already ends a line, so the blank line is complete here …
        assert [e.data for e in p.feed(b"data: a\r\n\r")] == ["a"]
        # … and a "\n" that follows it is its second half, not another blank line.
        assert [e.data for e in p.feed(b"\ndata: b\r\r")] == ["b"]
        assert [e.data for e in p.feed(b"data: c\r\n\r\n")] == ["c"]
        assert p.pending == b""

    def test_comments_named_events_and_multiline(self) -> None:
        """Comments are skipped, `event:` is kept, multi-line data is joined with \\n."""
        p = SSEParser()
        events = p.feed(b": keep-alive\n\nevent: message_start\ndata: {\"x\":\ndata: 1}\n\n")
        assert len(events) == 1
        assert events[0].event == "message_start"
        assert json.loads(events[0].data) == {"x": 1}

    @given(
        payloads=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=30), max_size=8),
        cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
    )
    def test_any_chunking_gives_same_events(self, payloads: list[str], cuts: list[int]) -> None:
        """However the bytes are split, the same events come out."""
        stream = b"".join(encode_data(p) for p in payloads)
        p = SSEParser()
        out = []
        for piece in _split(stream, cuts):
            out.extend(e.data for e in p.feed(piece))
        assert out == payloads
        assert p.pending == b""


class TestEncode:
    def test_encode_json_and_event(self) -> None:
        """JSON and named events are framed as SSE."""
        assert encode_json({"a": 1}) == b'data: {"a":1}\n\n'
        assert encode_event("ping", {}) == b"event: ping\ndata: {}\n\n"

    def test_multiline_payload_round_trips(self) -> None:
        """A payload with newlines becomes several data lines and parses back whole."""
        framed = encode_data("a\nb")
        assert framed == b"data: a\ndata: b\n\n"
        assert SSEParser().feed(framed)[0].data == "a\nb"


class TestEventLimit:
    def test_event_past_the_limit_is_refused(self) -> None:
        """An unfinished event growing past max_event_bytes raises; smaller ones pass."""
        from asgi_llm._sse import SSEEventTooLarge

        p = SSEParser(max_event_bytes=1024)
        assert [e.data for e in p.feed(b"data: " + b"a" * 1000 + b"\n\n")] == ["a" * 1000]
        p.feed(b"data: " + b"b" * 600)
        try:
            p.feed(b"b" * 600)
        except SSEEventTooLarge:
            pass
        else:
            raise AssertionError("a 1,206-byte event passed a 1,024-byte limit")

    def test_many_small_pieces_cost_linear_time(self) -> None:
        """A 16 MB event in 4 KiB pieces: the tail is scanned once, not once per piece
        (the old parser, copying its tail on every feed, took 88 s for this)."""
        import time

        p = SSEParser(max_event_bytes=32 * 1024 * 1024)
        piece = b"x" * 4096
        t0 = time.perf_counter()
        p.feed(b"data: ")
        for _ in range(4096):
            assert p.feed(piece) == []
        events = p.feed(b"\n\n")
        assert len(events) == 1 and len(events[0].data) == 4096 * 4096
        assert time.perf_counter() - t0 < 10.0

    @given(st.lists(st.integers(min_value=0, max_value=400), max_size=12))
    def test_split_anywhere_with_crlf_and_limit(self, cuts: list[int]) -> None:
        """Events split at any point (\\r\\n endings included) parse the same, under a limit."""
        data = b"data: one\r\n\r\n: keep-alive\n\nevent: e\ndata: two\ndata: 2\n\ndata: three\r\r"
        p = SSEParser(max_event_bytes=64)
        out = [e.data for part in _split(data, cuts) for e in p.feed(part)]
        assert out == ["one", "two\n2", "three"]
        assert p.pending == b""
