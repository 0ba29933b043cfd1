"""OpenTelemetry spans with the GenAI semantic conventions (optional ``[otel]`` extra).

One span per request (``{operation} {model}``, e.g. ``chat gpt-4o-mini``) opened by
:class:`~asgi_llm.observability.middleware.ObservabilityMiddleware`, and one child span
per upstream attempt, added by the usage layer when the attempt is known in full (with
its real start and end times). Never a span per SSE chunk. ``opentelemetry`` is imported
only when tracing is enabled.

:func:`configure_tracing` is what ``asgi-llm serve`` calls for ``observability.otel``: it
installs an SDK ``TracerProvider`` with a batching OTLP/HTTP (or console) exporter as the
global provider. A gateway mounted in another app never calls it: its spans go to the
host's provider.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from asgi_llm.observability import semconv as sc

if TYPE_CHECKING:
    from asgi_llm.context import RequestContext
    from asgi_llm.usage.records import LedgerRow

__all__ = ["GatewayTracer", "TracingFlush", "configure_tracing"]


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


def configure_tracing(otel: Any, environ: Any = None) -> Any:
    """Set up the OpenTelemetry SDK for ``asgi-llm serve`` from ``observability.otel``.

    ``otel`` is ``False`` (nothing is done; returns ``None``), ``True`` (everything from
    the standard ``OTEL_*`` environment variables) or an
    :class:`~asgi_llm.config.OtelConfig` (its options win over the environment).
    Returns the ``TracerProvider`` installed as the global one (its ``shutdown()``
    flushes the exporter), or ``None`` for ``exporter: none``.

    Raises ``ImportError`` with a hint when the ``[otel]`` extra is missing.
    """
    if not otel:
        return None
    env = os.environ if environ is None else environ
    options = otel if not isinstance(otel, bool) else None
    exporter_name = (getattr(options, "exporter", None) or env.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower()
    if exporter_name == "none":
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("observability.otel needs the [otel] extra: pip install 'asgi-llm[otel]'") from exc
    service = getattr(options, "service_name", None) or env.get("OTEL_SERVICE_NAME") or "asgi-llm"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter_name == "console":
        exporter: Any = ConsoleSpanExporter()
    elif exporter_name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the OTLP exporter needs the [otel] extra: pip install 'asgi-llm[otel]'") from exc
        kwargs: dict[str, Any] = {}
        if getattr(options, "endpoint", None):
            kwargs["endpoint"] = options.endpoint  # the full traces URL; else OTEL_EXPORTER_OTLP_* apply
        if getattr(options, "headers", None):
            kwargs["headers"] = dict(options.headers)
        exporter = OTLPSpanExporter(**kwargs)
    else:
        raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported here: use otlp, console or none")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


class TracingFlush:
    """A gateway resource that shuts the tracer provider down (exporting what is queued)
    at the gateway's shutdown: ``asgi-llm serve`` ends by re-raising SIGTERM, which would
    skip the SDK's ``atexit`` flush. Insert it first, so it closes last."""

    def __init__(self, provider: Any, timeout_s: float = 5.0) -> None:
        self.provider = provider
        self.timeout_s = timeout_s

    async def start(self, task_group: Any) -> None:
        """Nothing to open."""

    async def aclose(self) -> None:
        """Export the spans still queued (bounded), then stop the exporter, off the event loop."""
        import anyio.to_thread

        def _flush() -> None:
            self.provider.force_flush(int(self.timeout_s * 1000))
            self.provider.shutdown()

        with contextlib.suppress(Exception):  # telemetry never fails a shutdown
            await anyio.to_thread.run_sync(_flush, abandon_on_cancel=True)
