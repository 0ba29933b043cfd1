"""Prometheus metrics, one :class:`CollectorRegistry` per gateway (tests build many).

Per public model (``model``) and per target (``target`` = route):

* ``asgi_llm_requests_total{endpoint,model,status}``, ``asgi_llm_request_errors_total{endpoint,model,code}``
* ``asgi_llm_requests_in_flight{endpoint}``
* ``asgi_llm_request_duration_seconds{endpoint,model}`` (histogram)
* ``asgi_llm_attempts_total{model,target,outcome}``
* ``asgi_llm_tokens_total{model,target,type}`` (type: prompt, completion, cached, reasoning)
* ``asgi_llm_cost_usd_total{model,target}``, ``asgi_llm_cache_hits_total{model}``,
  ``asgi_llm_cache_saved_usd_total{model}``
* ``asgi_llm_attempt_duration_seconds{model,target}``, ``asgi_llm_ttft_seconds{model,target}`` (histograms)
* ``asgi_llm_writer_backlog{writer}``, ``asgi_llm_writer_spilled_total{writer}``,
  ``asgi_llm_writer_failures_total{writer}`` (the ledger/audit batch writers),
  ``asgi_llm_quarantined_rows_total{writer}`` (rows the database refused, set aside:
  see ``GET /admin/quarantine``)

Label values come from the gateway's own vocabulary, never from a client: a ``model`` the
recipe does not define is counted as ``"unknown"`` (a 404 with a 10 kB made-up name must
not add a series), every label value is cut to :data:`MAX_LABEL_CHARS`, and each metric
keeps at most :data:`MAX_SERIES_KEYS` (model, target) pairs — later ones count under
``"other"`` — so ``/metrics`` stays small whatever the traffic.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asgi_llm.usage.records import LedgerRow
    from asgi_llm.usage.writer import BatchWriter

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_LABEL_CHARS = 128
MAX_SERIES_KEYS = 2000
UNKNOWN = "unknown"
OTHER = "other"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """The gateway's metrics (needs ``prometheus-client``).

    Args:
        models: the recipe's public model names; any other ``model`` is labelled
            ``"unknown"`` (``None``: names are only bounded in length and number).
    """

    def __init__(self, models: Iterable[str] | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("asgi_llm_requests", "Requests by endpoint, public model and status.",
                                ["endpoint", "model", "status"], registry=r)
        self.errors = Counter("asgi_llm_request_errors", "Failed requests by error code.",
                              ["endpoint", "model", "code"], registry=r)
        self.in_flight = Gauge("asgi_llm_requests_in_flight", "Requests being served.", ["endpoint"], registry=r)
        self.duration = Histogram("asgi_llm_request_duration_seconds", "Whole-request latency.",
                                  ["endpoint", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.attempts = Counter("asgi_llm_attempts", "Upstream attempts by outcome.",
                                ["model", "target", "outcome"], registry=r)
        self.tokens = Counter("asgi_llm_tokens", "Tokens by type.", ["model", "target", "type"], registry=r)
        self.cost = Counter("asgi_llm_cost_usd", "Cost in USD.", ["model", "target"], registry=r)
        self.cache_hits = Counter("asgi_llm_cache_hits", "Responses served from the cache.", ["model"], registry=r)
        self.cache_saved = Counter("asgi_llm_cache_saved_usd", "Cost avoided by cache hits, USD.", ["model"], registry=r)
        self.attempt_duration = Histogram("asgi_llm_attempt_duration_seconds", "Per-attempt latency.",
                                          ["model", "target"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("asgi_llm_ttft_seconds", "Time to first token (streams).",
                              ["model", "target"], buckets=_LATENCY_BUCKETS, registry=r)
        self._writers: list[BatchWriter[Any]] = []
        # Resolving labels costs a lock and a tuple hash per call, several times a
        # request; the label values are few (endpoints, public models, the recipe's
        # targets and enrolled nodes, statuses, error codes) and prometheus keeps every
        # child anyway, so each labelled child is resolved once and kept here.
        self._in_flight: dict[str, Any] = {}
        self._request_children: dict[tuple[str, str], _RequestChildren] = {}
        self._route_children: dict[tuple[str, str], _RouteChildren] = {}
        self._models = None if models is None else frozenset(models)
        r.register(_WriterCollector(self._writers))

    def watch_writer(self, writer: BatchWriter[Any]) -> None:
        """Export a batch writer's backlog, spills, failures and quarantined rows."""
        self._writers.append(writer)

    def in_flight_child(self, endpoint: str) -> Any:
        """``requests_in_flight{endpoint}``: :meth:`inc` it when a request starts, ``dec`` when it ends."""
        child = self._in_flight.get(endpoint)
        if child is None:
            child = self._in_flight[endpoint] = self.in_flight.labels(endpoint)
        return child

    def record_request(self, endpoint: str, model: str, status: int, elapsed_s: float, error: str | None) -> None:
        """Count one finished request: its status, its duration and its error (if any).
        ``model`` is the client's word: labelled only if the recipe defines it."""
        c = self._request_children.get((endpoint, model))
        if c is None:
            endpoint, model = _bounded(endpoint), self.model_label(model)
            if len(self._request_children) >= MAX_SERIES_KEYS:
                model = OTHER
            c = self._request_children.get((endpoint, model))
        if c is None:
            c = self._request_children[(endpoint, model)] = _RequestChildren(
                self.duration.labels(endpoint, model))
        if len(c.by_status) >= 100 and status not in c.by_status:
            status = 0  # statuses are the gateway's own; bounded all the same
        requests = c.by_status.get(status)
        if requests is None:
            requests = c.by_status[status] = self.requests.labels(endpoint, model, str(status))
        requests.inc()
        c.duration.observe(elapsed_s)
        if error is not None:
            errors = c.by_error.get(error)
            if errors is None:
                error = _bounded(error) if len(c.by_error) < 100 else OTHER
                errors = c.by_error.get(error)
            if errors is None:
                errors = c.by_error[error] = self.errors.labels(endpoint, model, error)
            errors.inc()

    def record_row(self, row: LedgerRow) -> None:
        """Count one ledger row (one attempt or cache hit)."""
        if row.outcome == "cache_hit":
            model = self.model_label(row.model)
            self.cache_hits.labels(model).inc()
            self.cache_saved.labels(model).inc(float(row.saved_usd))
            return
        c = self._route_children.get((row.model, row.route))
        if c is None:
            key = (self.model_label(row.model), _bounded(row.route))
            if len(self._route_children) >= MAX_SERIES_KEYS:
                key = (OTHER, OTHER)
            c = self._route_children.get(key)
            if c is None:
                c = self._route_children[key] = self._new_route_children(*key)
        outcome = c.by_outcome.get(row.outcome)
        if outcome is None:
            outcome = c.by_outcome[row.outcome] = self.attempts.labels(
                c.model, c.route, _bounded(row.outcome) if len(c.by_outcome) < 32 else OTHER)
        outcome.inc()
        if row.prompt_tokens:
            c.prompt.inc(row.prompt_tokens)
        if row.completion_tokens:
            c.completion.inc(row.completion_tokens)
        if row.cached_tokens:
            c.cached.inc(row.cached_tokens)
        if row.reasoning_tokens:
            c.reasoning.inc(row.reasoning_tokens)
        if row.cost_usd:
            c.cost.inc(float(row.cost_usd))
        c.duration.observe(row.latency_ms / 1000)
        if row.ttft_ms is not None:
            c.ttft.observe(row.ttft_ms / 1000)

    def model_label(self, model: str) -> str:
        """``model`` as a label value: a recipe model, ``""`` (none given) or ``"unknown"``."""
        if not model:
            return ""
        if self._models is not None:
            return model if model in self._models else UNKNOWN
        return _bounded(model)

    def _new_route_children(self, model: str, route: str) -> _RouteChildren:
        return _RouteChildren(model, route,
            *(self.tokens.labels(model, route, kind) for kind in ("prompt", "completion", "cached", "reasoning")),
            cost=self.cost.labels(model, route), duration=self.attempt_duration.labels(model, route),
            ttft=self.ttft.labels(model, route),
        )

    def render(self) -> bytes:
        """The text exposition format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _bounded(value: str) -> str:
    return value if len(value) <= MAX_LABEL_CHARS else value[:MAX_LABEL_CHARS - 1] + "…"


class _RequestChildren:
    """One (endpoint, public model)'s request metrics, by status and error code."""

    __slots__ = ("by_error", "by_status", "duration")

    def __init__(self, duration: Any) -> None:
        self.duration = duration
        self.by_status: dict[int, Any] = {}
        self.by_error: dict[str, Any] = {}


