"""The admin API (``/admin/...``) and the node API (``/nodes/...``).

Capabilities register Starlette routes on :class:`BuildParts.admin_routes
<asgi_llm.recipe.parts.BuildParts>` / ``node_routes`` while the gateway is built; this app
routes to them. Handlers raise :class:`~asgi_llm.errors.GatewayError` for failures —
the error layer renders them in OpenAI's shape like any other.

Access: ``/admin/...`` needs a principal with the ``admin`` scope. With no auth layer
configured the admin API is closed (403) rather than open to anyone who can reach the
port. ``/nodes/...`` routes authenticate node credentials themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.routing import BaseRoute, Match, Route
from starlette.types import Receive, Scope, Send

from asgi_llm.context import ANONYMOUS, get_context
from asgi_llm.errors import MethodNotAllowedError, NotFoundError, PermissionDeniedError

__all__ = ["AdminApp", "RouteTable"]


class RouteTable:
    """Starlette routes, matched in order; no match is our own 404 and a path that exists
    with another method our own 405 (with ``Allow``), both raised as
    :class:`~asgi_llm.errors.GatewayError` for the error layer to render in OpenAI's shape."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self.routes = list(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        allowed: set[str] = set()
        for route in self.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                await route.handle({**scope, **child}, receive, send)
                return
            if match is Match.PARTIAL and isinstance(route, Route) and route.methods:
                allowed |= route.methods
        if allowed:
            methods = ", ".join(sorted(allowed))
            raise MethodNotAllowedError(f"{scope['method']} is not allowed on {scope.get('path', '')}; use {methods}.",
                                        headers={"allow": methods})
        raise NotFoundError(f"No such endpoint: {scope['method']} {scope.get('path', '')}.")


class AdminApp:
    """Dispatch ``/admin/...`` and ``/nodes/...`` to registered routes."""

    def __init__(self, *, admin_routes: Sequence[BaseRoute] = (), node_routes: Sequence[BaseRoute] = ()) -> None:
        self.admin = RouteTable(admin_routes)
        self.nodes = RouteTable(node_routes)

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
    return {**scope, "path": path, "root_path": ""}
