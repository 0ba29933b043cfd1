"""Admin: purge the response cache.

``DELETE /admin/cache?org=acme&model=chat`` deletes the entries of an org, of a public
model, or both; ``?all=true`` deletes everything. An admin key bound to one org (any
org but ``*``) can only purge that org's entries, and purges its own org by default.
Answers ``{"object": "cache.purge", "org": ..., "model": ..., "purged": n}``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_llm.context import get_context
from asgi_llm.errors import InvalidRequestError, PermissionDeniedError
from asgi_llm.stores.cache import CacheStore

__all__ = ["cache_admin_routes"]

GLOBAL_ORG = "*"


def cache_admin_routes(store: CacheStore) -> list[Route]:
    """The routes to append to :attr:`BuildParts.admin_routes <asgi_llm.recipe.parts.BuildParts>`."""

    async def purge(request: Request) -> Response:
        ctx = get_context(request.scope)
        assert ctx is not None
        org = request.query_params.get("org") or None
        model = request.query_params.get("model") or None
        everything = request.query_params.get("all", "").lower() in ("1", "true", "yes")
        own = ctx.principal.org
        if own != GLOBAL_ORG:
            if org is None:
                org = own
            elif org != own:
                raise PermissionDeniedError(f"This admin key may only purge the cache of org '{own}'.")
        if org is None and model is None and not everything:
            raise InvalidRequestError(
                "Say what to purge: DELETE /admin/cache?org=<org>&model=<model> (either or both), or ?all=true.",
                code="missing_required_parameter",
            )
        purged = await store.purge(org=org, model=model)
        return JSONResponse(
            {"object": "cache.purge", "org": org, "model": model, "purged": purged},
            headers={"x-request-id": ctx.request_id},
        )

    return [Route("/admin/cache", purge, methods=["DELETE"])]
