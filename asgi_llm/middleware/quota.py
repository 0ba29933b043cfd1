"""QuotaMiddleware: rate limits, quotas and budgets as reservations.

For every inference request, admission **reserves** the most the request can use, at
every level that has limits — the key, its org (``limits.org``), and the (key, model)
pair (``model_limits``): one request (rpm), the token estimate (tpm), a concurrency slot,
and the estimate's price (spend per UTC day / month). All limits are checked and
charged in one atomic store operation, all or nothing, exact across replicas sharing
the store. When the request ends — success, upstream error, failover, client
disconnect, cancellation — **settlement** charges the real usage of every attempt and
refunds the rest.

The estimate (documented as such, never billed): prompt tokens ≈ request body bytes / 4
(cheap, and an over-estimate for JSON, which is what a reservation wants); completion
tokens = ``max_completion_tokens`` / ``max_tokens`` × ``n``, or ``limits.default_max_tokens``
when the request sets none. Its price uses the highest input and output prices among
the model's targets, since this layer runs before failover picks one.

Real usage: the sum over ``ctx.attempt_log`` of each attempt's reported usage, priced at
that attempt's target. An attempt cut off (client gone, stream broken) without a usage
report is charged the prompt estimate plus one token per content chunk relayed; an
attempt that failed before producing anything costs nothing. A cache hit costs nothing.

Responses carry OpenAI's ``x-ratelimit-limit/remaining/reset-requests`` and ``-tokens``
headers (the most constrained level), errors included. A refusal is a 429 with
``Retry-After`` and a message naming the limit. When the state store is unreachable the
configured policy applies: ``closed`` (default) refuses with a 503, ``open`` admits
without limits and logs — never a 500.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_llm._ids import new_id
from asgi_llm.config import KeyLimits
from asgi_llm.errors import RateLimitError
from asgi_llm.middleware.context import ensure_context
from asgi_llm.stores import StoreError
from asgi_llm.stores.state import Admission, Limit, LimitStatus, Reservation, StateStore

if TYPE_CHECKING:
    from asgi_llm.context import Principal, RequestContext
    from asgi_llm.routing.router import ModelRoute, Price, Router, Target
    from asgi_llm.stack import BuildParts, LayerFactory

__all__ = ["QuotaMiddleware", "build_quota_layer", "format_reset"]

logger = logging.getLogger("asgi_llm.quota")

FailurePolicy = Literal["closed", "open"]
_MICRO = Decimal(1_000_000)
_MAX_PLANS = 10_000  # cached (key, model) limit plans; the cache starts over beyond this


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    if minutes >= 1:
        return f"{int(minutes)}m{round(secs)}s"
    return f"{secs:.3f}".rstrip("0").rstrip(".") + "s"


def _usd(micro: int) -> str:
    return "$" + format((Decimal(micro) / _MICRO).normalize(), "f")


def _micro_usd(usd: Decimal) -> int:
    return int((usd * _MICRO).to_integral_value(rounding="ROUND_CEILING"))


class QuotaMiddleware:
    """Reserve on admission, settle on completion.

    Args:
        app: the next ASGI app.
        store: the counters (``MemoryStateStore`` or ``RedisStateStore``).
        router: public model → targets, for prices (and to leave unknown models to the
            router's own 404, with no rate-limit headers that would tell them apart).
        org_limits: limits applied to each org as a whole.
        failure: ``closed`` → 503 when the store is unreachable; ``open`` → admit, log.
        default_max_tokens: completion tokens reserved when a request sets no max.
        lease_s: how long a concurrency slot survives a replica that died mid-request.
        settle_timeout_s: bound on the (shielded) settlement call.
        price_of: a target's price (default: ``target.price``); called once per route,
            so it must not change its answer for a target.

    Example:
        >>> app = QuotaMiddleware(app, store=MemoryStateStore(), org_limits=KeyLimits(rpm=600))
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: StateStore,
        router: Router | None = None,
        org_limits: KeyLimits | None = None,
        failure: FailurePolicy = "closed",
        default_max_tokens: int = 4096,
        lease_s: float = 660.0,
        settle_timeout_s: float = 5.0,
        price_of: Callable[[Target], Price | None] | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.router = router
        self.org_limits = org_limits
        self.failure = failure
        self.default_max_tokens = default_max_tokens
        self.lease_s = lease_s
        self.settle_timeout_s = settle_timeout_s
        self.price_of = price_of or (lambda t: t.price)
        # A store whose settle never awaits can be neither slow nor cancelled: no scope needed.
        self._shield_settle = not getattr(store, "settle_never_awaits", False)
        # Per (key id, model): the principal the plan was built for, and its limit plan.
        self._plans: dict[tuple[str, str], tuple[Principal, tuple[Limit, ...]]] = {}
        # Per route name: the route the prices were read from (the router's are fixed), and them.
        self._prices: dict[str, tuple[ModelRoute, _Pricing]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx, receive = await ensure_context(scope, receive)
        route = self.router.get(ctx.model) if self.router is not None and ctx.model is not None else None
        if not ctx.is_inference or ctx.model is None or (self.router is not None and route is None):
            await self.app(scope, receive, send)
            return
        prompt_est, completion_cap = self._estimate(ctx)
        pricing = self._pricing(route)
        spend_est = pricing.estimate(prompt_est, completion_cap)
        limits = self.limits_for(ctx.principal, ctx.model, tokens=prompt_est + completion_cap, spend=spend_est)
        if not limits:
            await self.app(scope, receive, send)
            return
        rid = "res_" + new_id()
        try:
            admission = await self.store.reserve(limits, reservation_id=rid, lease_s=self.lease_s)
        except StoreError as exc:
            if self.failure == "open":
                logger.warning("quota: state store unreachable, admitting without limits (stores.state_failure: open): %s",
                               exc.message)
                ctx.state["quota"] = "store_unavailable_open"
                await self.app(scope, receive, send)
                return
            raise StoreError(
                "Rate limits cannot be checked right now (the state store is unreachable), so the request was "
                "refused (stores.state_failure: closed). Retry shortly.",
                headers={"retry-after": "1"},
            ) from exc
        ctx.response_headers.extend(rate_limit_headers(admission.statuses))
        if not admission.admitted:
            raise _refusal(admission)
        reservation = admission.reservation
        assert reservation is not None
        try:
            await self.app(scope, receive, send)
        finally:
            tokens, spend = _actual(ctx, pricing, prompt_est)
            ctx.state["quota"] = {"reserved_tokens": prompt_est + completion_cap, "reserved_spend_micro_usd": spend_est,
                                  "tokens": tokens, "spend_micro_usd": spend}
            if self._shield_settle:
                with anyio.move_on_after(self.settle_timeout_s, shield=True):
                    await self._settle(reservation, tokens, spend)
            else:
                await self._settle(reservation, tokens, spend)

    async def _settle(self, reservation: Reservation, tokens: int, spend: int) -> None:
        try:
            await self.store.settle(reservation, tokens=tokens, spend=spend)
        except StoreError as exc:
            # The reserved amounts stay charged (the safe side); windows expire anyway.
            logger.warning("quota: settlement failed, reservation %s stays charged: %s", reservation.id, exc.message)

    # ------------------------------------------------------------------ limits

    def limits_for(self, principal: Principal, model: str, *, tokens: int, spend: int) -> list[Limit]:
        """Every limit this request must fit in, with its reserved cost."""
        key = (principal.key_id, model)
        cached = self._plans.get(key)
        # Stored keys get a new (equal) Principal per request; the recipe's are the same object.
        if cached is None or (cached[0] is not principal and cached[0] != principal):
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            cached = self._plans[key] = (principal, self._plan(principal, model))
        out: list[Limit] = []
        for lim in cached[1]:
            if lim.kind == "tokens":
                lim = Limit("tokens", lim.scope, lim.limit, tokens, lim.label, lim.window_s)
            elif lim.kind == "spend_day" or lim.kind == "spend_month":
                lim = Limit(lim.kind, lim.scope, lim.limit, spend, lim.label, lim.window_s)
            out.append(lim)
        return out

    def _plan(self, principal: Principal, model: str) -> tuple[Limit, ...]:
        """The limits of ``principal`` on ``model``, in admission order; the token and
        spend ones with cost 0, for :meth:`limits_for` to fill in."""
        from asgi_llm.auth.keys import PrincipalLimits

        key_limits: KeyLimits | None = None
        model_limits: KeyLimits | None = None
        if isinstance(principal.limits, PrincipalLimits):
            key_limits, model_limits = principal.limits.key, principal.limits.models.get(model)
        elif isinstance(principal.limits, KeyLimits):
            key_limits = principal.limits
        who = f"key '{principal.name or principal.key_id}'"
        out: list[Limit] = []
        _add(out, key_limits, f"key:{principal.key_id}", who)
        _add(out, self.org_limits, f"org:{principal.org}", f"org '{principal.org}'")
        _add(out, model_limits, f"key:{principal.key_id}|model:{model}", f"{who} on model '{model}'")
        return tuple(out)

    def _pricing(self, route: ModelRoute | None) -> _Pricing:
        if route is None:
            return _NO_PRICES
        cached = self._prices.get(route.name)
        if cached is None or cached[0] is not route:
            cached = self._prices[route.name] = (route, _Pricing.of(route, self.price_of))
        return cached[1]

    def _estimate(self, ctx: RequestContext) -> tuple[int, int]:
        prompt = math.ceil(len(ctx.body) / 4)
        if ctx.endpoint == "embeddings":
            return prompt, 0
        payload = ctx.payload
        cap = payload.get("max_completion_tokens")
        if not _positive_int(cap):
            cap = payload.get("max_tokens")
        if not _positive_int(cap):
            cap = self.default_max_tokens
        n = payload.get("n")
        return prompt, int(cap) * (int(n) if _positive_int(n) else 1)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _add(out: list[Limit], limits: KeyLimits | None, scope: str, label: str) -> None:
    if limits is None:
        return
    if limits.rpm is not None:
        out.append(Limit("requests", scope, limits.rpm, 1, label))
    if limits.tpm is not None:
        out.append(Limit("tokens", scope, limits.tpm, 0, label))
    if limits.concurrency is not None:
        out.append(Limit("concurrency", scope, limits.concurrency, 1, label))
    if limits.spend_usd_per_day is not None:
        out.append(Limit("spend_day", scope, _micro_usd(limits.spend_usd_per_day), 0, label))
    if limits.spend_usd_per_month is not None:
        out.append(Limit("spend_month", scope, _micro_usd(limits.spend_usd_per_month), 0, label))


@dataclass(frozen=True, slots=True)
class _Pricing:
    """A route's prices as integers: micro-USD per token × ``scale``, the least common
    denominator of the prices. Estimates and charges are then exact integer sums, rounded
    up to micro-USD once — what the Decimal formula gives, at a fraction of its cost."""

    scale: int
    max_input: int  # the estimate prices at the highest input and output prices of the targets
    max_output: int
    by_route: dict[str, tuple[int, int, int] | None]  # target route → (input, cached input, output)

    @classmethod
    def of(cls, route: ModelRoute, price_of: Callable[[Target], Price | None]) -> _Pricing:
        pairs = [(t.route, price_of(t)) for t in route.targets]
        listed = [p for _, p in pairs if p is not None]
        scale = math.lcm(*(d.as_integer_ratio()[1] for p in listed for d in (p.input, p.output, p.cached_input) if d is not None))

        def whole(d: Decimal) -> int:
            num, den = d.as_integer_ratio()
            return num * (scale // den)

        return cls(
            scale=scale,
            max_input=max((whole(p.input) for p in listed), default=0),
            max_output=max((whole(p.output) for p in listed), default=0),
            by_route={r: None if p is None else (whole(p.input), whole(p.input if p.cached_input is None else p.cached_input),
                                                 whole(p.output)) for r, p in pairs},  # a later target of a route wins
        )

    def estimate(self, prompt: int, completion: int) -> int:
        """The reserved price of ``prompt`` + ``completion`` tokens, micro-USD rounded up."""
        return _ceil_div(prompt * self.max_input + completion * self.max_output, self.scale)


_NO_PRICES = _Pricing(scale=1, max_input=0, max_output=0, by_route={})


def _actual(ctx: RequestContext, pricing: _Pricing, prompt_est: int) -> tuple[int, int]:
    """Real usage of every attempt: (tokens, micro-USD rounded up)."""
    tokens, cost = 0, 0  # cost in micro-USD × pricing.scale
    for attempt in ctx.attempt_log:
        usage = attempt.usage
        if usage is not None:
            prompt, completion, cached = usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens
        elif attempt.content_chunks > 0:
            prompt, completion, cached = prompt_est, attempt.content_chunks, 0
        else:
            continue
        tokens += prompt + completion
        price = pricing.by_route.get(attempt.route)
        if price is not None:
            cached = min(cached, prompt)
            cost += (prompt - cached) * price[0] + cached * price[1] + completion * price[2]
    return tokens, _ceil_div(cost, pricing.scale)


def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)


_HEADERS = (
    ("requests", b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests"),
    ("tokens", b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens"),
)


def rate_limit_headers(statuses: Sequence[LimitStatus]) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-*`` headers for the most constrained request and token limits."""
    tightest: dict[str, LimitStatus] = {}
    for s in statuses:
        kind = s.limit.kind
        if kind == "requests" or kind == "tokens":
            t = tightest.get(kind)
            # Fewest remaining, then the longest reset; the first one on a tie.
            if t is None or s.remaining < t.remaining or (s.remaining == t.remaining and s.reset_s > t.reset_s):
                tightest[kind] = s
    out: list[tuple[bytes, bytes]] = []
    for kind, limit_name, remaining_name, reset_name in _HEADERS:
        status = tightest.get(kind)
        if status is not None:
            out += ((limit_name, str(status.limit.limit).encode()), (remaining_name, str(status.remaining).encode()),
                    (reset_name, format_reset(status.reset_s).encode()))
    return out


def _per(limit: Limit) -> str:
    return "per minute" if limit.window_s == 60 else f"per {limit.window_s:g} s"


def _refusal(admission: Admission) -> RateLimitError:
    status = admission.denied
    assert status is not None
    lim = status.limit
    wait = max(1, math.ceil(admission.retry_after_s))
    retry = f"Retry after {wait} s."
    code = None
    if lim.kind == "requests":
        message = (f"Rate limit reached for {lim.label} on requests {_per(lim)} (RPM): "
                   f"limit {lim.limit}, used {status.used}. {retry}")
    elif lim.kind == "tokens" and lim.cost > lim.limit:
        message = (f"Request too large for {lim.label} on tokens {_per(lim)} (TPM): limit {lim.limit}, "
                   f"requested {lim.cost} (prompt estimate + max_tokens). Lower max_tokens or shorten the prompt.")
    elif lim.kind == "tokens":
        message = (f"Rate limit reached for {lim.label} on tokens {_per(lim)} (TPM): limit {lim.limit}, "
                   f"used {status.used}, requested {lim.cost}. {retry}")
    elif lim.kind == "concurrency":
        message = (f"Concurrency limit reached for {lim.label}: {status.used} requests in flight, "
                   f"limit {lim.limit}. {retry}")
    else:
        period = "day (UTC)" if lim.kind == "spend_day" else "month (UTC)"
        code = "insufficient_quota"
        message = (f"Spend budget reached for {lim.label} on USD per {period}: limit {_usd(lim.limit)}, "
                   f"used {_usd(status.used)}, this request may cost up to {_usd(lim.cost)}. {retry}")
    return RateLimitError(message, code=code, headers={"retry-after": str(wait),
                                                       "retry-after-ms": str(max(1, math.ceil(admission.retry_after_s * 1000)))})


def build_quota_layer(parts: BuildParts) -> LayerFactory | None:
    """The recipe's limits → a quota layer on ``stores.state``.

    On when auth is configured (keys may carry limits, stored ones included) or
    ``limits.org`` sets any limit. The state store is shared through
    ``parts.extras["state"]`` (routing reuses it).
    """
    from asgi_llm.stores.state import state_store_from_url

    config = parts.config
    org = config.limits.org
    org_limits = org if any(v is not None for v in org.model_dump().values()) else None
    if not (config.auth.admin_keys or config.auth.keys or org_limits is not None):
        return None
    store = parts.extras.get("state")
    if store is None:
        store = parts.extras["state"] = state_store_from_url(config.stores.state)
        parts.resources.append(store)
        if config.stores.state_failure == "closed":  # failing open, a store outage does not make us unready
            parts.readiness.append(store.ping)
    return lambda app: QuotaMiddleware(
        app,
        store=store,
        router=parts.router,
        org_limits=org_limits,
        failure=config.stores.state_failure,
        default_max_tokens=config.limits.default_max_tokens,
        lease_s=config.server.request_timeout_s + 60,
    )
