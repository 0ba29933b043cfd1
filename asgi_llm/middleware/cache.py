"""CacheMiddleware: exact-match response cache, tenant-partitioned, stream-aware.

Where it sits: inside quota and usage (a hit still counts against request-rate limits
and is metered), outside failover (a miss is whatever the failover plan produced).

For ``chat``, ``completions`` and ``embeddings`` requests:

1. Read the client's controls and the policy; a request that is not cacheable (policy
   off, not deterministic, ``no-cache`` + ``no-store``) passes through as ``BYPASS``.
2. Key it (:func:`~asgi_llm.cache.cache_key.make_key`): the canonical request minus fields
   that never change the answer, partitioned by org (or org + key) and by the public
   model's target set.
3. **Hit**: answer from the entry without calling anything inside -- JSON, or replayed
   as SSE for a streamed request -- with ``x-asgi-llm-cache: HIT``, the key's hash and
   ``age``; ``ctx.usage`` and ``ctx.cache_hit`` tell the usage layer what was
   saved.
4. **Miss**: ``x-asgi-llm-cache: MISS``; the inner app answers and every message passes
   through untouched as it is sent (a stream is never held back). A stream is assembled
   on the side; the answer is stored only after a 200 that completed -- a JSON answer
   with finish reasons, or a stream that reached ``[DONE]`` without an error -- and only
   after the client has the last byte. Errors and cut streams are never stored.
5. **Single flight**: while one miss for a key is in flight, identical requests wait
   (at most ``policy.wait_s``) and are served from its entry; if it fails, the next
   waiter leads. In-process always; across replicas too when the store offers
   :class:`~asgi_llm.stores.cache.FlightLockSupport` (Redis: a ``SET NX PX`` lock, the
   others poll for the entry while the lock is held).

A store outage never fails a request: the request is served without the cache
(``BYPASS``) and the failure is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_llm._asgi import JSON_HEADERS, SSE_HEADERS, ClientDisconnected, send_bytes
from asgi_llm._sse import DONE
from asgi_llm.cache.capture import ResponseCapture
from asgi_llm.cache.entry import Entry, is_complete, json_bytes, replay_events
from asgi_llm.cache.cache_key import CacheKey, make_key
from asgi_llm.cache.policy import CachePolicy, Controls, is_deterministic, parse_controls
from asgi_llm.context import CacheHit, RequestContext, gateway_headers
from asgi_llm.request import ensure_context
from asgi_llm.stores import StoreError
from asgi_llm.stores.cache import CacheStore, FlightLockSupport

if TYPE_CHECKING:
    from asgi_llm.routing.router import Router

__all__ = ["CacheMiddleware"]

logger = logging.getLogger("asgi_llm")

KEY_HEADER = b"x-asgi-llm-cache-key"
_POLL_S = 0.05  # how often a replica waiting on another replica's flight looks for the entry


class CacheMiddleware:
    """Serve identical inference requests from a cache.

    Args:
        app: the next ASGI app.
        store: where entries live (:func:`~asgi_llm.stores.cache.cache_store_from_url`).
        policy: what may be cached and for how long (default: cache deterministic
            requests for 300 s).
        router: resolves the public model's target set for the key; without one (a
            host app using this middleware alone) the key has no target part.
        clock: wall-clock seconds, for entry ages (shared across replicas).

    Example:
        >>> app.add_middleware(CacheMiddleware, store=MemoryCacheStore(), policy=CachePolicy(ttl_s=60))
    """

    def __init__(self, app: ASGIApp, *, store: CacheStore, policy: CachePolicy | None = None,
                 router: Router | None = None, clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.store = store
        self.policy = policy or CachePolicy()
        self.router = router
        self.clock = clock
        # Shared coordination between concurrent requests (not per-request state):
        # digest → event set when that key's leader is done.
        self._flights: dict[str, anyio.Event] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx, receive = await ensure_context(scope, receive)
        if not ctx.is_inference:
            await self.app(scope, receive, send)
            return
        if ctx.cache_layer_seen:
            raise RuntimeError("CacheMiddleware ran twice for one request: add it once (build_gateway() does).")
        ctx.cache_layer_seen = True
        controls = parse_controls(scope["headers"], ctx.payload)
        if "cache" in ctx.payload:
            # The LiteLLM-style control object is for us; never forward it upstream.
            ctx.payload = {k: v for k, v in ctx.payload.items() if k != "cache"}
        key = self._key_for(ctx, controls)
        if key is None:
            ctx.cache_status = "BYPASS"
            await self.app(scope, receive, send)
            return
        ctx.response_headers.append((KEY_HEADER, key.short.encode()))
        ttl = controls.ttl_s if controls.ttl_s is not None else self.policy.resolve(model=ctx.model, org=ctx.principal.org).ttl_s
        ttl = min(ttl, self.policy.max_ttl_s)
        await _Responder(self, ctx, key, controls, ttl).run(scope, receive, send)

    def _key_for(self, ctx: RequestContext, controls: Controls) -> CacheKey | None:
        """The request's key, or ``None`` when it must bypass the cache."""
        rules = self.policy.resolve(model=ctx.model, org=ctx.principal.org)
        if not rules.enabled or (controls.no_cache and controls.no_store):
            return None
        if not rules.cache_nondeterministic and not is_deterministic(ctx.endpoint, ctx.payload):
            return None
        targets: list[str] = []
        if self.router is not None:
            route = self.router.get(ctx.model or "")
            if route is None:
                return None  # unknown model: the inner app answers 404
            targets = [t.route for t in route.targets]
        key_id = ctx.principal.key_id if self.policy.partition == "key" else None
        return make_key(endpoint=ctx.endpoint, payload=ctx.payload, org=ctx.principal.org, key_id=key_id, targets=targets)


