"""Admin: the audit log.

* ``GET /admin/audit?since&until&org&actor&kind&action&verdict&model&request_id&after_seq&limit``
  → ``{"object": "list", "data": [events], "next_after_seq": n | null}`` in chain order
  (``action`` matches a prefix, e.g. ``POST /admin/keys``). CSV with ``format=csv``.
* ``GET /admin/audit/verify`` → the chain check: ``{"ok", "events", "head_seq",
  "head_hash", "first_break": {"seq", "reason"} | null}``. Global admins only (the
  chain spans every org).

An admin key bound to one org sees only that org's events.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_llm.admin._params import GLOBAL_ORG, org_scope, parse_time, wants_csv
from asgi_llm.admin.usage import FLUSH_TIMEOUT_S, rows_to_csv
from asgi_llm.audit.store import SQLAuditStore
from asgi_llm.context import get_context
from asgi_llm.errors import InvalidRequestError, PermissionDeniedError
from asgi_llm.usage.writer import BatchWriter

__all__ = ["audit_routes"]


def audit_routes(store: SQLAuditStore, writer: BatchWriter[Any] | None = None) -> list[Route]:
    """The routes to append to :attr:`BuildParts.admin_routes <asgi_llm.recipe.parts.BuildParts>`."""

    async def events(request: Request) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", "100"))
            after = int(q["after_seq"]) if q.get("after_seq") else None
        except ValueError:
            raise InvalidRequestError("'limit' and 'after_seq' must be integers.", code="invalid_value") from None
        if not 1 <= limit <= 10_000:
            raise InvalidRequestError("'limit' must be from 1 to 10000.", param="limit", code="invalid_value")
        if after is not None and not 0 <= after < 2**63:  # a store's integer column holds no more
            raise InvalidRequestError("'after_seq' must be an integer from 0 to 9223372036854775807.",
                                      param="after_seq", code="invalid_value")
        found = await store.query(
            since=parse_time(q.get("since"), "since"), until=parse_time(q.get("until"), "until"),
            org=org_scope(request), actor=q.get("actor") or None, kind=q.get("kind") or None,
            action=q.get("action") or None, verdict=q.get("verdict") or None, model=q.get("model") or None,
            request_id=q.get("request_id") or None, after_seq=after, limit=limit,
        )
        rows = [e.to_api() for e in found]
        ctx = get_context(request.scope)
        headers = {"x-request-id": ctx.request_id} if ctx else {}
        if wants_csv(request):
            return Response(rows_to_csv(rows), media_type="text/csv; charset=utf-8", headers=headers)
        nxt = rows[-1]["seq"] if len(rows) == limit else None
        return JSONResponse({"object": "list", "data": rows, "next_after_seq": nxt}, headers=headers)

    async def verify(request: Request) -> Response:
        ctx = get_context(request.scope)
        if ctx is None or ctx.principal.org != GLOBAL_ORG:
            raise PermissionDeniedError("Verifying the audit chain needs a global admin key (org '*').")
        if writer is not None:
            await writer.flush(timeout_s=FLUSH_TIMEOUT_S)  # bounded: a store that is out fails the verify below
        return JSONResponse({"object": "audit.verification", **(await store.verify()).to_api()})

    return [Route("/admin/audit", events, methods=["GET"]), Route("/admin/audit/verify", verify, methods=["GET"])]
