"""Small pure-ASGI helpers shared by the middlewares and endpoints."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from asgi_llm.errors import BodyTooLargeError, InvalidRequestError

__all__ = [
    "JSON_HEADERS",
    "SSE_HEADERS",
    "get_header",
    "read_body",
    "replay_receive",
    "route_path",
    "send_bytes",
    "send_json",
]

JSON_HEADERS: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
SSE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx-style proxies not to buffer the stream
]


def route_path(scope: Scope) -> str:
    """The path relative to where the app is mounted (what a route should match).

    Starlette's ``Mount`` keeps the full ``path`` and sets ``root_path``; plain ASGI
    servers with ``--root-path`` may or may not strip it. Handle both.
    """
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


def get_header(scope: Scope, name: bytes) -> bytes | None:
    """First value of a request header (``name`` lower-case bytes)."""
    for k, v in scope["headers"]:
        if k == name:
            return v  # type: ignore[no-any-return]
    return None


async def read_body(scope: Scope, receive: Receive, *, limit: int) -> bytes:
    """Read the whole request body, refusing more than ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before reading anything.
    A client that disconnects mid-body gets nothing back (there is nobody to answer).
    """
    declared = get_header(scope, b"content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequestError("Invalid Content-Length header.", code="invalid_request_body") from None
        if size > limit:
            raise BodyTooLargeError(f"Request body is {size} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        if chunk:
            total += len(chunk)
            if total > limit:
                raise BodyTooLargeError(f"Request body exceeds the limit of {limit} bytes.")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ClientDisconnected(Exception):
    """The client went away; nothing can be sent any more."""


def replay_receive(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields the already-read body once, then defers to the real one.

    Inner apps that read the body again (a host's own code, say) get the same bytes;
    later calls wait for ``http.disconnect`` from the server as usual.
    """
    sent = False

    async def wrapped() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """Send a complete response with ``content-length``."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send,
    status: int,
    obj: Any,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send a JSON response."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    await send_bytes(send, status, body, [*JSON_HEADERS, *(headers or [])])