class _Responder:
    """One request's way through the cache (keeps per-request state off the middleware)."""

    __slots__ = ("mw", "ctx", "key", "controls", "ttl")

    def __init__(self, mw: CacheMiddleware, ctx: RequestContext, key: CacheKey, controls: Controls, ttl: float) -> None:
        self.mw, self.ctx, self.key, self.controls, self.ttl = mw, ctx, key, controls, ttl

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        mw, key = self.mw, self.key
        if self.controls.no_cache:
            await self._miss(scope, receive, send, lead=False)
            return
        deadline = anyio.current_time() + mw.policy.wait_s
        while True:
            try:
                entry = await self._lookup()
            except StoreError as exc:
                logger.warning("cache store unavailable, serving without the cache: %s", exc)
                self.ctx.cache_status = "BYPASS"
                await mw.app(scope, receive, send)
                return
            if entry is not None:
                await self._hit(entry, send)
                return
            event = mw._flights.get(key.digest)
            remaining = deadline - anyio.current_time()
            if event is None or remaining <= 0:
                break
            with anyio.move_on_after(remaining):
                await event.wait()
        await self._miss(scope, receive, send, lead=mw.policy.wait_s > 0 and key.digest not in mw._flights)

    async def _lookup(self) -> Entry | None:
        raw = await self.mw.store.get(self.key)
        if raw is None:
            return None
        entry = Entry.decode(raw)
        if entry is None or entry.endpoint != self.ctx.endpoint:
            return None
        max_age = self.controls.max_age_s
        if max_age is not None and self.mw.clock() - entry.stored_at > max_age:
            return None
        return entry

    async def _hit(self, entry: Entry, send: Send) -> None:
        ctx = self.ctx
        age = max(0.0, self.mw.clock() - entry.stored_at)
        usage = entry.usage
        ctx.cache_status = "HIT"
        ctx.usage = usage
        ctx.cache_hit = CacheHit(usage=usage, route=entry.route, key=self.key.digest, age_s=age)
        headers = [*gateway_headers(ctx), (b"age", str(int(age)).encode())]
        if not ctx.stream:
            body = json_bytes(entry.response)
            await send_bytes(send, 200, body, [*JSON_HEADERS, *headers])
            return
        await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]})
        for event in replay_events(ctx.endpoint, entry.response, include_usage=ctx.include_usage):
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": DONE, "more_body": False})

    async def _miss(self, scope: Scope, receive: Receive, send: Send, *, lead: bool) -> None:
        mw, key = self.mw, self.key
        event: anyio.Event | None = None
        token: str | None = None
        if lead:
            event = mw._flights[key.digest] = anyio.Event()
        try:
            if lead and isinstance(mw.store, FlightLockSupport):
                token, entry = await self._remote_flight(mw.store)
                if entry is not None:
                    await self._hit(entry, send)
                    return
            self.ctx.cache_status = "BYPASS" if self.controls.no_store else "MISS"
            capture = ResponseCapture(self.ctx, send)
            try:
                await mw.app(scope, receive, capture.send)
            except ClientDisconnected:
                # A disconnect noticed only after the last byte went out (servers report
                # one once the response is complete) still leaves a whole answer.
                if capture.finished and not self.controls.no_store:
                    await self._store(capture)
                raise
            if not self.controls.no_store:
                await self._store(capture)
        finally:
            if token is not None:
                try:
                    await mw.store.release_flight(key, token)  # type: ignore[attr-defined]
                except StoreError as exc:
                    logger.warning("cache lock release failed: %s", exc)
            if event is not None:
                mw._flights.pop(key.digest, None)
                event.set()

    async def _remote_flight(self, store: FlightLockSupport) -> tuple[str | None, Entry | None]:
        """Take the cross-replica lock, or wait for the replica that holds it.

        Returns ``(token, None)`` with the lock, ``(None, entry)`` when the other
        replica's answer arrived, ``(None, None)`` to go ahead alone (wait over, or the
        lock is unavailable).
        """
        wait_s = self.mw.policy.wait_s
        deadline = anyio.current_time() + wait_s
        try:
            while True:
                token = await store.acquire_flight(self.key, ttl_s=max(1.0, wait_s))
                if token is not None:
                    return token, None
                while await store.flight_held(self.key):
                    if anyio.current_time() >= deadline:
                        return None, None
                    await anyio.sleep(_POLL_S)
                entry = await self._lookup()
                if entry is not None or anyio.current_time() >= deadline:
                    return None, entry
        except StoreError as exc:
            logger.warning("cache lock unavailable, going ahead alone: %s", exc)
            return None, None

    async def _store(self, capture: ResponseCapture) -> None:
        ctx = self.ctx
        response = capture.result()
        if response is None or not is_complete(ctx.endpoint, response):
            return
        route = ctx.target.route if ctx.target is not None else None
        entry = Entry(ctx.endpoint, response, stored_at=self.mw.clock(), route=route)
        try:
            await self.mw.store.set(self.key, entry.encode(), ttl_s=self.ttl)
        except StoreError as exc:
            logger.warning("cache store unavailable, answer not stored: %s", exc)
