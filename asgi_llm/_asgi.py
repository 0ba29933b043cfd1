"""Small pure-ASGI helpers shared by the middlewares and endpoints."""

from __future__ import annotations

import contextlib
import json
import time
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from asgi_llm._timeout import fail_after
from asgi_llm.errors import BodyTooLargeError, InvalidRequestError, RequestTimeoutError, ServiceUnavailableError

__all__ = [
    "JSON_HEADERS",
    "SSE_HEADERS",
    "BodyBudget",
    "BodyReservation",
    "ClientDisconnected",
    "get_header",
    "guard_receive",
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


class BodyBudget:
    """Bytes of request bodies this process may hold at once, across all requests.

    Every body read counts against it from its first byte (or its declared
    ``Content-Length``) until the request ends; a body that would take the total past
    ``limit`` is refused with a 503 and ``Retry-After`` instead of growing the process
    without bound. One budget per gateway; the event loop is single-threaded, so plain
    integer arithmetic is enough.

    Example:
        >>> budget = BodyBudget(256 * 1024 * 1024)
        >>> hold = budget.reservation()
        >>> hold.grow(1024); hold.release()
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reservation(self) -> BodyReservation:
        """A new, empty reservation for one request."""
        return BodyReservation(self)


class BodyReservation:
    """One request's share of a :class:`BodyBudget` (``budget=None``: unlimited)."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: BodyBudget | None) -> None:
        self._budget = budget
        self.held = 0

    def grow(self, size: int) -> None:
        """Make sure ``size`` bytes in all are reserved; raise a 503 if the budget is spent."""
        budget = self._budget
        extra = size - self.held
        if budget is None or extra <= 0:
            return
        if budget.used + extra > budget.limit:
            raise ServiceUnavailableError(
                "The gateway is holding as many request bodies as it may right now; retry in a moment.",
                code="server_busy",
                headers={"retry-after": "1"},
            )
        budget.used += extra
        self.held = size

    def release(self) -> None:
        """Give everything back (idempotent)."""
        if self._budget is not None and self.held:
            self._budget.used -= self.held
        self.held = 0


def declared_length(scope: Scope, limit: int) -> int | None:
    """The request's ``Content-Length`` (``None`` if absent); 400 if malformed, 413 over ``limit``."""
    declared = get_header(scope, b"content-length")
    if declared is None:
        return None
    try:
        size = int(declared)
    except ValueError:
        raise InvalidRequestError("Invalid Content-Length header.", code="invalid_request_body") from None
    if size < 0:
        raise InvalidRequestError("Invalid Content-Length header.", code="invalid_request_body")
    if size > limit:
        raise _too_large(f"Request body is {size} bytes; the limit is {limit} bytes.")
    return size


def _deadline(seconds: float | None) -> AbstractAsyncContextManager[object]:
    return contextlib.nullcontext() if seconds is None else fail_after(max(seconds, 0.001))


def _too_large(message: str) -> BodyTooLargeError:
    # The rest of the body will not be read: the connection cannot be reused.
    return BodyTooLargeError(message, headers={"connection": "close"})


def _too_slow(timeout_s: float) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"The request body did not arrive within {timeout_s:g} s; send it faster or in a smaller request.",
        headers={"connection": "close"},
    )


async def read_body(
    scope: Scope,
    receive: Receive,
    *,
    limit: int,
    timeout_s: float | None = None,
    reservation: BodyReservation | None = None,
) -> bytes:
    """Read the whole request body, refusing more than ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before reading anything;
    with a ``reservation`` the declared size is reserved up front too (503 when the
    process's :class:`BodyBudget` is spent), else each chunk as it arrives. A body not
    complete within ``timeout_s`` seconds (all of it, not per chunk: a client dribbling
    a byte a second is cut too) is a 408. A client that disconnects mid-body gets
    nothing back (there is nobody to answer).
    """
    declared = declared_length(scope, limit)
    if reservation is not None and declared:
        reservation.grow(declared)
    chunks: list[bytes] = []
    total = 0
    try:
        async with _deadline(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected()
                chunk = message.get("body", b"")
                if chunk:
                    total += len(chunk)
                    if total > limit:
                        raise _too_large(f"Request body exceeds the limit of {limit} bytes.")
                    if reservation is not None:
                        reservation.grow(total)
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise _too_slow(timeout_s or 0.0) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def guard_receive(
    scope: Scope,
    receive: Receive,
    *,
    limit: int,
    timeout_s: float | None = None,
    reservation: BodyReservation | None = None,
) -> Receive:
    """``receive`` with the same limits as :func:`read_body`, for apps that read the body
    themselves (the admin and node routes): size, total read time, budget.

    Once the body is complete, later calls (waiting for ``http.disconnect``) pass through
    unbounded.
    """
    state: dict[str, Any] = {"total": 0, "done": False, "started": None}

    async def guarded() -> Message:
        if state["done"]:
            return await receive()
        if state["started"] is None:
            declared = declared_length(scope, limit)
            if reservation is not None and declared:
                reservation.grow(declared)
            state["started"] = time.monotonic()
        remaining = None if timeout_s is None else timeout_s - (time.monotonic() - state["started"])
        try:
            async with _deadline(remaining):
                message = await receive()
        except TimeoutError:
            raise _too_slow(timeout_s or 0.0) from None
        if message["type"] != "http.request":
            state["done"] = True
            return message
        state["total"] += len(message.get("body", b""))
        if state["total"] > limit:
            raise _too_large(f"Request body exceeds the limit of {limit} bytes.")
        if reservation is not None:
            reservation.grow(state["total"])
        if not message.get("more_body", False):
            state["done"] = True
        return message

    return guarded


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
