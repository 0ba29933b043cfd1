"""ObservabilityMiddleware: log context, request span, request metrics, ``GET /metrics``.

It sits right inside ``ContextMiddleware`` (outside audit, auth and quota), so it sees
every request's final status — rate-limited and denied ones included — and serves
``/metrics`` without an API key, as Prometheus scrapers expect (restrict it at the
network edge if needed). Per-attempt metrics (tokens, cost, TTFT) and attempt spans are
recorded by the usage layer, which knows the attempts.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_llm._asgi import ClientDisconnected
from asgi_llm.errors import GatewayError
from asgi_llm.request import ensure_context
from asgi_llm.observability import logs
from asgi_llm.observability.logs import LogBinding
from asgi_llm.observability.metrics import CONTENT_TYPE, GatewayMetrics
from asgi_llm.observability.tracing import GatewayTracer

__all__ = ["ObservabilityMiddleware"]


class ObservabilityMiddleware:
    """Bind logs, open the request span, count the request; serve ``metrics_path``.

    Args:
        metrics: the gateway's metrics (``None``: no metrics and no ``/metrics``).
        tracer: spans (``None``: no tracing).
        log_requests: emit one structlog ``request`` event per request.
    """

    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics | None = None, tracer: GatewayTracer | None = None,
                 log_requests: bool = False, metrics_path: str = "/metrics") -> None:
        self.app = app
        self.metrics = metrics
        self.tracer = tracer
        self.log_requests = log_requests
        self.metrics_path = metrics_path
        self._binding = LogBinding("request_id", "endpoint", "model")
        self._log: Any = None
        if log_requests:
            import structlog

            self._log = structlog.get_logger("asgi_llm")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx, receive = await ensure_context(scope, receive)
        if self.metrics is not None and ctx.endpoint == "other" and ctx.path == self.metrics_path \
                and scope["method"] in ("GET", "HEAD"):
            body = self.metrics.render()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode()),
                                    (b"x-request-id", ctx.request_id.encode())]})
            await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})
            return
        tokens = self._binding.bind(ctx.request_id, ctx.endpoint, ctx.model)
        status = 0
        error: str | None = None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        m = self.metrics
        inference = ctx.is_inference
        in_flight = m.in_flight_child(ctx.endpoint) if m is not None and inference else None
        if in_flight is not None:
            in_flight.inc()
        t0 = time.perf_counter()
        span_cm = self.tracer.request_span(ctx) if self.tracer is not None and inference else None
        span = span_cm.__enter__() if span_cm is not None else None
        try:
            await self.app(scope, receive, send_status)
        except ClientDisconnected:
            status, error = 499, "client_disconnected"
            raise
        except GatewayError as exc:
            status, error = status or exc.status_code, exc.code or exc.type
            raise
        except BaseException as exc:
            status, error = status or 500, type(exc).__name__
            raise
        finally:
            elapsed = time.perf_counter() - t0
            if error is None and status >= 400:
                error = str(status)
            if in_flight is not None:
                in_flight.dec()
            if m is not None and inference:
                m.record_request(ctx.endpoint, ctx.model or "", status, elapsed, error)
            if span_cm is not None:
                self.tracer.finish_request(span, ctx, status, error)  # type: ignore[union-attr]
                span_cm.__exit__(None, None, None)
            if self._log is not None:
                # model passed explicitly: with auth on, the body (and so the model) is read
                # only after this layer bound its log context.
                self._log.info("request", status=status, model=ctx.model, org=ctx.principal.org,
                               route=ctx.target.route if ctx.target else None, attempts=ctx.attempts,
                               cache=ctx.cache_status, duration_ms=round(elapsed * 1000, 2), error=error,
                               prompt_tokens=ctx.usage.prompt_tokens if ctx.usage else None,
                               completion_tokens=ctx.usage.completion_tokens if ctx.usage else None)
            self._binding.unbind(tokens)
