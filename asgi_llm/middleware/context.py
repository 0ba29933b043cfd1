"""ContextMiddleware: read the body once, validate it once, share one RequestContext.

For the gateway's own paths it classifies the request (``chat``, ``completions``,
``embeddings``, ``models``, ``health``), reads an inference body under a size limit,
parses and validates it once, and stores a :class:`~asgi_llm.context.RequestContext`
at ``scope["asgi_llm"]`` before calling the next layer. Inner layers get a ``receive``
that replays the body, so host code that reads it again still works. Paths that are not
the gateway's (a host app's own routes) pass through untouched: no body is read.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_llm._asgi import get_header, read_body, replay_receive, route_path
from asgi_llm.context import SCOPE_KEY, Endpoint, RequestContext, new_request_id
from asgi_llm.errors import InvalidRequestError, MethodNotAllowedError
from asgi_llm.schemas import validate_payload

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ContextMiddleware", "classify", "ensure_context"]

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

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


async def ensure_context(scope: Scope, receive: Receive, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> tuple[RequestContext, Receive]:
    """Return the request's context, creating it (and reading the body) if needed.

    This is the one helper every middleware uses, so each one also works alone in a
    host app without :class:`ContextMiddleware` in front of it.
    """
    ctx: RequestContext | None = scope.get(SCOPE_KEY)
    if ctx is not None:
        return ctx, receive
    path = route_path(scope)
    endpoint, method = classify(path)
    incoming = get_header(scope, b"x-request-id")
    request_id = incoming.decode() if incoming and _REQUEST_ID.fullmatch(incoming) else new_request_id()
    ctx = RequestContext(request_id=request_id, endpoint=endpoint, method=scope["method"], path=path)
    # Stored before anything can fail, so error responses carry the request id too.
    scope[SCOPE_KEY] = ctx
    if method is not None and scope["method"] != method:
        if not (method == "GET" and scope["method"] == "HEAD"):
            raise MethodNotAllowedError(
                f"{scope['method']} is not allowed on {path}; use {method}.",
                headers={"allow": method},
            )
    if ctx.is_inference:
        body = await read_body(scope, receive, limit=max_body_bytes)
        _parse_into(ctx, body)
        receive = replay_receive(body, receive)
    return ctx, receive


def _parse_into(ctx: RequestContext, body: bytes) -> None:
    if not body.strip():
        raise InvalidRequestError(
            "The request body is empty; send a JSON object (see the API reference for this endpoint).",
            code="invalid_request_body",
        )
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"The request body is not valid JSON: {exc}.",
            code="invalid_json",
        ) from None
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
        max_body_bytes: larger inference bodies get a 413 before they are read whole.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if SCOPE_KEY in scope:
            raise RuntimeError(
                "ContextMiddleware ran twice for one request: the gateway stack already "
                "includes it. Add it once (build_gateway() does this for you)."
            )
        _ctx, receive = await ensure_context(scope, receive, max_body_bytes=self.max_body_bytes)
        await self.app(scope, receive, send)