class _RouteChildren:
    """One (public model, target)'s attempt metrics."""

    __slots__ = ("by_outcome", "cached", "completion", "cost", "duration", "model", "prompt", "reasoning", "route",
                 "ttft")

    def __init__(self, model: str, route: str, prompt: Any, completion: Any, cached: Any, reasoning: Any, *,
                 cost: Any, duration: Any, ttft: Any) -> None:
        self.model, self.route = model, route
        self.prompt, self.completion, self.cached, self.reasoning = prompt, completion, cached, reasoning
        self.cost, self.duration, self.ttft = cost, duration, ttft
        self.by_outcome: dict[str, Any] = {}


class _WriterCollector:
    def __init__(self, writers: list[BatchWriter[Any]]) -> None:
        self.writers = writers

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        backlog = GaugeMetricFamily("asgi_llm_writer_backlog", "Rows waiting in memory.", labels=["writer"])
        spilled = CounterMetricFamily("asgi_llm_writer_spilled", "Rows spilled to disk.", labels=["writer"])
        failures = CounterMetricFamily("asgi_llm_writer_failures", "Failed batch writes (retried).", labels=["writer"])
        quarantined = CounterMetricFamily("asgi_llm_quarantined_rows",
                                          "Rows the database refused, quarantined instead of retried.", labels=["writer"])
        for w in self.writers:
            backlog.add_metric([w.name], w.backlog)
            spilled.add_metric([w.name], w.stats["spilled"])
            failures.add_metric([w.name], w.stats["failures"])
            quarantined.add_metric([w.name], w.stats.get("quarantined", 0))
        yield backlog
        yield spilled
        yield failures
        yield quarantined
