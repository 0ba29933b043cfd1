"""Metrics, log binding and spans."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from starlette.types import Receive, Scope, Send

from asgi_llm.context import Attempt, Usage
from asgi_llm.errors import ServiceUnavailableError
from asgi_llm.middleware.context import ContextMiddleware, ensure_context
from asgi_llm.middleware.errors import ErrorMiddleware
from asgi_llm.middleware.usage import UsageMiddleware
from asgi_llm.observability import GatewayMetrics, ObservabilityMiddleware
from asgi_llm.routing.router import Target
from tests.harness import call

pytestmark = pytest.mark.anyio

BODY = {"model": "chat", "messages": [{"role": "user", "content": "hi there"}]}


def fake_dispatch(seen: dict[str, Any]) -> Any:
    """Records one successful attempt and the log context it ran in."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        ctx, _ = await ensure_context(scope, receive)
        seen["log"] = structlog.contextvars.get_contextvars()
        ctx.target = Target("provider-a", "gpt-4o-mini")
        a = Attempt(number=1, route=ctx.target.route, provider="provider-a", model="gpt-4o-mini", started_at=ctx.started_at,
                    status=200, outcome="ok", usage=Usage(prompt_tokens=7, completion_tokens=3), latency_s=0.02,
                    ttft_s=0.01, response_model="gpt-4o-mini-2024")
        ctx.attempt_log.append(a)
        ctx.attempts, ctx.usage = 1, a.usage
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def stack(metrics: GatewayMetrics, seen: dict[str, Any], tracer: Any = None) -> Any:
    rows: list[Any] = []
    seen["rows"] = rows
    inner = UsageMiddleware(fake_dispatch(seen), sink=rows.append, metrics=metrics, tracer=tracer)
    return ErrorMiddleware(ContextMiddleware(ObservabilityMiddleware(inner, metrics=metrics, tracer=tracer)))


class TestMetrics:
    async def test_metrics_endpoint_counts_requests_tokens_cost(self) -> None:
        """/metrics shows requests, tokens, latency per public model and target (own registry)."""
        m = GatewayMetrics()
        seen: dict[str, Any] = {}
        app = stack(m, seen)
        await call(app, body=BODY)
        rec = await call(app, method="GET", path="/metrics")
        text = rec.body.decode()
        assert rec.status == 200 and rec.headers["content-type"].startswith("text/plain")
        assert 'asgi_llm_requests_total{endpoint="chat",model="chat",status="200"} 1.0' in text
        assert 'asgi_llm_tokens_total{model="chat",target="provider-a/gpt-4o-mini",type="completion"} 3.0' in text
        assert 'asgi_llm_requests_in_flight{endpoint="chat"} 0.0' in text
        assert "asgi_llm_ttft_seconds_count" in text
        assert GatewayMetrics().render() != m.render()  # per-gateway registries

    def test_label_values_are_bounded(self) -> None:
        """Models outside the recipe are "unknown"; without a vocabulary, values are cut to
        MAX_LABEL_CHARS and the number of (endpoint, model) series is capped."""
        from asgi_llm.observability.metrics import MAX_LABEL_CHARS, MAX_SERIES_KEYS

        known = GatewayMetrics(models=["chat"])
        for i in range(50):
            known.record_request("chat", f"made-up-{i}", 404, 0.01, "model_not_found")
        known.record_request("chat", "chat", 200, 0.01, None)
        text = known.render().decode()
        assert "made-up" not in text
        assert 'asgi_llm_requests_total{endpoint="chat",model="unknown",status="404"} 50.0' in text
        assert 'asgi_llm_requests_total{endpoint="chat",model="chat",status="200"} 1.0' in text
        bare = GatewayMetrics()
        for i in range(MAX_SERIES_KEYS + 50):
            bare.record_request("chat", f"{i}-" + "q" * 5000, 404, 0.01, "x" * 5000)
        text = bare.render().decode()
        assert "q" * MAX_LABEL_CHARS not in text and "x" * MAX_LABEL_CHARS not in text
        assert text.count("asgi_llm_requests_total{") <= MAX_SERIES_KEYS + 1
        assert 'model="other"' in text

    async def test_log_context_bound_and_restored(self) -> None:
        """request_id/model/org are bound during the request; a host's own context survives."""
        m = GatewayMetrics()
        seen: dict[str, Any] = {}
        structlog.contextvars.bind_contextvars(host="mine")
        try:
            await call(stack(m, seen), body=BODY)
            assert seen["log"]["model"] == "chat" and seen["log"]["org"] == "default"
            assert seen["log"]["request_id"].startswith("req_") and seen["log"]["host"] == "mine"
            assert structlog.contextvars.get_contextvars() == {"host": "mine"}
        finally:
            structlog.contextvars.unbind_contextvars("host")


    async def test_log_binding_restores_a_hosts_value_of_the_same_key(self) -> None:
        """A host's own ``model`` binding is shadowed during the request and restored after it."""
        seen: dict[str, Any] = {}
        structlog.contextvars.bind_contextvars(model="host-model")
        try:
            await call(stack(GatewayMetrics(), seen), body=BODY)
            assert seen["log"]["model"] == "chat"
            assert structlog.contextvars.get_contextvars() == {"model": "host-model"}
        finally:
            structlog.contextvars.unbind_contextvars("model")

    async def test_labelled_children_are_reused_per_label_values(self) -> None:
        """Repeated requests add to the same series; another status or error code gets its own."""
        m = GatewayMetrics()
        app = stack(m, {})
        for _ in range(3):
            await call(app, body=BODY)

        async def unavailable(scope: Scope, receive: Receive, send: Send) -> None:
            raise ServiceUnavailableError("down")

        failing = ErrorMiddleware(ContextMiddleware(ObservabilityMiddleware(unavailable, metrics=m)))
        for _ in range(2):
            await call(failing, body=BODY)
        text = (await call(app, method="GET", path="/metrics")).body.decode()
        assert 'asgi_llm_requests_total{endpoint="chat",model="chat",status="200"} 3.0' in text
        assert 'asgi_llm_requests_total{endpoint="chat",model="chat",status="503"} 2.0' in text
        assert 'asgi_llm_request_errors_total{code="service_unavailable",endpoint="chat",model="chat"} 2.0' in text
        assert 'asgi_llm_attempts_total{model="chat",outcome="ok",target="provider-a/gpt-4o-mini"} 3.0' in text
        assert 'asgi_llm_request_duration_seconds_count{endpoint="chat",model="chat"} 5.0' in text
        assert 'asgi_llm_requests_in_flight{endpoint="chat"} 0.0' in text


