"""OpenTelemetry spans with the GenAI semantic conventions (optional ``[otel]`` extra).

One span per request (``{operation} {model}``, e.g. ``chat gpt-4o-mini``) opened by
:class:`~asgi_llm.observability.middleware.ObservabilityMiddleware`, and one child span
per upstream attempt, added by the usage layer when the attempt is known in full (with
its real start and end times). Never a span per SSE chunk. ``opentelemetry`` is imported
only when tracing is enabled.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from asgi_llm.observability import semconv as sc

if TYPE_CHECKING:
    from asgi_llm.context import RequestContext
    from asgi_llm.usage.records import LedgerRow

__all__ = ["GatewayTracer"]


class GatewayTracer:
    """Creates the gateway's spans.

    Args:
        tracer_provider: an OpenTelemetry ``TracerProvider`` (default: the global one).

    Raises ``ImportError`` with a hint when ``opentelemetry-api`` is not installed.
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        try:
            from opentelemetry import trace
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("OpenTelemetry tracing needs the [otel] extra: pip install 'asgi-llm[otel]'") from exc
        self._trace = trace
        self.tracer = trace.get_tracer("asgi_llm", tracer_provider=tracer_provider)

    @contextlib.contextmanager
    def request_span(self, ctx: RequestContext) -> Iterator[Any]:
        """The request's span, current while the request runs."""
        op = sc.OPERATIONS.get(ctx.endpoint, ctx.endpoint)
        name = f"{op} {ctx.model}" if ctx.model else op
        attrs: dict[str, Any] = {sc.GEN_AI_OPERATION_NAME: op, sc.ASGI_LLM_REQUEST_ID: ctx.request_id}
        if ctx.model:
            attrs[sc.GEN_AI_REQUEST_MODEL] = ctx.model
        for key, field in ((sc.GEN_AI_REQUEST_MAX_TOKENS, "max_tokens"), (sc.GEN_AI_REQUEST_TEMPERATURE, "temperature")):
            value = ctx.payload.get(field)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attrs[key] = value
        with self.tracer.start_as_current_span(name, kind=self._trace.SpanKind.SERVER, attributes=attrs,
                                               record_exception=False, set_status_on_exception=False) as span:
            yield span

    def finish_request(self, span: Any, ctx: RequestContext, status: int, error: str | None) -> None:
        """Final attributes of the request span."""
        span.set_attribute(sc.HTTP_RESPONSE_STATUS_CODE, status)
        if ctx.model:
            # With auth on, the body (and so the model) is read after the span started.
            span.set_attribute(sc.GEN_AI_REQUEST_MODEL, ctx.model)
            span.update_name(f"{sc.OPERATIONS.get(ctx.endpoint, ctx.endpoint)} {ctx.model}")
        span.set_attribute(sc.ASGI_LLM_ORG, ctx.principal.org)
        span.set_attribute(sc.ASGI_LLM_ATTEMPTS, ctx.attempts)
        span.set_attribute(sc.ASGI_LLM_CACHE, ctx.cache_status)
        if ctx.target is not None:
            span.set_attribute(sc.ASGI_LLM_ROUTE, ctx.target.route)
            span.set_attribute(sc.GEN_AI_PROVIDER_NAME, ctx.target.provider)
            span.set_attribute(sc.GEN_AI_SYSTEM, ctx.target.provider)
        if ctx.usage is not None:
            span.set_attribute(sc.GEN_AI_USAGE_INPUT_TOKENS, ctx.usage.prompt_tokens)
            span.set_attribute(sc.GEN_AI_USAGE_OUTPUT_TOKENS, ctx.usage.completion_tokens)
        if ctx.attempt_log and ctx.attempt_log[-1].response_model:
            span.set_attribute(sc.GEN_AI_RESPONSE_MODEL, ctx.attempt_log[-1].response_model)
        if error is not None:
            span.set_attribute(sc.ERROR_TYPE, error)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))

    def attempt_span(self, ctx: RequestContext, row: LedgerRow, started_perf: float) -> None:
        """One child span for a finished attempt, with its real start and end times."""
        now_ns, now_perf = time.time_ns(), time.perf_counter()
        start_ns = now_ns - int((now_perf - started_perf) * 1e9)
        end_ns = start_ns + int(row.latency_ms * 1e6)
        op = sc.OPERATIONS.get(ctx.endpoint, ctx.endpoint)
        attrs: dict[str, Any] = {
            sc.GEN_AI_OPERATION_NAME: op, sc.GEN_AI_REQUEST_MODEL: row.upstream_model,
            sc.GEN_AI_SYSTEM: row.provider, sc.GEN_AI_PROVIDER_NAME: row.provider,
            sc.GEN_AI_USAGE_INPUT_TOKENS: row.prompt_tokens, sc.GEN_AI_USAGE_OUTPUT_TOKENS: row.completion_tokens,
            sc.ASGI_LLM_ROUTE: row.route, sc.ASGI_LLM_ATTEMPT: row.attempt, sc.ASGI_LLM_OUTCOME: row.outcome,
            sc.ASGI_LLM_COST_USD: float(row.cost_usd), sc.HTTP_RESPONSE_STATUS_CODE: row.status,
        }
        if row.response_model:
            attrs[sc.GEN_AI_RESPONSE_MODEL] = row.response_model
        if row.ttft_ms is not None:
            attrs[sc.ASGI_LLM_TTFT_S] = row.ttft_ms / 1000
        span = self.tracer.start_span(f"{op} {row.upstream_model}", kind=self._trace.SpanKind.CLIENT,
                                      attributes=attrs, start_time=start_ns)
        if row.outcome != "ok":
            span.set_attribute(sc.ERROR_TYPE, row.error_code or row.outcome)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, row.error_code or row.outcome))
        span.end(end_time=end_ns)
