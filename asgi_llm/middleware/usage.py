"""UsageMiddleware: one ledger row per attempt — failed and aborted ones too.

After the inner app returns *or raises* (success, gateway error, client disconnect,
cancellation), it turns every entry of ``ctx.attempt_log`` into a
:class:`~asgi_llm.usage.records.LedgerRow` and hands it to a synchronous sink (the
:class:`~asgi_llm.usage.writer.BatchWriter`): nothing is awaited, the response is never
held up by metering. A cache hit (no attempt, ``ctx.cache_status == "HIT"``) is one row
with cost 0 and ``saved_usd`` = what the cached answer would have cost.

Tokens and cost: :meth:`~asgi_llm.usage.accounting.Accountant.charges` — the upstream's
reported usage (plausibility-checked when it was recorded) or, for a stream cut or
abandoned before its usage chunk, the content relayed and a prompt heuristic, flagged
``estimated``; priced from the recipe, ``usage.prices``, genai-prices. The quota layer
settles the very same charges, so budgets and the ledger agree to the pico-dollar.
``ctx.cost`` is set to the request's total.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_llm.context import RequestContext
from asgi_llm.request import ensure_context
from asgi_llm.observability.logs import LogBinding
from asgi_llm.usage.accounting import Accountant, Charge, PromptEstimator, Pricer, Seen, count_content_pieces, estimate_prompt_chars
from asgi_llm.usage.records import LedgerRow

if TYPE_CHECKING:
    from asgi_llm.observability.metrics import GatewayMetrics
    from asgi_llm.observability.tracing import GatewayTracer
    from asgi_llm.routing.router import Router
    from asgi_llm.targets import Target

__all__ = ["UsageMiddleware", "prompt_hash"]

log = logging.getLogger("asgi_llm.usage")
_PROMPT_TEXT_MAX = 4000
# json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False), without
# building an encoder per call.
_PROMPT_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _prompt_json(payload: dict[str, Any]) -> str | None:
    for name in ("messages", "prompt", "input"):
        if name in payload:
            return _PROMPT_ENCODER.encode(payload[name])
    return None


def _hash_prompt_json(org: str, text: str) -> str:
    return hashlib.sha256(f"{org}\0{text}".encode()).hexdigest()


def prompt_hash(org: str, payload: dict[str, Any]) -> str | None:
    """sha256 of the org and the prompt (messages / prompt / input), not of the model:
    the same prompt sent to two public models has the same hash within an org, and
    none across orgs."""
    text = _prompt_json(payload)
    return None if text is None else _hash_prompt_json(org, text)


class UsageMiddleware:
    """Meter every attempt into the ledger.

    Args:
        sink: takes one row, synchronously, never blocking (``BatchWriter.put``).
        accountant: prices and charges attempts (shared with the quota layer and the router).
        pricer, router, prompt_estimator: build the accountant when none is given: price
            sources, where to find a route's target, prompt tokens when none were reported.
        prompt_content_orgs: orgs that opted in to storing prompt text (else only a hash).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        sink: Callable[[LedgerRow], None],
        accountant: Accountant | None = None,
        pricer: Pricer | None = None,
        router: Router | None = None,
        metrics: GatewayMetrics | None = None,
        tracer: GatewayTracer | None = None,
        prompt_estimator: PromptEstimator = estimate_prompt_chars,
        prompt_content_orgs: Collection[str] = (),
    ) -> None:
        self.app = app
        self.sink = sink
        self.accountant = accountant or Accountant(pricer, router=router, prompt_estimator=prompt_estimator)
        self.metrics = metrics
        self.tracer = tracer
        self.prompt_content_orgs = frozenset(prompt_content_orgs)
        self._binding = LogBinding("org", "key_id")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx, receive = await ensure_context(scope, receive)
        if not ctx.is_inference:
            await self.app(scope, receive, send)
            return
        tokens = self._binding.bind(ctx.principal.org, ctx.principal.key_id)
        seen = Seen()

        async def observe(message: Message) -> None:
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if ctx.stream:
                    seen.pieces += count_content_pieces(body)
                    seen.stream_bytes += len(body)
                elif body:
                    seen.body = body if not seen.body else seen.body + body
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            try:
                self.record(ctx, seen)
            except Exception:  # pragma: no cover - metering must never break a response
                log.exception("usage: could not record request %s", ctx.request_id)
            self._binding.unbind(tokens)

    # ------------------------------------------------------------------ rows
    def record(self, ctx: RequestContext, seen: Seen | None = None) -> list[LedgerRow]:
        """Build, count and hand over the request's rows; sets ``ctx.cost``."""
        seen = seen or Seen()
        p = ctx.principal
        raw = _prompt_json(ctx.payload)
        phash = None if raw is None else _hash_prompt_json(p.org, raw)
        ptext = raw[:_PROMPT_TEXT_MAX] if raw and p.org in self.prompt_content_orgs else None
        base = dict(request_id=ctx.request_id, org=p.org, key_id=p.key_id, model=ctx.model or "",
                    endpoint=ctx.endpoint, stream=ctx.stream, cache_status=ctx.cache_status,
                    prompt_hash=phash, prompt_text=ptext)
        rows: list[LedgerRow] = []
        starts: list[float] = []
        if not ctx.attempt_log:
            if ctx.cache_status == "HIT":
                rows.append(self._cache_row(ctx, base, seen))
                starts.append(ctx.started_at)
        else:
            for charge in self.accountant.charges(ctx, seen):
                rows.append(self._attempt_row(charge, base))
                starts.append(charge.attempt.started_at)
        total = Decimal(0)
        for row, started in zip(rows, starts, strict=True):
            self.sink(row)  # the ledger writer bounds the row in place: the cost below and the metrics see what is stored
            total += row.cost_usd
            if self.metrics is not None:
                self.metrics.record_row(row)
            if self.tracer is not None and row.outcome != "cache_hit":
                self.tracer.attempt_span(ctx, row, started)
        if rows:
            ctx.cost = total
        return rows

    def _attempt_row(self, charge: Charge, base: dict[str, Any]) -> LedgerRow:
        a, usage, target = charge.attempt, charge.usage, charge.target
        return LedgerRow(
            **base, route=a.route, provider=a.provider, upstream_model=a.model, attempt=a.number,
            node=_node(target, a.provider), response_model=a.response_model,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens, reasoning_tokens=usage.reasoning_tokens, estimated=usage.estimated,
            cost_usd=charge.cost, price_source=charge.source, latency_ms=a.latency_s * 1000,
            ttft_ms=None if a.ttft_s is None else a.ttft_s * 1000, status=a.status, outcome=a.outcome,
            error_code=a.error_code,
        )

    def _cache_row(self, ctx: RequestContext, base: dict[str, Any], seen: Seen) -> LedgerRow:
        hit = ctx.cache_hit
        usage = hit.usage if hit is not None and hit.usage is not None else ctx.usage
        route = (hit.route if hit is not None else None) or ""
        usage = self.accountant.replayed_usage(ctx, usage, route, seen)
        target = self.accountant.find_target(ctx, route)
        provider, _, upstream_model = route.partition("/")
        quote = self.accountant.quote(target, usage, route=route, model=target.model if target else upstream_model,
                                      provider=target.provider if target else provider)
        return LedgerRow(
            **base, route=route, provider=target.provider if target else provider,
            upstream_model=target.model if target else upstream_model, attempt=0, node=_node(target, provider),
            cost_usd=Decimal(0), saved_usd=quote.cost, price_source=quote.source,
            latency_ms=(time.perf_counter() - ctx.started_at) * 1000, status=200, outcome="cache_hit",
        )


def _node(target: Target | None, provider: str) -> str | None:
    node = getattr(target, "node", None)
    if isinstance(node, str) and node:
        return node
    return provider[5:] if provider.startswith("node:") else None
