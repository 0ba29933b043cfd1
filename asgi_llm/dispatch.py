"""DispatchApp: the endpoint that makes one attempt against ``ctx.target``.

Non-streaming: the upstream body is read whole, checked to be a JSON object (garbage
is a 502, never relayed as a success), its usage recorded, and relayed byte for byte.

Streaming: chunks are relayed one by one as they arrive — never buffered whole. The
response start is sent with the first chunk, so an upstream that accepts and then dies
before saying anything still gets a clean HTTP error. The usage chunk the gateway
always asks for is recorded and only passed on if the client asked for it. A stream
that ends without ``[DONE]`` or with a malformed chunk raises; the error layer then ends
the client's stream with a terminal error event, so a cut answer never looks finished.
A client that disconnects cancels the upstream call.

Every failure is raised, never written here: outer layers (failover, errors) decide what
the client sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

import anyio
from starlette.types import Receive, Scope, Send

from asgi_llm._asgi import JSON_HEADERS, SSE_HEADERS, ClientDisconnected
from asgi_llm._sse import DONE, encode_json
from asgi_llm.context import Attempt, RequestContext, Usage, gateway_headers
from asgi_llm.errors import GatewayError, ServiceUnavailableError, UpstreamError, UpstreamStatusError
from asgi_llm.request import ensure_context
from asgi_llm.providers.base import ProviderAdapter, UpstreamReply, retry_after_seconds
from asgi_llm.routing.health import HealthTracker
from asgi_llm.routing.router import Router
from asgi_llm.usage.accounting import answer_bytes, plausible_usage

__all__ = ["DispatchApp", "TargetUnavailableError"]


class TargetUnavailableError(UpstreamError):
    """A planned target has no adapter any more (a node gone since planning): failover
    moves to the next target without counting it as an upstream's answer."""

    status_code = 503
    type = "service_unavailable"
    code = "target_unavailable"


class DispatchApp:
    """Send the request to one target and relay the answer.

    Args:
        providers: adapter per provider name.
        router: used only when no outer layer has chosen ``ctx.target`` (standalone use).
    """

    def __init__(self, *, providers: Mapping[str, ProviderAdapter], router: Router, health: HealthTracker | None = None) -> None:
        self.providers = providers
        self.router = router
        self.health = health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx, receive = await ensure_context(scope, receive)
        target = ctx.target
        if target is None:
            if not ctx.plan:
                ctx.plan = self.router.plan(ctx)
            target = ctx.target = ctx.plan[0]
        adapter = self.providers.get(target.provider)
        if adapter is None:
            if target.kind == "node":
                # A node that went away (or whose URL the network policy refuses) between
                # planning and now: failover skips it like a target without usable keys.
                raise TargetUnavailableError(f"Node target '{target.provider}' is not reachable right now.")
            raise ServiceUnavailableError(f"No adapter is configured for provider '{target.provider}'.")
        route = target.route
        key_id, api_key = adapter.keys.pick(route)  # raises a 503 naming the provider if none is usable
        ctx.attempts += 1
        attempt = Attempt(
            number=ctx.attempts, route=route, provider=target.provider, model=target.model,
            started_at=time.perf_counter(), key_id=key_id,
        )
        ctx.attempt_log.append(attempt)
        health = self.health
        if health is not None:
            health.begin(route, key_id)
        try:
            t0 = time.perf_counter()
            try:
                reply = await adapter.send(ctx, target, api_key=api_key)
            finally:
                ctx.upstream_seconds += time.perf_counter() - t0
            try:
                hidden_ok = target.kind != "node"  # nodes' engines stream all they generate
                if ctx.stream:
                    await _relay_stream(ctx, reply, attempt, receive, send, hidden_ok)
                else:
                    await _relay_body(ctx, reply, attempt, send, hidden_ok)
            finally:
                await reply.aclose()
            attempt.status, attempt.outcome = 200, "ok"
            if health is not None:
                health.success(route, key_id, latency_s=attempt.ttft_s if ctx.stream else time.perf_counter() - attempt.started_at)
        except ClientDisconnected:
            attempt.status, attempt.outcome, attempt.error_code = 499, "aborted", "client_disconnected"
            raise
        except GatewayError as exc:
            attempt.status, attempt.error_code = exc.status_code, exc.code
            if health is not None and isinstance(exc, UpstreamError):
                _record_failure(health, route, key_id, exc)
            raise
        except BaseException:
            # Cancelled from outside (server shutdown, request timeout) or a bug.
            attempt.outcome, attempt.error_code = "aborted", attempt.error_code or "cancelled"
            raise
        finally:
            attempt.latency_s = time.perf_counter() - attempt.started_at
            if health is not None:
                health.end(route, key_id)


def _record_failure(health: HealthTracker, route: str, key_id: str, exc: UpstreamError) -> None:
    """Teach health what this failure says about the (route, key)."""
    if isinstance(exc, UpstreamStatusError):
        status = exc.upstream_status
        if status == 429:
            wait = retry_after_seconds(exc.headers)
            health.cool_down(route, key_id, wait if wait is not None else 5.0, error="429 rate limited")
        elif status in (401, 403):
            health.refused(route, key_id, error=f"{status}: upstream refused the key")
        elif status >= 500 or status == 408:
            health.failure(route, key_id, error=f"HTTP {status}")
        # other 4xx are about the request, not the target's health
        return
    health.failure(route, key_id, error=exc.code or type(exc).__name__)


