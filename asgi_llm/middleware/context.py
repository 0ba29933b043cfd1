"""ContextMiddleware: one RequestContext per request, made from its headers; the body
read, parsed and validated once — after authentication when auth is configured.

For the gateway's own paths it classifies the request (``chat``, ``completions``,
``embeddings``, ``models``, ``health``) from its method and path and stores a
:class:`~asgi_llm.context.RequestContext` at ``scope["asgi_llm"]`` before calling the
next layer. The body of an inference request is read by one helper, :func:`ensure_body`:
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

import re
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_llm._asgi import BodyBudget, BodyReservation, get_header, guard_receive, read_body, replay_receive, route_path
from asgi_llm.context import SCOPE_KEY, Endpoint, RequestContext, new_request_id
from asgi_llm.errors import InvalidRequestError, MethodNotAllowedError
from asgi_llm.schemas import parse_json, validate_payload

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

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_INFLIGHT_BODY_BYTES = 256 * 1024 * 1024
DEFAULT_BODY_READ_TIMEOUT_S = 60.0

# Path → (endpoint, allowed method). Both /v1/... and the bare form are accepted, as
# clients configured with a base URL without /v1 send the latter.
_ROUTES: dict[str, tuple[Endpoint, str]] = {}
for _path, _route in {
    "/chat/completions": ("chat", "POST"),
    "/completions": ("completions", "POST"),
    "/embeddings": ("embeddings", "POST"),
    "/models": ("models", "GET"),
}.items():
    _ROUTES["/v1" + _path] = _route  # type: ignore[assignment]
    _ROUTES[_path] = _route  # type: ignore[assignment]
_ROUTES["/healthz"] = ("health", "GET")
_ROUTES["/readyz"] = ("health", "GET")

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_BODY_KEY = "asgi_llm.body"  # ctx.state key of the request's _BodyState


@dataclass(slots=True)
class _BodyState:
    """How (and whether yet) this request's body is read. Lives in ``ctx.state``."""

    max_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout_s: float | None = DEFAULT_BODY_READ_TIMEOUT_S
    reservation: BodyReservation = field(default_factory=lambda: BodyReservation(None))
    held: bool = False  # True until auth has accepted the key
    loaded: bool = False


def classify(path: str) -> tuple[Endpoint, str | None]:
    """The endpoint a path belongs to, and its method (``("other", None)`` if not ours)."""
    route = _ROUTES.get(path)
    if route is not None:
        return route
    if path.startswith(("/v1/models/", "/models/")):
        return "models", "GET"
    if path.startswith("/admin/"):
        return "admin", None
    if path.startswith("/nodes/"):
        return "nodes", None
    return "other", None


def _new_context(scope: Scope, state: _BodyState) -> RequestContext:
    """The context from the request line and headers alone (no body byte read)."""
    path = route_path(scope)
    endpoint, method = classify(path)
    incoming = get_header(scope, b"x-request-id")
    request_id = incoming.decode() if incoming and _REQUEST_ID.fullmatch(incoming) else new_request_id()
    ctx = RequestContext(request_id=request_id, endpoint=endpoint, method=scope["method"], path=path)
    ctx.state[_BODY_KEY] = state
    # Stored before anything can fail, so error responses carry the request id too.
    scope[SCOPE_KEY] = ctx
    if method is not None and scope["method"] != method:
        if not (method == "GET" and scope["method"] == "HEAD"):
            raise MethodNotAllowedError(
                f"{scope['method']} is not allowed on {path}; use {method}.",
                headers={"allow": method},
            )
    return ctx


def _body_state(ctx: RequestContext) -> _BodyState:
    state = ctx.state.get(_BODY_KEY)
    if state is None:  # a context made by hand (tests, host code)
        state = ctx.state[_BODY_KEY] = _BodyState(loaded=bool(ctx.payload))
    return state  # type: ignore[no-any-return]


async def ensure_context(
    scope: Scope,
    receive: Receive,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body: bool = True,
) -> tuple[RequestContext, Receive]:
    """Return the request's context, creating it from the headers if needed.

    With ``body=True`` (what layers that use the payload want) an inference body is
    also read and parsed, unless it is held for authentication — then the auth layer
    reads it once the key is accepted. ``body=False`` never reads it (what layers
    outside auth use). This is the one helper every middleware uses, so each one also
    works alone in a host app without :class:`ContextMiddleware` in front of it.
    """
    ctx: RequestContext | None = scope.get(SCOPE_KEY)
    if ctx is None:
        ctx = _new_context(scope, _BodyState(max_bytes=max_body_bytes))
    if body and ctx.is_inference:
        state = _body_state(ctx)
        if not state.loaded and not state.held:
            receive = await ensure_body(scope, receive)
    return ctx, receive


async def ensure_body(scope: Scope, receive: Receive) -> Receive:
    """Read, parse and validate the inference body once (a no-op if already done).

    Sets ``ctx.body``, ``payload``, ``model``, ``stream`` and ``include_usage``, and
    returns a ``receive`` that replays the body to inner apps. Called by the auth layer
    after the key is accepted (which also lifts the hold), or by :func:`ensure_context`.
    """
    ctx: RequestContext | None = scope.get(SCOPE_KEY)
    if ctx is None:
        ctx, receive = await ensure_context(scope, receive, body=False)
    state = _body_state(ctx)
    state.held = False
    if state.loaded or not ctx.is_inference:
        return receive
    state.loaded = True  # one attempt per request, whatever its outcome
    raw = await read_body(scope, receive, limit=state.max_bytes, timeout_s=state.timeout_s, reservation=state.reservation)
    _parse_into(ctx, raw)
    return replay_receive(raw, receive)


def _parse_into(ctx: RequestContext, body: bytes) -> None:
    if not body.strip():
        raise InvalidRequestError(
            "The request body is empty; send a JSON object (see the API reference for this endpoint).",
            code="invalid_request_body",
        )
    payload = parse_json(body)
    validate_payload(ctx.endpoint, payload)
    ctx.body = body
    ctx.payload = payload
    ctx.model = payload["model"]
    ctx.stream = payload.get("stream") is True and ctx.endpoint != "embeddings"
    opts = payload.get("stream_options")
    ctx.include_usage = ctx.stream and isinstance(opts, dict) and opts.get("include_usage") is True


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
        state = _BodyState(
            max_bytes=self.max_body_bytes,
            timeout_s=self.body_read_timeout_s,
            reservation=BodyReservation(self.budget),
        )
        try:
            ctx = _new_context(scope, state)
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
