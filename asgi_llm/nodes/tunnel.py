"""The tunnel: requests to a node carried over the WebSocket its agent dialed out.

A node behind NAT opens ``ws(s)://gateway/nodes/tunnel`` (``Authorization: Bearer
<node credential>``) and keeps it open; the gateway multiplexes any number of
concurrent requests over it, streams included. Framing — one JSON text message per
frame, ``id`` ties frames to a request::

    gateway → agent   {"type": "request", "id": 7, "method": "POST", "path": "/v1/chat/completions",
                       "headers": {...}, "body": "<base64>"}
                      {"type": "cancel", "id": 7}            # the gateway gave up on 7
    agent → gateway   {"type": "response", "id": 7, "status": 200, "headers": {...}}
                      {"type": "chunk", "id": 7, "data": "<base64>"}   # as the engine sends them
                      {"type": "end", "id": 7}
                      {"type": "error", "id": 7, "message": "..."}

:class:`TunnelTransport` implements the :class:`~asgi_llm.providers.transport.UpstreamTransport`
Protocol over a :class:`TunnelConnection`, so the OpenAI-compatible adapter (body
rewriting, usage, stream parsing, timeouts) works unchanged. A dropped WebSocket ends
every open request with :class:`~asgi_llm.errors.UpstreamConnectionError`, so a
request not yet committed fails over like any connection reset.

One tunnel per node: when an agent (or anyone holding its credential) opens another,
the registry closes the previous :class:`TunnelConnection`, and closing it closes its
WebSocket (code 4409) — a credential cannot pile up open sockets. Revoking a node
closes its tunnel the same way (code 4409 as well).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from starlette.types import Receive, Scope, Send

from asgi_llm.errors import UpstreamConnectionError
from asgi_llm.providers.transport import collect_at_most

__all__ = ["TunnelConnection", "TunnelTransport", "decode_body", "encode_body"]

_MAX_BUFFERED_FRAMES = 4096
MAX_FRAME_CHARS = 4 * 1024 * 1024
"""Largest tunnel message the gateway accepts. Agents send the engine's body as it
arrives off the socket (kilobytes per chunk), so a bigger frame is an abuse: the request
it belongs to fails (the rest of the tunnel keeps working)."""
_MAX_QUEUED_CHARS = 32 * 1024 * 1024
"""Body bytes (base64 characters) queued for one request that its consumer has not
taken yet; past it the request fails instead of the gateway buffering without end."""


def encode_body(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def decode_body(text: str | None) -> bytes:
    return b"" if not text else base64.b64decode(text)


def _data_chars(frame: dict[str, Any]) -> int:
    data = frame.get("data")
    return len(data) if isinstance(data, str) else 0


class _CaseInsensitive(dict[str, str]):
    def __init__(self, items: Mapping[str, str]) -> None:
        super().__init__({k.lower(): v for k, v in items.items()})

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


class _TunnelResponse:
    """One tunneled response (the ``UpstreamResponse`` Protocol)."""

    def __init__(self, conn: TunnelConnection, rid: int, status: int, headers: Mapping[str, str],
                 frames: ObjectReceiveStream[dict[str, Any]], url: str) -> None:
        self._conn, self._id, self._frames, self._url = conn, rid, frames, url
        self.status = status
        self.headers: Mapping[str, str] = _CaseInsensitive(headers)
        self._done = False

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.iter_chunks()]
        return b"".join(parts)

    async def read_at_most(self, limit: int) -> bytes | None:
        """The whole body, or ``None`` once it passes ``limit`` bytes: frames stop being
        accumulated at once, and :meth:`aclose` cancels the request at the agent."""
        return await collect_at_most(self.iter_chunks(), limit)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while not self._done:
            try:
                frame = await self._frames.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise UpstreamConnectionError(f"The tunnel to {self._url} closed mid-response.") from None
            kind = frame.get("type")
            if kind == "chunk":
                self._conn.taken(self._id, frame)
                data = decode_body(frame.get("data"))
                if data:
                    yield data
            elif kind == "end":
                self._done = True
            elif kind == "error":
                raise UpstreamConnectionError(f"The node's engine failed mid-response: {frame.get('message', '')}.")

    async def aclose(self) -> None:
        try:
            await self._conn.finish(self._id, cancel=not self._done)
        finally:
            self._frames.close()


class TunnelConnection:
    """The gateway's side of one agent's WebSocket: sends request frames, routes the
    agent's frames to the request they belong to.

    Args:
        send_text: sends one text message on the WebSocket (serialised here).
    """

    def __init__(self, send_text: Callable[[str], Awaitable[None]], *, name: str = "",
                 on_close: Callable[[], None] | None = None) -> None:
        self._send_text = send_text
        self._on_close = on_close
        self._lock = anyio.Lock()
        self._streams: dict[int, ObjectSendStream[dict[str, Any]]] = {}
        self._queued: dict[int, int] = {}
        self._dropped: set[int] = set()
        self._next = 0
        self.name = name
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def _send(self, frame: dict[str, Any]) -> None:
        async with self._lock:
            await self._send_text(json.dumps(frame, separators=(",", ":")))

    async def request(self, method: str, path: str, headers: Mapping[str, str], body: bytes | None) -> _TunnelResponse:
        """Send a request; return once the agent sent the response head."""
        if self.closed:
            raise UpstreamConnectionError(f"The tunnel to node {self.name!r} is closed.")
        self._next += 1
        rid = self._next
        tx, rx = anyio.create_memory_object_stream[dict[str, Any]](max_buffer_size=_MAX_BUFFERED_FRAMES)
        self._streams[rid] = tx
        ok = False
        try:
            try:
                await self._send({"type": "request", "id": rid, "method": method, "path": path,
                                  "headers": dict(headers), "body": encode_body(body)})
            except Exception as exc:  # the socket went away while we were writing
                raise UpstreamConnectionError(f"Could not write to the tunnel of node {self.name!r}: {exc}.") from exc
            try:
                head = await rx.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise UpstreamConnectionError(f"The tunnel to node {self.name!r} closed before a response.") from None
            if head.get("type") == "error":
                raise UpstreamConnectionError(f"Node {self.name!r} could not reach its engine: {head.get('message', '')}.")
            if head.get("type") != "response":
                raise UpstreamConnectionError(f"Node {self.name!r} sent an unexpected tunnel frame {head.get('type')!r}.")
            ok = True
            return _TunnelResponse(self, rid, int(head.get("status", 502)), head.get("headers") or {}, rx,
                                   f"node {self.name!r}")
        finally:
            if not ok:
                await self.finish(rid, cancel=True)
                rx.close()

    async def finish(self, rid: int, *, cancel: bool) -> None:
        """Forget request ``rid``; tell the agent to stop it when it is not complete."""
        tx = self._streams.pop(rid, None)
        self._queued.pop(rid, None)
        dropped = rid in self._dropped
        self._dropped.discard(rid)
        if tx is None and not dropped:
            return
        if tx is not None:
            tx.close()
        if cancel and not self.closed:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await self._send({"type": "cancel", "id": rid})
                except Exception:  # noqa: BLE001 - the socket is gone; nothing left to cancel
                    pass

    def feed(self, frame: dict[str, Any], size: int = 0) -> None:
        """Route one frame from the agent (called by the WebSocket reader); ``size`` is
        the frame's length as received, bounded by :data:`MAX_FRAME_CHARS`."""
        rid = frame.get("id")
        tx = self._streams.get(rid) if isinstance(rid, int) else None
        if tx is None:
            return  # a request we already gave up on
        queued = self._queued.get(rid, 0) + _data_chars(frame)
        if size > MAX_FRAME_CHARS or queued > _MAX_QUEUED_CHARS:
            self._drop(rid, tx)  # an oversized frame, or a consumer hopelessly behind
            return
        try:
            tx.send_nowait(frame)
        except anyio.WouldBlock:
            # The consumer fell hopelessly behind: fail this request, not the whole tunnel.
            self._drop(rid, tx)
            return
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._streams.pop(rid, None)
            self._queued.pop(rid, None)
            return
        self._queued[rid] = queued

    def taken(self, rid: int, frame: dict[str, Any]) -> None:
        """The consumer of ``rid`` took ``frame`` off its queue."""
        if rid in self._queued:
            self._queued[rid] = max(0, self._queued[rid] - _data_chars(frame))

    def _drop(self, rid: int, tx: ObjectSendStream[dict[str, Any]]) -> None:
        """Fail request ``rid`` (its consumer sees the tunnel close mid-response, and its
        ``aclose`` tells the agent to stop); later frames for it are ignored."""
        self._streams.pop(rid, None)
        self._queued.pop(rid, None)
        self._dropped.add(rid)  # so that finish() still cancels it at the agent
        tx.close()

    def close(self) -> None:
        """The WebSocket is gone or replaced: every open request ends with a connection
        error, and the socket (if still open) is closed by its endpoint."""
        self.closed = True
        for tx in self._streams.values():
            tx.close()
        self._streams.clear()
        self._queued.clear()
        self._dropped.clear()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


