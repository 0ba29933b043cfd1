"""Connection limits for ``asgi-llm serve``: what uvicorn's httptools protocol lacks.

uvicorn (0.55, httptools) has no limit on how long a client may take to send its
request headers, nor on their size or number: a client that dribbles a header byte a
second holds a connection (a file descriptor) forever, and one header of a gigabyte is
buffered whole. :class:`GatewayHttpProtocol` adds, per connection:

* a **header timeout** (``server.header_timeout_s``): from the connection's first byte
  (or the start of each later request on it) to the end of the headers; past it the
  client gets a 408 and the connection is closed;
* a **header size limit** (``server.max_header_bytes``, request line included, counted on
  the raw bytes before the parser buffers them) and a **header count limit**
  (``server.max_headers``): past either, a 431 and the connection is closed;
* a **linger limit**: a request answered before its body was read (a 401, a 413) gives
  the client ``header_timeout_s`` more to finish sending the body — which the server
  discards as it arrives — then the connection is closed, so a half-sent body cannot
  hold it open either.

The body itself is bounded by the gateway's read path (``server.body_read_timeout_s``,
``max_body_bytes``, ``max_inflight_body_bytes``). Limits come from the ``server`` section
of the recipe the served gateway was built from.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

__all__ = ["DEFAULT_LIMITS", "ConnectionLimits", "raise_fd_limit", "run_draining", "serve_options"]


class ConnectionLimits:
    """The per-connection limits :class:`GatewayHttpProtocol` enforces."""

    __slots__ = ("header_timeout_s", "max_header_bytes", "max_headers")

    def __init__(self, header_timeout_s: float = 10.0, max_header_bytes: int = 64 * 1024, max_headers: int = 100) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers

    @classmethod
    def of(cls, server_config: Any) -> ConnectionLimits:
        """From a recipe's ``server`` section (defaults when ``None``)."""
        if server_config is None:
            return cls()
        return cls(server_config.header_timeout_s, server_config.max_header_bytes, server_config.max_headers)


DEFAULT_LIMITS = ConnectionLimits()


def _limits_of(app: Any) -> ConnectionLimits:
    """The limits of the gateway uvicorn serves (it may wrap it in its own middlewares)."""
    for _ in range(8):
        if app is None:
            break
        config = getattr(app, "server_config", None)
        if config is not None:
            return ConnectionLimits.of(config)
        app = getattr(app, "app", None)
    return DEFAULT_LIMITS


def _response(status: int, reason: bytes, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}},
                      separators=(",", ":")).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body))) + body


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools not installed: serve_options falls back to h11
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


if HttpToolsProtocol is not None:

    class GatewayHttpProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """uvicorn's httptools protocol with header timeout, header size/count limits and
        a bounded linger after an early answer (see the module docstring)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.limits = _limits_of(self.app)
            self._timer: asyncio.TimerHandle | None = None
            self._in_headers = True
            self._header_bytes = 0
            self._message_done = True
            self._refusal: bytes | None = None

        # -- timers

        def _arm(self, handler: Any) -> None:
            self._disarm()
            self._timer = self.loop.call_later(self.limits.header_timeout_s, handler)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _headers_too_slow(self) -> None:
            self._timer = None
            if self._in_headers and not self.transport.is_closing():
                self._refuse(_response(408, b"Request Timeout",
                                       f"The request headers did not arrive within {self.limits.header_timeout_s:g} s.",
                                       "request_timeout"))

        def _linger_over(self) -> None:
            self._timer = None
            if not self._message_done and not self.transport.is_closing():
                self.transport.close()  # the answer was sent; the rest of the body never came

        def _refuse(self, response: bytes) -> None:
            self._disarm()
            self.transport.write(response)
            self.transport.close()

        # -- connection events

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(self._headers_too_slow)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # While in the headers, feed the parser at most one byte past the limit at a
            # time: a read that holds a whole oversized header block (100 KB in one
            # segment) is refused before the parser could complete it.
            limit = self.limits.max_header_bytes
            while data and self._in_headers:
                if self.transport.is_closing():
                    return
                piece, data = data[:max(0, limit - self._header_bytes) + 1], data[max(0, limit - self._header_bytes) + 1:]
                self._header_bytes += len(piece)
                super().data_received(piece)
                if self.transport.is_closing() or self.transport.get_protocol() is not self:
                    return  # refused, failed to parse, or upgraded to a WebSocket (as uvicorn: rest dropped)
                if self._in_headers and self._header_bytes > limit:
                    self._refuse(_response(431, b"Request Header Fields Too Large",
                                           f"The request line and headers exceed {limit} bytes.",
                                           "request_header_fields_too_large"))
                    return
            if data:
                super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to a parser error: ours when one of our limits raised it.
            if self._refusal is not None:
                self._refuse(self._refusal)
                return
            super().send_400_response(msg)

        # -- parser callbacks

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._message_done = False
            self._in_headers = True
            # Keep a deadline already running (from connection_made); none while a
            # pipelined predecessor is still being answered.
            if self._timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm(self._headers_too_slow)

        def on_header(self, name: bytes, value: bytes) -> None:
            if len(self.headers) >= self.limits.max_headers:
                self._refusal = _response(431, b"Request Header Fields Too Large",
                                          f"The request has more than {self.limits.max_headers} headers.",
                                          "request_header_fields_too_large")
                raise ValueError("too many headers")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._header_bytes = 0
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._message_done = True
            self._in_headers = True  # what follows is the next request's headers
            if self._timer is not None and self.cycle is not None and self.cycle.response_complete:
                self._disarm()  # the linger is over: the body did arrive
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self._message_done and not self.transport.is_closing():
                self._arm(self._linger_over)


def serve_options(server_config: Any) -> dict[str, Any]:
    """uvicorn options that enforce the recipe's connection limits."""
    if HttpToolsProtocol is not None:
        return {"http": "asgi_llm._server:GatewayHttpProtocol"}
    limits = ConnectionLimits.of(server_config)  # pragma: no cover - h11 fallback: size only
    return {"http": "h11", "h11_max_incomplete_event_size": limits.max_header_bytes}


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the new soft limit.

    Every connection is a descriptor; the common default soft limit (1,024) is what
    half-sent requests exhausted before anything timed them out.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return int(soft)


def run_draining(gateway: Any, notice_s: float, **options: Any) -> None:
    """``uvicorn.run(gateway, **options)`` for one process, with a drain notice: the first
    SIGTERM makes ``/readyz`` answer 503 for ``notice_s`` seconds while requests are still
    served (a balancer health-checking ``/readyz`` stops sending new ones), then uvicorn's
    graceful shutdown starts: the listener closes, requests in flight finish (bounded by
    ``timeout_graceful_shutdown``), the lifespan shutdown flushes the writers. A second
    SIGTERM, or SIGINT, stops at once the usual way."""
    import signal
    import sys
    import threading

    import uvicorn

    from asgi_llm.endpoints import mark_draining

    class DrainingServer(uvicorn.Server):
        noticed = False

        def handle_exit(self, sig: int, frame: Any) -> None:
            if sig == signal.SIGTERM and notice_s > 0 and not self.noticed and not self.should_exit:
                self.noticed = True
                mark_draining(gateway)
                timer = threading.Timer(notice_s, uvicorn.Server.handle_exit, (self, sig, frame))
                timer.daemon = True
                timer.start()
                return
            super().handle_exit(sig, frame)

    server = DrainingServer(uvicorn.Config(gateway, **options))
    try:
        server.run()
    except KeyboardInterrupt:  # pragma: no cover - like uvicorn.run
        pass
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE
