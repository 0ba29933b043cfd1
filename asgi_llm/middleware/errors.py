"""ErrorMiddleware: every failure leaves as OpenAI's error shape.

Outermost layer. Before the response has started, a :class:`GatewayError` becomes an
HTTP error response with the gateway's headers (``x-request-id``, rate-limit headers
other layers put on the context). After an SSE stream has started it becomes one
terminal ``data: {"error": {...}}`` event and the stream is closed — a truncated answer
is never made to look like a finished one. Any other exception is reported as a 500 in
the same shape, logged, and re-raised so the server sees it too.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_llm._asgi import JSON_HEADERS, ClientDisconnected, send_bytes
from asgi_llm._sse import encode_json
from asgi_llm.context import gateway_headers, get_context
from asgi_llm.errors import GatewayError, InvalidRequestError

__all__ = ["ErrorMiddleware"]

logger = logging.getLogger("asgi_llm")


class ErrorMiddleware:
    """Turn exceptions into OpenAI-shaped error responses (or a terminal SSE event)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = _ResponseState(send)
        try:
            await self.app(scope, receive, state.send)
        except (ClientDisconnected, ClientDisconnect):
            return
        except Exception as exc:  # noqa: BLE001 - this layer exists to catch everything
            if _only_disconnects(exc):  # Starlette's, from Request.body() in a route, maybe in a group
                logger.debug("client disconnected mid-request: %s %s", scope.get("method"), scope.get("path"))
                return
            error = _find_gateway_error(exc)
            if error is None:
                logger.exception("unhandled error in the gateway pipeline")
                error = GatewayError("The gateway hit an internal error; it has been logged.", code="internal_error")
            try:
                await state.report(scope, error)
            except OSError:
                pass  # the client is gone (some servers raise on send after a disconnect)
            if _find_gateway_error(exc) is None:
                raise


class _ResponseState:
    """What has been sent so far, so an error can be reported the right way."""

    __slots__ = ("_send", "started", "finished", "sse")

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.finished = False
        self.sse = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            for k, v in message.get("headers", ()):
                if k == b"content-type" and v.startswith(b"text/event-stream"):
                    self.sse = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)

    async def report(self, scope: Scope, error: GatewayError) -> None:
        if self.finished:
            return
        if not self.started:
            ctx = get_context(scope)
            headers = [*JSON_HEADERS, *(gateway_headers(ctx) if ctx is not None else ())]
            headers.extend((k.lower().encode(), v.encode()) for k, v in error.headers.items())
            await send_bytes(self._send, error.status_code, error.to_json(), headers)
        elif self.sse:
            await self._send({"type": "http.response.body", "body": encode_json(error.to_dict()), "more_body": False})
        else:
            # A non-stream body was half sent: nothing valid can follow. Closing
            # without the rest makes the client see a broken response, not a success.
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        self.finished = True


def _only_disconnects(exc: BaseException) -> bool:
    """Is ``exc`` a client hang-up (ours or Starlette's), alone or as every member of a group?"""
    if isinstance(exc, ClientDisconnected | ClientDisconnect):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_disconnects(sub) for sub in exc.exceptions)
    return False


def _find_gateway_error(exc: BaseException) -> GatewayError | None:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, StarletteHTTPException):  # from admin/node routes (e.g. wrong method)
        err = InvalidRequestError(
            exc.detail if isinstance(exc.detail, str) else "HTTP error",
            status_code=exc.status_code,
            code="method_not_allowed" if exc.status_code == 405 else None,
            headers=dict(exc.headers or {}),
        )
        return err
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _find_gateway_error(sub)
            if found is not None:
                return found
    return None
