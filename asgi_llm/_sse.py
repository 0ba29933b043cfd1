"""Server-sent events: encoding, and an incremental parser for upstream streams.

The parser follows the WHATWG event-stream rules that matter for LLM APIs: lines end
in ``\\n``, ``\\r\\n`` or ``\\r``; ``data:`` lines of one event are joined with ``\\n``;
``event:`` names the event (Anthropic uses it); lines starting with ``:`` are comments
(keep-alives); an empty line dispatches the event. Bytes arrive in arbitrary pieces, so
it keeps the unfinished tail between feeds — bounded by ``max_event_bytes``, and
scanned once (an event arriving in many pieces costs linear, not quadratic, time). It
never decodes JSON: callers decide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "DONE",
    "SSEEvent",
    "SSEEventTooLarge",
    "SSEParser",
    "encode_data",
    "encode_event",
    "encode_json",
]

DONE = b"data: [DONE]\n\n"

DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024
"""Largest event :class:`SSEParser` buffers by default (LLM stream events are < 1 KiB)."""


class SSEEventTooLarge(ValueError):
    """An event grew past the parser's ``max_event_bytes`` before it was complete."""


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event. ``raw`` is the event's own bytes, ready to relay unchanged."""

    data: str
    event: str | None = None
    raw: bytes = b""


def encode_data(data: str | bytes) -> bytes:
    """Frame one payload as ``data: ...\\n\\n`` (multi-line payloads become several data lines)."""
    if isinstance(data, str):
        data = data.encode()
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        return b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    return b"data: " + data + b"\n\n"


def encode_json(obj: Any) -> bytes:
    """Frame a JSON-serialisable object as one SSE data event."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def encode_event(event: str, obj: Any) -> bytes:
    """Frame a named event (``event: x`` + ``data: {...}``), as Anthropic's API does."""
    return b"event: " + event.encode() + b"\n" + encode_json(obj)


class SSEParser:
    """Feed bytes, get complete events.

    Args:
        max_event_bytes: an unfinished event growing past this raises
            :class:`SSEEventTooLarge` (``None``: unbounded).

    Example:
        >>> p = SSEParser()
        >>> p.feed(b'data: {"a"')
        []
        >>> [e.data for e in p.feed(b': 1}\\n\\n')]
        ['{"a": 1}']
    """

    __slots__ = ("_buf", "_scanned", "_skip_lf", "max_event_bytes")

    def __init__(self, *, max_event_bytes: int | None = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already searched for an event end
        self._skip_lf = False
        self.max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add bytes; return every event completed by them, in order."""
        if self._skip_lf:
            # The previous piece ended in \r: a \n now is the second half of that \r\n.
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if b"\r" in chunk:
            # Rare in practice (OpenAI-compatible servers use \n); normalise this piece.
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not self._buf:
            buf: bytes | bytearray = chunk  # the common case: no tail kept, no copy
            scan_from = 0
        else:
            self._buf += chunk
            buf = self._buf
            scan_from = max(self._scanned - 1, 0)  # an end may straddle the old tail
        events: list[SSEEvent] = []
        start = 0
        while True:
            end = buf.find(b"\n\n", max(start, scan_from))
            if end < 0:
                break
            block = bytes(buf[start:end])
            start = end + 2
            event = _parse_block(block)
            if event is not None:
                events.append(event)
        rest = len(buf) - start
        if self.max_event_bytes is not None and rest > self.max_event_bytes:
            self._buf = bytearray()
            self._scanned = 0
            raise SSEEventTooLarge(f"a stream event exceeded {self.max_event_bytes} bytes")
        if buf is self._buf:
            del self._buf[:start]
        else:
            self._buf = bytearray(buf[start:])
        self._scanned = rest
        return events

    @property
    def pending(self) -> bytes:
        """Bytes received that do not yet form a complete event (non-empty at EOF = cut stream)."""
        return bytes(self._buf)


def _parse_block(block: bytes) -> SSEEvent | None:
    if block.startswith(b"data: ") and b"\n" not in block:
        # The common case: one data line.
        return SSEEvent(block[6:].decode("utf-8", "replace"), None, block + b"\n\n")
    data_lines: list[str] = []
    name: str | None = None
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data_lines.append(value.decode("utf-8", "replace"))
        elif field == b"event":
            name = value.decode("utf-8", "replace")
        # id: and retry: carry nothing for LLM streams; ignore them.
    if not data_lines and name is None:
        return None  # comment-only block (keep-alive)
    return SSEEvent("\n".join(data_lines), name, block + b"\n\n")
