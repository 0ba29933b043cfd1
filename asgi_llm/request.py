"""The request's context and body, read once: :func:`ensure_context` and :func:`ensure_body`.

Core vocabulary every layer uses (it sits with :mod:`asgi_llm.context`, below all
layers): the :class:`~asgi_llm.context.RequestContext` is made from the request line and
headers, and an inference body is read under a size limit, a total read timeout and the
process's in-flight body budget, then parsed (:func:`~asgi_llm.schemas.parse_json`) and
validated once. :class:`~asgi_llm.middleware.context.ContextMiddleware` and
:class:`~asgi_llm.middleware.context.LoadBody` drive these in a composed gateway; a layer
used alone in a host app calls :func:`ensure_context` itself.
"""

from __future__ import annotations

import re

from starlette.types import Receive, Scope

from asgi_llm._asgi import get_header, read_body, replay_receive, route_path
from asgi_llm.context import (
    DEFAULT_BODY_READ_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_INFLIGHT_BODY_BYTES,
    SCOPE_KEY,
    BodyState,
    Endpoint,
    RequestContext,
    new_request_id,
)
from asgi_llm.errors import InvalidRequestError, MethodNotAllowedError
from asgi_llm.schemas import parse_json, validate_payload

__all__ = [
    "DEFAULT_BODY_READ_TIMEOUT_S",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_INFLIGHT_BODY_BYTES",
    "BodyState",
    "body_state",
    "classify",
    "ensure_body",
    "ensure_context",
    "new_context",
]


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


def new_context(scope: Scope, state: BodyState) -> RequestContext:
    """The context from the request line and headers alone (no body byte read)."""
    path = route_path(scope)
    endpoint, method = classify(path)
    incoming = get_header(scope, b"x-request-id")
    request_id = incoming.decode() if incoming and _REQUEST_ID.fullmatch(incoming) else new_request_id()
    ctx = RequestContext(request_id=request_id, endpoint=endpoint, method=scope["method"], path=path)
    ctx.body_state = state
    # Stored before anything can fail, so error responses carry the request id too.
    scope[SCOPE_KEY] = ctx
    if method is not None and scope["method"] != method:
        if not (method == "GET" and scope["method"] == "HEAD"):
            raise MethodNotAllowedError(
                f"{scope['method']} is not allowed on {path}; use {method}.",
                headers={"allow": method},
            )
    return ctx


def body_state(ctx: RequestContext) -> BodyState:
    """The context's body state (made for a context built by hand: tests, host code)."""
    if ctx.body_state is None:
        ctx.body_state = BodyState(loaded=bool(ctx.payload))
    return ctx.body_state


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
        ctx = new_context(scope, BodyState(max_bytes=max_body_bytes))
    if body and ctx.is_inference:
        state = body_state(ctx)
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
    state = body_state(ctx)
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
    ctx.request = validate_payload(ctx.endpoint, payload)
    ctx.body = body
    ctx.payload = payload
    ctx.model = payload["model"]
    ctx.stream = payload.get("stream") is True and ctx.endpoint != "embeddings"
    opts = payload.get("stream_options")
    ctx.include_usage = ctx.stream and isinstance(opts, dict) and opts.get("include_usage") is True
