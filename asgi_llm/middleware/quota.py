"""QuotaMiddleware: rate limits, quotas and budgets as reservations.

For every inference request, admission **reserves** the most the request can use, at
every level that has limits — the key, its org (``limits.org``), and the (key, model)
pair (``model_limits``): one request (rpm), the token estimate (tpm), a concurrency slot,
and the estimate's price (spend per UTC day / month). All limits are checked and
charged in one atomic store operation, all or nothing, exact across replicas sharing
the store. When the request ends — success, upstream error, failover, client
disconnect, cancellation — **settlement** charges the real usage of every attempt and
refunds the rest.

Prices come from :mod:`asgi_llm.usage.accounting`, the module the router and the ledger
use too. The reservation (an estimate, never billed): prompt tokens ≈ request body bytes
/ 4, completion tokens = the request's cap × ``n`` (``limits.default_max_tokens`` when it
sets none), priced on the **most expensive target the request may reach** — its model's
targets and those of the fallback models it names (``fallbacks``, ``models[]``), node
selectors resolved to the live nodes at their owners' prices, after the rule and
``provider`` filters (:meth:`~asgi_llm.routing.router.Router.reachable`). A target with
no price is billed 0 by the ledger, so it adds 0 to the worst case; it is flagged
(``ctx.quota.unpriced_routes``, a warning once per route).

Settlement charges **every attempt** (a failed-over one that consumed the prompt, a
node's, the one that answered) exactly what its ledger row costs
(:meth:`~asgi_llm.usage.accounting.Accountant.charges`, computed once per request), so a
budget's spend is the sum of the ledger's rows, to the pico-dollar. Spend counters are in
pico-USD; one request reserves and is charged at most
:data:`~asgi_llm.usage.accounting.MAX_CHARGE_PICO` (≈ $9,007, what Redis's Lua doubles
hold exactly). The reservation covers one attempt: a request that failed over after an
attempt consumed its prompt settles above it by those prompts. A cache hit costs nothing.

Responses carry OpenAI's ``x-ratelimit-limit/remaining/reset-requests`` and ``-tokens``
headers (the most constrained level), errors included. A refusal is a 429 with
``Retry-After`` and a message naming the limit. When the state store is unreachable the
configured policy applies: ``closed`` (default) refuses with a 503, ``open`` admits
without limits and logs — never a 500.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Literal

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_llm._ids import new_id
from asgi_llm.auth.limits import KeyLimits
from asgi_llm.context import QuotaOutcome
from asgi_llm.errors import RateLimitError
from asgi_llm.request import ensure_context
from asgi_llm.stores import StoreError
from asgi_llm.stores.state import Admission, Limit, LimitStatus, Reservation, StateStore
from asgi_llm.usage.accounting import Accountant, clamp_charge, estimate_request, total_pico
from asgi_llm.usage.records import PICO

if TYPE_CHECKING:
    from asgi_llm.context import Principal
    from asgi_llm.routing.router import Router

__all__ = ["QuotaMiddleware", "format_reset"]

logger = logging.getLogger("asgi_llm.quota")

FailurePolicy = Literal["closed", "open"]
_MAX_SPEND_LIMIT = 2**63 - 1  # pico-USD; a larger budget is unlimited in practice ($9.2M)
_SPEND = frozenset({"spend_day", "spend_month"})
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


def _usd(pico: int) -> str:
    return "$" + format((Decimal(pico) / PICO).normalize(), "f")


def _pico_usd(usd: Decimal) -> int:
    return min(_MAX_SPEND_LIMIT, int((usd * PICO).to_integral_value(rounding=ROUND_CEILING)))


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
        accountant: prices and charges (default: the router's, so that the router, this
            layer and the ledger agree).

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
        accountant: Accountant | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.router = router
        self.org_limits = org_limits
        self.failure = failure
        self.default_max_tokens = default_max_tokens
        self.lease_s = lease_s
        self.settle_timeout_s = settle_timeout_s
        self.accountant = accountant or (router.accountant if router is not None else Accountant())
        # A store whose settle never awaits can be neither slow nor cancelled: no scope needed.
        self._shield_settle = not getattr(store, "settle_never_awaits", False)
        # Per (key id, model): the principal the plan was built for, and its limit plan.
        self._plans: dict[tuple[str, str], tuple[Principal, tuple[Limit, ...]]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx, receive = await ensure_context(scope, receive)
        route = self.router.get(ctx.model) if self.router is not None and ctx.model is not None else None
        if not ctx.is_inference or ctx.model is None or (self.router is not None and route is None):
            await self.app(scope, receive, send)
            return
        prompt_est, completion_cap = estimate_request(ctx, self.default_max_tokens)
        spend_est, unpriced = 0, []
        if self._has_spend(ctx.principal, ctx.model):
            targets = self.router.reachable(ctx, scope.get("headers", ())) if self.router is not None else []
            spend_est, unpriced = self.accountant.reservation(targets, prompt_est, completion_cap)
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
                ctx.quota = QuotaOutcome(store_unavailable_open=True)
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
            charges = self.accountant.charges(ctx)
            tokens = sum(c.usage.prompt_tokens + c.usage.completion_tokens for c in charges)
            spend = clamp_charge(total_pico(charges))
            ctx.quota = QuotaOutcome(reserved_tokens=prompt_est + completion_cap, reserved_spend_pico_usd=spend_est,
                                     tokens=tokens, spend_pico_usd=spend, unpriced_routes=unpriced)
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
        """Every limit this request must fit in, with its reserved cost (spend in pico-USD)."""
        out: list[Limit] = []
        for lim in self._cached_plan(principal, model):
            if lim.kind == "tokens":
                lim = Limit("tokens", lim.scope, lim.limit, tokens, lim.label, lim.window_s)
            elif lim.kind == "spend_day" or lim.kind == "spend_month":
                lim = Limit(lim.kind, lim.scope, lim.limit, spend, lim.label, lim.window_s)
            out.append(lim)
        return out

    def _has_spend(self, principal: Principal, model: str) -> bool:
        """Does any budget apply (else the reservation need not be priced)?"""
        return any(lim.kind in _SPEND for lim in self._cached_plan(principal, model))

    def _cached_plan(self, principal: Principal, model: str) -> tuple[Limit, ...]:
        key = (principal.key_id, model)
        cached = self._plans.get(key)
        # Stored keys get a new (equal) Principal per request; the recipe's are the same object.
        if cached is None or (cached[0] is not principal and cached[0] != principal):
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            cached = self._plans[key] = (principal, self._plan(principal, model))
        return cached[1]

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
        out.append(Limit("spend_day", scope, _pico_usd(limits.spend_usd_per_day), 0, label))
    if limits.spend_usd_per_month is not None:
        out.append(Limit("spend_month", scope, _pico_usd(limits.spend_usd_per_month), 0, label))


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
