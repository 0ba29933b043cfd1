"""An in-process ASGI harness that records every ``send`` message.

``httpx.ASGITransport`` joins the body and hides chunk boundaries and timing; streaming
tests need each message as the app sent it, and control over when the client
"disconnects".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.types import ASGIApp, Message


@dataclass
class Recorded:
    """Everything the app sent for one request."""

    messages: list[Message] = field(default_factory=list)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.messages[0]["headers"]}

    @property
    def body_parts(self) -> list[bytes]:
        return [m.get("body", b"") for m in self.messages[1:] if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(self.body_parts)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def starts(self) -> int:
        return sum(1 for m in self.messages if m["type"] == "http.response.start")

    @property
    def complete(self) -> bool:
        last = self.messages[-1] if self.messages else {}
        return last.get("type") == "http.response.body" and not last.get("more_body", False)

    def sse_data(self) -> list[str]:
        """The ``data:`` payloads of an SSE body, in order."""
        out = []
        for block in self.body.decode().split("\n\n"):
            if block.startswith("data: "):
                out.append(block[6:])
        return out


async def call(
    app: ASGIApp,
    *,
    method: str = "POST",
    path: str = "/v1/chat/completions",
    body: bytes | Any = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    body_chunks: list[bytes] | None = None,
    disconnect_after_parts: int | None = None,
    root_path: str = "",
) -> Recorded:
    """Run one request through ``app``; return what it sent.

    ``body`` may be bytes or a JSON-serialisable object. ``body_chunks`` sends the body
    in several ``http.request`` messages. ``disconnect_after_parts`` makes the client go
    away once that many body messages have been received.
    """
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    chunks = body_chunks if body_chunks is not None else [body]
    rec = Recorded()
    gone = anyio.Event()
    queue = list(chunks)

    async def receive() -> Message:
        if queue:
            part = queue.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(queue)}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        rec.messages.append(message)
        if message["type"] == "http.response.body":
            if not message.get("more_body", False):
                gone.set()
            elif disconnect_after_parts is not None and len(rec.body_parts) >= disconnect_after_parts:
                gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": root_path + path,
        "raw_path": (root_path + path).encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [(b"host", b"testserver"), *(headers or [])],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    return rec
