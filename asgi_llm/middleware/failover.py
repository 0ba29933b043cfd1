"""FailoverMiddleware: try the plan's targets until one commits an answer.

It asks the :class:`~asgi_llm.routing.router.Router` for a plan, sets ``ctx.target``
and calls the inner app (dispatch) once per attempt. Until the response has started —
for streams, until the first content delta, the *commit point* (see
:mod:`asgi_llm.dispatch`) — a failure leaves no trace on the client and the next attempt
runs. After it, the failure is re-raised and the error layer ends the stream with a
terminal error event: a truncated answer is never presented as a success.

What happens after a failure:

* 5xx, resets, garbage, malformed or cut streams: one more try on the same target
  (``retries_per_target``, jittered backoff), then the next target.
* Timeouts (silent upstream, slow first token, stall): never retried on that target.
* 429: the next target at once; with no target left, wait ``Retry-After`` if it is at
  most ``max_retry_wait_s`` and try again, else return the 429 with its ``Retry-After``.
* ``context_length_exceeded``: only targets declaring a larger ``context_window``.
* Assistant prefill refused: the next target (the request itself is fine).
* Any other 4xx (content policy, bad parameters): returned at once, never retried.
* A target that cannot be tried (no usable key, or a node without an adapter any more):
  the next target at once.

Attempts are bounded by ``max_attempts`` and the whole pre-commit phase by
``request_timeout_s``. Responses say ``x-asgi-llm-route`` and ``x-asgi-llm-attempts``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_llm.errors import GatewayError, UpstreamError, UpstreamStatusError, UpstreamTimeoutError
from asgi_llm.request import ensure_context
from asgi_llm.providers.base import retry_after_seconds
from asgi_llm.routing.router import Router
from asgi_llm.targets import Target

__all__ = ["FailoverMiddleware", "FailoverPolicy"]

_NOT_TRIED = ("upstream_keys_exhausted", "target_unavailable")
"""Codes of targets that could not be tried at all (no usable key, no adapter): next target."""


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """Bounds on retrying. See the module docstring for what each failure does."""

    max_attempts: int = 4
    retries_per_target: int = 1
    max_retry_wait_s: float = 5.0
    backoff_base_s: float = 0.05
    request_timeout_s: float = 600.0


class FailoverMiddleware:
    """Route a request through its plan, failing over before the commit point.

    Args:
        app: the inner app (DispatchApp, or a cache in front of it).
        router: builds the plan.
        policy: retry bounds.
    """

    def __init__(self, app: ASGIApp, *, router: Router, policy: FailoverPolicy | None = None) -> None:
        self.app = app
        self.router = router
        self.policy = policy or FailoverPolicy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx, receive = await ensure_context(scope, receive)
        if not ctx.is_inference:
            await self.app(scope, receive, send)
            return
        plan = self.router.make_plan(ctx, scope["headers"])
        ctx.plan = plan.targets
        started = False

        async def watch_start(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        policy = self.policy
        deadline = time.monotonic() + policy.request_timeout_s
        queue: list[Target] = list(plan.targets)
        tries_here = 0
        last: GatewayError | None = None
        last_real: GatewayError | None = None  # the last error an upstream actually gave
        rounds = 0  # also bounds rounds that fail before an attempt starts (no usable key)
        while queue and ctx.attempts < policy.max_attempts and rounds < policy.max_attempts + len(plan.targets):
            rounds += 1
            target = queue[0]
            ctx.target = target
            try:
                await self.app(scope, receive, watch_start)
                return
            except UpstreamError as exc:
                if started:
                    raise  # past the commit point: the error layer ends the stream
                last = exc
                if exc.code not in _NOT_TRIED:
                    last_real = exc
                action, wait = self._decide(exc, target, queue, tries_here)
            if action == "raise":
                raise last_real or last
            if action == "retry":
                tries_here += 1
            else:  # "next"
                queue.pop(0)
                tries_here = 0
                if action == "next-larger-context":
                    queue = [t for t in queue if _larger_context(t, target)]
            if wait > 0:
                if time.monotonic() + wait > deadline:
                    break
                await anyio.sleep(wait)
            if time.monotonic() > deadline:
                break
        if last is None:  # nothing was tried (cannot happen with a non-empty plan)
            raise UpstreamError(f"No target could be tried for model '{ctx.model}'.")
        raise last_real or last

    def _decide(self, exc: UpstreamError, target: Target, queue: list[Target], tries_here: int) -> tuple[str, float]:
        """(action, seconds to wait first). Actions: retry, next, next-larger-context, raise."""
        policy = self.policy
        others_left = len(queue) > 1
        if isinstance(exc, UpstreamStatusError):
            status = exc.upstream_status
            code = exc.code or ""
            if code == "context_length_exceeded":
                return ("next-larger-context" if others_left else "raise"), 0.0
            if status == 400 and _is_prefill_refusal(exc):
                return ("next" if others_left else "raise"), 0.0
            if status == 429:
                if others_left:
                    return "next", 0.0
                wait = retry_after_seconds(exc.headers)
                wait = _jitter(policy.backoff_base_s) if wait is None else wait
                if tries_here < policy.retries_per_target and wait <= policy.max_retry_wait_s:
                    return "retry", wait
                return "raise", 0.0
            if not exc.retryable:
                return "raise", 0.0
        elif not exc.retryable:
            return "raise", 0.0
        if isinstance(exc, UpstreamTimeoutError):
            return ("next" if others_left else "raise"), 0.0  # a silent target is not retried
        if exc.code in _NOT_TRIED:
            return ("next" if others_left else "raise"), 0.0
        if tries_here < policy.retries_per_target:
            return "retry", _jitter(policy.backoff_base_s * (2**tries_here))
        return ("next" if others_left else "raise"), 0.0


def _jitter(base: float) -> float:
    """Full jitter between base/2 and base*1.5, so replicas do not retry in step."""
    return base * (0.5 + random.random())


def _larger_context(candidate: Target, failed: Target) -> bool:
    if candidate.context_window is None:
        return False
    return failed.context_window is None or candidate.context_window > failed.context_window


def _is_prefill_refusal(exc: UpstreamStatusError) -> bool:
    return exc.code in ("unsupported_prefill", "prefill_not_supported") or "prefill" in exc.message.lower()