class TestTracing:
    async def test_genai_spans(self) -> None:
        """One request span and one attempt span with GenAI attributes; none per chunk."""
        pytest.importorskip("opentelemetry.sdk")
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from asgi_llm.observability import GatewayTracer

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        seen: dict[str, Any] = {}
        await call(stack(GatewayMetrics(), seen, GatewayTracer(provider)), body=BODY)
        spans = {s.name: s for s in exporter.get_finished_spans()}
        assert set(spans) == {"chat chat", "chat gpt-4o-mini"}
        req, att = spans["chat chat"], spans["chat gpt-4o-mini"]
        assert att.parent is not None and att.parent.span_id == req.context.span_id
        assert req.attributes["gen_ai.request.model"] == "chat"
        assert req.attributes["gen_ai.response.model"] == "gpt-4o-mini-2024"
        assert att.attributes["gen_ai.usage.input_tokens"] == 7 and att.attributes["gen_ai.usage.output_tokens"] == 3
        assert att.attributes["gen_ai.system"] == "provider-a"
        provider.shutdown()


class TestBodyReadAfterAuth:
    async def test_model_reaches_metrics_span_and_log_when_read_late(self) -> None:
        """With auth in the stack the body is read inside it, after this layer started:
        the model still lands on the metrics, the request span and the request log line."""
        pytest.importorskip("opentelemetry.sdk")
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from asgi_llm.middleware.context import LoadBody
        from asgi_llm.observability import GatewayTracer

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        m, seen = GatewayMetrics(), {}
        inner = UsageMiddleware(fake_dispatch(seen), sink=[].append, metrics=m)
        obs = ObservabilityMiddleware(LoadBody(inner), metrics=m, tracer=GatewayTracer(provider), log_requests=True)
        with structlog.testing.capture_logs() as logs:
            await call(ErrorMiddleware(ContextMiddleware(obs, hold_body_for_auth=True)), body=BODY)
        assert [s.name for s in exporter.get_finished_spans() if s.name.startswith("chat ")][-1] == "chat chat"
        request_log = [e for e in logs if e.get("event") == "request"]
        assert request_log and request_log[-1]["model"] == "chat"
        assert 'asgi_llm_requests_total{endpoint="chat",model="chat",status="200"} 1.0' in m.render().decode()
        provider.shutdown()
