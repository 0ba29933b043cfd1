"""AuthMiddleware: a bearer key → the request's :class:`~asgi_llm.context.Principal`.

The key comes from ``Authorization: Bearer <key>`` (OpenAI's SDKs) or ``x-api-key``
(Anthropic-style clients). What each endpoint needs:

| endpoint | needs |
|---|---|
| ``/healthz``, ``/readyz`` | nothing (always open) |
| inference (``/v1/chat/completions`` …), ``GET /v1/models`` | a key with the ``inference`` scope |
| ``/admin/...`` | a key with the ``admin`` scope |
| ``/nodes/...`` | a key with the ``node`` scope, or a credential the node routes check themselves |
| anything else (a host app's own routes) | untouched |

The key is checked from the headers alone: no byte of an inference body is read before
it is accepted (the body is then read, parsed and validated by
:func:`~asgi_llm.middleware.context.ensure_body`), so an unauthenticated caller cannot
make the gateway buffer or parse anything.

Missing, malformed, unknown, expired and revoked keys are 401s in OpenAI's shape; a
key without the scope an endpoint needs is a 403. A model outside the key's allow-list
is a 404 ``model_not_found`` word for word like a model that is not configured, so a
key cannot probe what other keys may use. Keys never appear in messages or logs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_llm.errors import AuthenticationError, ModelNotFoundError, PermissionDeniedError
from asgi_llm.auth.presented import presented_key
from asgi_llm.request import ensure_body, ensure_context

if TYPE_CHECKING:
    from asgi_llm.auth.keyring import KeyRing

__all__ = ["INJECTED_PRINCIPAL", "AuthMiddleware", "model_not_found"]

INJECTED_PRINCIPAL = "asgi_llm.injected_principal"
"""Scope key under which in-process callers (the console, replaying a signed-in admin's
request) hand auth an already-verified principal instead of a bearer key. Only code in
the process can set a scope key: an HTTP client cannot. The scope checks still apply."""

_MISSING = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def model_not_found(model: str) -> ModelNotFoundError:
    """The 404 for a model that is not configured *or* not allowed (identical on purpose)."""
    return ModelNotFoundError(
        f"The model '{model}' does not exist or you do not have access to it. "
        "GET /v1/models lists the models you can use.",
        param="model",
    )


class AuthMiddleware:
    """Authenticate the caller and set ``ctx.principal``.

    Args:
        app: the next ASGI app.
        keys: resolves presented keys (recipe keys and stored keys).

    Example:
        >>> app = AuthMiddleware(app, keys=KeyRing(static=[("sk-team-a-123", Principal("k1", "team-a"))]))
    """

    def __init__(self, app: ASGIApp, *, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx, receive = await ensure_context(scope, receive, body=False)
        endpoint = ctx.endpoint
        if endpoint in ("health", "other"):
            await self.app(scope, receive, send)
            return
        if endpoint == "nodes":
            # Node routes also accept credentials of their own (enrollment tokens, node
            # credentials): a key we do not know is theirs to judge.
            token = presented_key(scope)
            if token is not None:
                try:
                    principal = await self.keys.authenticate(token)
                except AuthenticationError:
                    principal = None
                if principal is not None:
                    if not principal.has_scope("node"):
                        raise PermissionDeniedError("This key cannot be used for node endpoints (it lacks the 'node' scope).")
                    ctx.principal = principal
            await self.app(scope, receive, send)
            return
        principal = scope.get(INJECTED_PRINCIPAL)
        if principal is None:
            token = presented_key(scope)
            if token is None:
                raise AuthenticationError(_MISSING, code="missing_api_key")
            principal = await self.keys.authenticate(token)
        if endpoint == "admin":
            if not principal.has_scope("admin"):
                raise PermissionDeniedError("This key does not have the admin scope.")
        elif not principal.has_scope("inference"):
            raise PermissionDeniedError(
                "This key cannot be used for inference (it lacks the 'inference' scope); use an inference key."
            )
        ctx.principal = principal
        if ctx.is_inference:
            receive = await ensure_body(scope, receive)  # only now: the key is good
            if ctx.model is not None and not principal.allows_model(ctx.model):
                raise model_not_found(ctx.model)
        await self.app(scope, receive, send)
