"""AuditMiddleware: one event per inference and admin request, with the right verdict."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from asgi_llm.audit.chain import AuditEvent
from asgi_llm.context import Principal, RequestContext
from asgi_llm.errors import AuthenticationError, RateLimitError, UpstreamError
from asgi_llm.middleware.audit import AuditMiddleware, verdict_for
from asgi_llm.middleware.context import ContextMiddleware, ensure_context
from asgi_llm.middleware.errors import ErrorMiddleware
from tests.harness import call

pytestmark = pytest.mark.anyio

BODY = {"model": "chat", "messages": [{"role": "user", "content": "secret prompt"}]}


def app_raising(exc: Exception | None, *, attempts: int = 0) -> Any:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        ctx, _ = await ensure_context(scope, receive)
        ctx.principal = Principal(key_id="k1", org="acme")
        ctx.attempts = attempts
        if exc is not None:
            raise exc
        ctx.audit_target = "key_123"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return inner


async def run(exc: Exception | None, *, path: str = "/v1/chat/completions", method: str = "POST",
              attempts: int = 1) -> AuditEvent:
    events: list[AuditEvent] = []
    gw = ErrorMiddleware(ContextMiddleware(AuditMiddleware(app_raising(exc, attempts=attempts), sink=events.append)))
    await call(gw, method=method, path=path, body=BODY if method == "POST" else b"")
    (event,) = events
    return event


class TestVerdicts:
    async def test_allowed(self) -> None:
        """A served request is 'allowed', with who, what and where — and no prompt content."""
        e = await run(None)
        assert (e.kind, e.verdict, e.status, e.org, e.actor, e.model, e.action) == \
            ("inference", "allowed", 200, "acme", "k1", "chat", "chat")
        assert "secret" not in e.to_json()

    async def test_failed_over(self) -> None:
        """Served after more than one attempt: 'failed_over'."""
        assert (await run(None, attempts=2)).verdict == "failed_over"

    async def test_rate_limited(self) -> None:
        """The gateway's own 429 (no attempt made): 'rate_limited'."""
        e = await run(RateLimitError("slow down"), attempts=0)
        assert (e.verdict, e.status) == ("rate_limited", 429)

    async def test_denied(self) -> None:
        """401/403: 'denied'."""
        assert (await run(AuthenticationError("no"), attempts=0)).verdict == "denied"

    async def test_upstream_failure(self) -> None:
        """An upstream error: 'failed'."""
        e = await run(UpstreamError("boom"))
        assert (e.verdict, e.status) == ("failed", 502)

    async def test_unexpected_exception(self) -> None:
        """A bug: 'error', status 500."""
        events: list[AuditEvent] = []
        gw = ErrorMiddleware(ContextMiddleware(AuditMiddleware(app_raising(RuntimeError("bug")), sink=events.append)))
        with pytest.raises(RuntimeError):  # the error layer re-raises after answering 500
            await call(gw, body=BODY)
        assert [(e.verdict, e.status) for e in events] == [("error", 500)]

    async def test_admin_action(self) -> None:
        """Admin calls are audited as METHOD /path with the target a handler names."""
        e = await run(None, path="/admin/keys", attempts=0)
        assert (e.kind, e.action, e.target) == ("admin", "POST /admin/keys", "key_123")

    async def test_other_paths_not_audited(self) -> None:
        """Health checks produce no event."""
        events: list[AuditEvent] = []
        gw = ContextMiddleware(AuditMiddleware(app_raising(None), sink=events.append))
        await call(gw, method="GET", path="/healthz")
        assert events == []


def test_verdict_stream_broken_after_start() -> None:
    """A stream that broke after its start is 'failed', not 'allowed'."""
    ctx = RequestContext(request_id="r", endpoint="chat")
    ctx.attempts = 1
    assert verdict_for(ctx, 200, raised=UpstreamError("cut"), started=True) == "failed"
