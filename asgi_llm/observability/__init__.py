"""Observability: structlog request binding, Prometheus metrics, OpenTelemetry spans.

* :mod:`~asgi_llm.observability.middleware` — :class:`ObservabilityMiddleware`: binds
  the request's log context, opens the request span, counts requests, serves ``/metrics``.
* :mod:`~asgi_llm.observability.metrics` — :class:`GatewayMetrics` (one registry per gateway).
* :mod:`~asgi_llm.observability.tracing` — lazy OpenTelemetry (the ``[otel]`` extra).
* :mod:`~asgi_llm.observability.semconv` — GenAI semantic-convention attribute names.
* :mod:`~asgi_llm.observability.logs` — :func:`configure_logging` (JSON lines).
"""

from __future__ import annotations

from asgi_llm.observability.logs import configure_logging
from asgi_llm.observability.metrics import GatewayMetrics
from asgi_llm.observability.middleware import ObservabilityMiddleware
from asgi_llm.observability.tracing import GatewayTracer

__all__ = ["GatewayMetrics", "GatewayTracer", "ObservabilityMiddleware", "configure_logging"]
