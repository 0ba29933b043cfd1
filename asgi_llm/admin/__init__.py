"""The admin API (``/admin/...``) and the node API (``/nodes/...``).

Capabilities register Starlette routes on :class:`BuildParts.admin_routes
<asgi_llm.stack.BuildParts>` / ``node_routes`` while the gateway is built; this app
routes to them. Handlers raise :class:`~asgi_llm.errors.GatewayError` for failures —
the error layer renders them in OpenAI's shape like any other.

Access: ``/admin/...`` needs a principal with the ``admin`` scope. With no auth layer
configured the admin API is closed (403) rather than open to anyone who can reach the
port. ``/nodes/...`` routes authenticate node credentials themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute, Router
from starlette.types import Receive, Scope, Send

from asgi_llm.context import ANONYMOUS, get_context
from asgi_llm.errors import NotFoundError, PermissionDeniedError

__all__ = ["AdminApp"]


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    raise NotFoundError(f"No such endpoint: {scope['method']} {scope.get('path', '')}.")


class AdminApp:
    """Dispatch ``/admin/...`` and ``/nodes/...`` to registered routes."""

    def __init__(self, *, admin_routes: Sequence[BaseRoute] = (), node_routes: Sequence[BaseRoute] = ()) -> None:
        self.admin = Router(routes=list(admin_routes), default=_not_found)
        self.nodes = Router(routes=list(node_routes), default=_not_found)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = get_context(scope)
        assert ctx is not None
        if ctx.endpoint == "admin":
            principal = ctx.principal
            if principal is ANONYMOUS:
                raise PermissionDeniedError(
                    "The admin API is closed: configure auth.admin_keys in the recipe and call it with an admin key."
                )
            if not principal.has_scope("admin"):
                raise PermissionDeniedError("This key does not have the admin scope.")
            await self.admin(_relative(scope, ctx.path), receive, send)
        else:
            await self.nodes(_relative(scope, ctx.path), receive, send)


def _relative(scope: Scope, path: str) -> Scope:
    # Route on the mount-relative path so a gateway mounted at /llm still matches /admin/...
    # "app" makes Starlette raise HTTPException (405 on a wrong method) instead of
    # answering plain text; the error layer renders it in OpenAI's shape.
    return {**scope, "path": path, "root_path": "", "app": _ROUTER_APP}


_ROUTER_APP = object()
