"""ErrorMiddleware: errors before the start, after an SSE start, and unexpected ones."""

from __future__ import annotations

import json

import pytest
from starlette.types import Receive, Scope, Send

from asgi_llm._asgi import SSE_HEADERS
from asgi_llm.errors import RateLimitError, UpstreamProtocolError
from asgi_llm.context import get_context
from asgi_llm.middleware.errors import ErrorMiddleware
from tests.harness import call

pytestmark = pytest.mark.anyio


class TestErrorMiddleware:
    async def test_gateway_error_before_start(self) -> None:
        """A GatewayError raised before the response starts becomes an OpenAI-shaped response with its headers."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            raise RateLimitError("slow down", headers={"Retry-After": "3"})

        rec = await call(ErrorMiddleware(app))
        assert rec.status == 429
        assert rec.headers["retry-after"] == "3"
        assert rec.json()["error"]["type"] == "rate_limit_error"
        assert rec.starts == 1 and rec.complete

    async def test_error_after_sse_start_is_terminal_event(self) -> None:
        """After an SSE stream started, an error becomes one terminal data event and the stream closes."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": b'data: {"x":1}\n\n', "more_body": True})
            raise UpstreamProtocolError("cut")

        rec = await call(ErrorMiddleware(app))
        assert rec.starts == 1 and rec.complete
        data = rec.sse_data()
        assert json.loads(data[0]) == {"x": 1}
        assert json.loads(data[-1])["error"]["code"] == "bad_upstream_response"
        assert "[DONE]" not in data

    async def test_unexpected_exception_is_500_and_reraised(self, caplog: pytest.LogCaptureFixture) -> None:
        """A bug gives the client a 500 in OpenAI's shape (no traceback) and is re-raised and logged."""
        sent = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            raise KeyError("secret-internal-detail")

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
        with pytest.raises(KeyError):
            await ErrorMiddleware(app)(scope, receive, send)
        assert sent[0]["status"] == 500
        body = json.loads(sent[1]["body"])
        assert body["error"]["code"] == "internal_error"
        assert "secret-internal-detail" not in sent[1]["body"].decode()
        assert "unhandled error" in caplog.text

    async def test_exception_group_unwrapped(self) -> None:
        """A GatewayError inside an exception group (task groups) is still reported properly."""

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            raise ExceptionGroup("tg", [RateLimitError("x")])

        rec = await call(ErrorMiddleware(app))
        assert rec.status == 429


class TestStarletteRoutes:
    async def test_wrong_method_on_admin_route_is_openai_shaped(self) -> None:
        """A wrong method on a registered admin route is a 405 in OpenAI's shape (not plain text)."""
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        from asgi_llm.admin import AdminApp
        from asgi_llm.context import Principal
        from asgi_llm.middleware.context import ContextMiddleware

        async def handler(request: object) -> JSONResponse:
            return JSONResponse({})

        admin = AdminApp(admin_routes=[Route("/admin/things", handler, methods=["GET"])])

        async def as_admin(scope: Scope, receive: Receive, send: Send) -> None:
            get_context(scope).principal = Principal(key_id="a", org="*", scopes=frozenset({"admin"}))
            await admin(scope, receive, send)

        rec = await call(ErrorMiddleware(ContextMiddleware(as_admin)), method="DELETE", path="/admin/things")
        assert rec.status == 405
        assert rec.json()["error"]["code"] == "method_not_allowed"
        assert "GET" in rec.headers.get("allow", "")
