"""A recording fake at the :class:`~asgi_llm.providers.transport.UpstreamTransport` seam.

For in-process tests of adapters and layers: each ``send`` is recorded (method, URL,
headers, JSON body) and answered from a script — recorded bytes with a status and a
content type, or an exception to raise (e.g. :class:`~asgi_llm.errors.UpstreamConnectionError`).
The rest of the pipeline (adapters, failover, dispatch, streaming) runs for real.

Example:
    >>> primary = RecordingTransport(Answer(500, b'{"error": {"message": "boom"}}'))
    >>> adapter = OpenAIAdapter("a", base_url="https://a.example/v1", transport=primary)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Answer", "RecordedResponse", "RecordingTransport"]


@dataclass(frozen=True)
class Answer:
    """One scripted upstream answer."""

    status: int
    body: bytes
    content_type: str = "application/json"
    piece_bytes: int = 37
    """The body is streamed in pieces of this size (arbitrary boundaries, as on a network)."""


class _Headers(dict[str, str]):
    """Case-insensitive lookups, as the real transports' headers."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


class RecordedResponse:
    """An :class:`~asgi_llm.providers.transport.UpstreamResponse` over scripted bytes."""

    def __init__(self, answer: Answer) -> None:
        self.status = answer.status
        self.headers = _Headers({"content-type": answer.content_type})
        self._answer = answer
        self.closed = False

    async def read(self) -> bytes:
        """The whole body."""
        return self._answer.body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body in pieces of :attr:`Answer.piece_bytes`."""
        body, step = self._answer.body, max(1, self._answer.piece_bytes)
        for i in range(0, len(body), step):
            yield body[i:i + step]

    async def aclose(self) -> None:
        """Mark the response released."""
        self.closed = True


class RecordingTransport:
    """Answers from a script and keeps what it was sent.

    Args:
        *script: answers (or exceptions to raise), used in order; the last one repeats.
    """

    def __init__(self, *script: Answer | BaseException) -> None:
        if not script:
            raise ValueError("RecordingTransport needs at least one answer")
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self.closed = False

    @classmethod
    def answering(cls, status: int, body: bytes, content_type: str = "application/json") -> RecordingTransport:
        """A transport that always answers ``status`` with ``body``."""
        return cls(Answer(status, body, content_type))

    async def send(self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None) -> RecordedResponse:
        """Record the request; answer (or raise) the next scripted step."""
        self.requests.append({"method": method, "url": url, "headers": dict(headers),
                              "json": json.loads(body) if body else None})
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        if isinstance(step, BaseException):
            raise step
        return RecordedResponse(step)

    async def aclose(self) -> None:
        """Close the (imaginary) pool."""
        self.closed = True
