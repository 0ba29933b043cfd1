"""AuditMiddleware: one audit event per inference request and per admin action.

Who (org, actor key id), what (endpoint or ``METHOD /admin/path``, model, route), the
verdict and status, the number of attempts and the request id — never prompt content.
Verdicts: ``allowed``; ``failed_over`` (served, after more than one attempt);
``rate_limited`` (429 before any upstream attempt: the gateway's own limits);
``denied`` (401/403); ``aborted`` (the client went away); ``failed`` (any other error,
including a stream that broke after it started); ``error`` (an unexpected exception).

Events go to a synchronous sink (the audit ``BatchWriter``), which appends them to the
hash chain in batches. Admin handlers may describe what they did by setting
``ctx.audit_target`` (e.g. the key id created) and ``ctx.audit_detail``
(a small JSON object — never a secret).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_llm._asgi import ClientDisconnected
from asgi_llm.audit.chain import AuditEvent
from asgi_llm.context import RequestContext
from asgi_llm.errors import GatewayError
from asgi_llm.request import ensure_context


__all__ = ["AuditMiddleware", "verdict_for"]

log = logging.getLogger("asgi_llm.audit")


def verdict_for(ctx: RequestContext, status: int, *, raised: BaseException | None, started: bool) -> str:
    """The audit verdict of a finished request."""
    if isinstance(raised, ClientDisconnected) or ctx.client_disconnected:
        return "aborted"
    if raised is not None and not isinstance(raised, GatewayError):
        return "error"
    if raised is not None and started:
        return "failed"  # broke after the response started: a terminal error event
    if status == 429 and ctx.attempts == 0:
        return "rate_limited"
    if status in (401, 403):
        return "denied"
    if 0 < status < 400:
        return "failed_over" if ctx.attempts > 1 else "allowed"
    return "failed"


class AuditMiddleware:
    """Emit one :class:`~asgi_llm.audit.chain.AuditEvent` per audited request.

    Args:
        sink: takes one event, synchronously (``BatchWriter.put``).
        audit_nodes: also audit node API calls (enrollment, revocation; not heartbeats).
    """

    def __init__(self, app: ASGIApp, *, sink: Callable[[AuditEvent], None], audit_nodes: bool = True) -> None:
        self.app = app
        self.sink = sink
        self.audit_nodes = audit_nodes

    def _kind(self, ctx: RequestContext) -> str | None:
        if ctx.is_inference:
            return "inference"
        if ctx.endpoint == "admin":
            return "admin"
        if ctx.endpoint == "nodes" and self.audit_nodes and ctx.method != "GET" and not ctx.path.endswith("/heartbeat"):
            return "node"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx, receive = await ensure_context(scope, receive)
        kind = self._kind(ctx)
        if kind is None:
            await self.app(scope, receive, send)
            return
        status = 0
        raised: BaseException | None = None

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except BaseException as exc:
            raised = exc
            raise
        finally:
            try:
                self.sink(self._event(ctx, kind, status, raised))
            except Exception:  # pragma: no cover - auditing must never break a response
                log.exception("audit: could not record request %s", ctx.request_id)

    def _event(self, ctx: RequestContext, kind: str, status: int, raised: BaseException | None) -> AuditEvent:
        started = status != 0
        final = status
        if not started:
            if isinstance(raised, GatewayError):
                final = raised.status_code
            elif isinstance(raised, ClientDisconnected):
                final = 499
            elif raised is not None:
                final = 500
        verdict = verdict_for(ctx, final, raised=raised, started=started)
        detail: dict[str, Any] = {}
        if raised is not None:
            detail["error"] = getattr(raised, "code", None) or type(raised).__name__
        if kind == "inference":
            detail["cache"] = ctx.cache_status
            if ctx.attempt_log:
                detail["routes"] = [a.route for a in ctx.attempt_log]
        extra = ctx.audit_detail
        if isinstance(extra, dict):
            detail.update(extra)
        p = ctx.principal
        return AuditEvent(
            kind=kind, org=p.org, actor=p.key_id,
            action=ctx.endpoint if kind == "inference" else f"{ctx.method} {ctx.path}",
            verdict=verdict, status=final, request_id=ctx.request_id,
            target=ctx.audit_target, model=ctx.model,
            route=ctx.target.route if ctx.target is not None else None, attempts=ctx.attempts,
            detail=detail or None,
        )
