"""ContextMiddleware: one RequestContext per request, made from its headers; the body
read, parsed and validated once — after authentication when auth is configured.

For the gateway's own paths it classifies the request (``chat``, ``completions``,
``embeddings``, ``models``, ``health``) from its method and path and stores a
:class:`~asgi_llm.context.RequestContext` at ``scope["asgi_llm"]`` before calling the
next layer. The body of an inference request is read by one helper, :func:`~asgi_llm.request.ensure_body`:
under a size limit, a total read timeout and the process's in-flight body budget, then
parsed (:func:`~asgi_llm.schemas.parse_json`) and validated once. Inner layers get a
``receive`` that replays it, so host code that reads it again still works.

When the stack has an auth layer (``hold_body_for_auth=True``, which
:func:`~asgi_llm.stack.compose` sets), no byte of the body is read before the key is
accepted: :class:`~asgi_llm.middleware.auth.AuthMiddleware` calls :func:`ensure_body`
once it has a principal (and ``compose`` puts :class:`LoadBody` just inside whatever
auth layer it is given), and layers outside it see a context without a payload yet.
Without auth the body is read here, up front. Every layer calls :func:`ensure_context`,
which also reads the body when nothing holds it, so each one works standalone too.

Admin and node paths get the same limits on a guarded ``receive`` (their routes read
their own bodies). Paths that are not the gateway's (a host app's own routes) pass
through untouched: no body is read.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_llm._asgi import BodyBudget, BodyReservation, guard_receive
from asgi_llm.context import SCOPE_KEY
from asgi_llm.request import (
    DEFAULT_BODY_READ_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_INFLIGHT_BODY_BYTES,
    BodyState,
    classify,
    ensure_body,
    ensure_context,
    new_context,
)

__all__ = [
    "DEFAULT_BODY_READ_TIMEOUT_S",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_INFLIGHT_BODY_BYTES",
    "ContextMiddleware",
    "LoadBody",
    "classify",
    "ensure_body",
    "ensure_context",
]


class ContextMiddleware:
    """Create the request's :class:`RequestContext` once, for every layer inside.

    Args:
        app: the next ASGI app.
        max_body_bytes: larger bodies get a 413 before they are read whole.
        body_read_timeout_s: a body not received within this many seconds gets a 408
            (``None``: no limit).
        max_inflight_body_bytes: the process's budget of request-body bytes held at
            once; past it, a request gets a 503 with ``Retry-After`` (``None``: no budget).
        hold_body_for_auth: read an inference body only once an auth layer inside
            has accepted the key (set when the stack has one).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_read_timeout_s: float | None = DEFAULT_BODY_READ_TIMEOUT_S,
        max_inflight_body_bytes: int | None = DEFAULT_MAX_INFLIGHT_BODY_BYTES,
        hold_body_for_auth: bool = False,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s
        self.budget = BodyBudget(max_inflight_body_bytes) if max_inflight_body_bytes is not None else None
        self.hold_body_for_auth = hold_body_for_auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if SCOPE_KEY in scope:
            raise RuntimeError(
                "ContextMiddleware ran twice for one request: the gateway stack already "
                "includes it. Add it once (build_gateway() does this for you)."
            )
        state = BodyState(
            max_bytes=self.max_body_bytes,
            timeout_s=self.body_read_timeout_s,
            reservation=BodyReservation(self.budget),
        )
        try:
            ctx = new_context(scope, state)
            if ctx.is_inference:
                state.held = self.hold_body_for_auth
                if not state.held:
                    receive = await ensure_body(scope, receive)
            elif ctx.endpoint in ("admin", "nodes"):
                receive = guard_receive(
                    scope, receive, limit=self.max_body_bytes, timeout_s=self.body_read_timeout_s,
                    reservation=state.reservation,
                )
            await self.app(scope, receive, send)
        finally:
            state.reservation.release()


class LoadBody:
    """Read the inference body (lifting the hold) before calling ``app``.

    :func:`~asgi_llm.stack.compose` puts it just inside the auth layer, so the body is
    read once the caller is authenticated whichever auth layer a stack uses.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            receive = await ensure_body(scope, receive)
        await self.app(scope, receive, send)