def _record_usage(ctx: RequestContext, attempt: Attempt, raw_usage: object, answer_size: int, hidden_ok: bool) -> None:
    """The attempt's usage as reported, plausibility-checked: clamped (and flagged
    ``estimated``) when it claims more than the request and the answer make possible."""
    usage = Usage.from_openai(raw_usage)
    if usage is not None:
        usage = plausible_usage(usage, ctx, answer_size=answer_size, hidden_ok=hidden_ok)
    ctx.usage = attempt.usage = usage


async def _relay_body(ctx: RequestContext, reply: UpstreamReply, attempt: Attempt, send: Send, hidden_ok: bool = True) -> None:
    t0 = time.perf_counter()
    try:
        raw, obj = await reply.body()
    finally:
        ctx.upstream_seconds += time.perf_counter() - t0
    _record_usage(ctx, attempt, obj.get("usage"), answer_bytes(obj), hidden_ok)
    model = obj.get("model")
    attempt.response_model = model if isinstance(model, str) else None
    ctx.timings["upstream_total"] = time.perf_counter() - reply.sent_at
    headers = [*JSON_HEADERS, *gateway_headers(ctx), (b"content-length", str(len(raw)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


async def _relay_stream(ctx: RequestContext, reply: UpstreamReply, attempt: Attempt, receive: Receive, send: Send,
                        hidden_ok: bool = True) -> None:
    """Relay chunks while watching for the client going away."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not asyncio (trio): anyio's task group
        task = None
    if task is None:
        await _relay_stream_anyio(ctx, reply, attempt, receive, send, hidden_ok)
        return
    # asyncio: a plain watcher task that cancels this one on a disconnect. It does what
    # the anyio task group below does at a fraction of the cost (no cancel scopes, no
    # checkpoints): profiles put the task group at ~20 % of a stream's relay CPU.
    disconnected = False
    cancelling = task.cancelling()

    async def watch() -> None:
        nonlocal disconnected
        try:
            await _wait_for_disconnect(receive)
        except Exception:  # noqa: BLE001 - a server that cannot tell us: keep relaying
            return
        disconnected = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await _pump(ctx, reply, attempt, send, hidden_ok)
    except asyncio.CancelledError:
        # Our own cancel (and nobody else's): the client left mid-stream.
        if disconnected and task.uncancel() <= cancelling:
            ctx.client_disconnected = True
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()


async def _relay_stream_anyio(ctx: RequestContext, reply: UpstreamReply, attempt: Attempt, receive: Receive, send: Send,
                              hidden_ok: bool) -> None:
    failure: BaseException | None = None
    disconnected = False

    async def watch(scope: anyio.CancelScope) -> None:
        nonlocal disconnected
        await _wait_for_disconnect(receive)
        disconnected = True
        scope.cancel()

    finished = False
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        try:
            await _pump(ctx, reply, attempt, send, hidden_ok)
            finished = True
        except Exception as exc:  # re-raised below, outside the task group
            failure = exc
        tg.cancel_scope.cancel()
    # Servers report http.disconnect once a response is complete, too: a disconnect
    # seen after the last message was sent is not an abort.
    if disconnected and not finished:
        ctx.client_disconnected = True
        raise ClientDisconnected()
    if failure is not None:
        raise failure


async def _wait_for_disconnect(receive: Receive) -> None:
    """Return when the server reports ``http.disconnect`` (the body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _pump(ctx: RequestContext, reply: UpstreamReply, attempt: Attempt, send: Send, hidden_ok: bool = True) -> None:
    """Relay chunks. Chunks before the first content (the role chunk, usually) are held
    and the response start is sent with the first content: that is the stream's commit
    point. Until then nothing has reached the client, so a failure can still move to
    another target as if this attempt never happened."""
    held: list[bytes] = []
    committed = False
    include_usage = ctx.include_usage
    answered = 0  # bytes of generated text so far: what reported usage is checked against
    wait_from = time.perf_counter()
    async with contextlib.aclosing(reply.chunks()) as chunks:
        async for raw, obj in chunks:
            if attempt.response_model is None and isinstance(obj.get("model"), str):
                attempt.response_model = obj["model"]
            if obj.get("choices"):
                attempt.content_chunks += 1
                answered += answer_bytes(obj)
            usage = obj.get("usage")
            if usage:
                _record_usage(ctx, attempt, usage, answered, hidden_ok)
                if not include_usage:
                    if not obj.get("choices"):
                        continue  # the usage-only chunk the client did not ask for
                    raw = encode_json({k: v for k, v in obj.items() if k != "usage"})
            if committed:
                await send({"type": "http.response.body", "body": raw, "more_body": True})
                continue
            held.append(raw)
            if reply.first_content_at is not None:
                await _commit(ctx, reply, attempt, send, held, wait_from)
                committed = True
                held = []
    if not committed:  # a stream with no content at all (still complete: [DONE] arrived)
        await _commit(ctx, reply, attempt, send, held, wait_from)
    ctx.timings["upstream_total"] = time.perf_counter() - reply.sent_at
    await send({"type": "http.response.body", "body": DONE, "more_body": False})


async def _commit(ctx: RequestContext, reply: UpstreamReply, attempt: Attempt, send: Send, held: list[bytes], wait_from: float) -> None:
    # Time spent waiting for the upstream's first content is not gateway overhead.
    ctx.upstream_seconds += time.perf_counter() - wait_from
    if reply.first_content_at is not None:
        attempt.ttft_s = ctx.timings["ttft"] = reply.first_content_at - reply.sent_at
    await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *gateway_headers(ctx)]})
    for raw in held:  # one event per message, as it came
        await send({"type": "http.response.body", "body": raw, "more_body": True})