class TunnelTransport:
    """``UpstreamTransport`` over whichever tunnel the node currently has open.

    Args:
        lookup: returns the node's live :class:`TunnelConnection` (or ``None``).
        name: the node's name, for messages.
    """

    def __init__(self, lookup: Callable[[], TunnelConnection | None], *, name: str) -> None:
        self._lookup = lookup
        self.name = name

    async def send(self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None) -> Any:
        conn = self._lookup()
        if conn is None or conn.closed:
            raise UpstreamConnectionError(f"Node {self.name!r} has no open tunnel.")
        path = "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url
        return await conn.request(method, path, headers, body)

    async def aclose(self) -> None:
        return None


async def serve_tunnel(scope: Scope, receive: Receive, send: Send, *,
                       authenticate: Callable[[str | None], Awaitable[Any]],
                       attach: Callable[[Any, TunnelConnection], None],
                       detach: Callable[[Any, TunnelConnection], None]) -> None:
    """The ASGI WebSocket endpoint ``/nodes/tunnel``: authenticate the node credential,
    accept, and feed frames to a :class:`TunnelConnection` until the socket closes."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    token = None
    for k, v in scope.get("headers", []):
        if k.lower() == b"authorization":
            scheme, _, rest = v.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                token = rest.strip() or None
    node = await authenticate(token)
    if node is None:
        await send({"type": "websocket.close", "code": 4401, "reason": "invalid or revoked node credential"})
        return
    await send({"type": "websocket.accept"})

    async def send_text(text: str) -> None:
        await send({"type": "websocket.send", "text": text})

    closing = anyio.Event()
    conn = TunnelConnection(send_text, name=getattr(node, "name", ""), on_close=closing.set)
    attach(node, conn)
    replaced = False
    try:
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    text = message.get("text")
                    if text is None and message.get("bytes") is not None:
                        text = message["bytes"].decode(errors="replace")
                    if not text:
                        continue
                    try:
                        frame = json.loads(text)
                    except ValueError:
                        continue
                    if isinstance(frame, dict):
                        conn.feed(frame, len(text))
                tg.cancel_scope.cancel()

            tg.start_soon(read)
            await closing.wait()  # replaced by a newer tunnel, the node forgotten, or the reader ended
            replaced = not tg.cancel_scope.cancel_called
            tg.cancel_scope.cancel()
    finally:
        conn.close()
        detach(node, conn)
    if replaced:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            try:
                await send({"type": "websocket.close", "code": 4409, "reason": "replaced by a newer tunnel or revoked"})
            except Exception:  # noqa: BLE001 - the peer is gone already
                pass


