"""Admin: rows the ledger and audit writers quarantined (the database refused them).

* ``GET /admin/quarantine?writer=ledger|audit&org=…&after_id=…&limit=100`` →
  ``{"object": "list", "data": [{"id", "ts", "writer", "org", "error", "payload"}],
  "next_after_id": n | null}``, oldest first. ``payload`` is the row as JSON text (its
  spill-file line), to inspect and re-insert by hand.

An admin key bound to one org sees only that org's rows (a row with no org — an
unreadable spill line — only global admins see). Global admins also get ``writers``:
this process's counts per writer (``quarantined``; ``quarantined_to_file`` — rows that
could not even be stored in the table and went to a ``quarantine-*.jsonl`` file in the
spill directory).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_llm.admin._params import GLOBAL_ORG, org_scope
from asgi_llm.context import get_context
from asgi_llm.errors import InvalidRequestError
from asgi_llm.usage.quarantine import SQLQuarantineStore
from asgi_llm.usage.writer import BatchWriter

__all__ = ["quarantine_routes"]

_WRITERS = ("ledger", "audit")


def _int(raw: str | None, name: str, lo: int, hi: int) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise InvalidRequestError(f"'{name}' must be an integer from {lo} to {hi}.", param=name, code="invalid_value")
    return value


def quarantine_routes(store: SQLQuarantineStore, writers: Sequence[BatchWriter[Any]] = ()) -> list[Route]:
    """The routes to append to :attr:`BuildParts.admin_routes <asgi_llm.recipe.parts.BuildParts>`."""

    async def listing(request: Request) -> Response:
        q = request.query_params
        writer = q.get("writer") or None
        if writer is not None and writer not in _WRITERS:
            raise InvalidRequestError(f"'writer' must be one of {', '.join(_WRITERS)}.", param="writer",
                                      code="invalid_value")
        limit = _int(q.get("limit"), "limit", 1, 1000) or 100
        after = _int(q.get("after_id"), "after_id", 0, 2**63 - 1)
        rows = await store.rows(org=org_scope(request), writer=writer, after_id=after, limit=limit)
        ctx = get_context(request.scope)
        body: dict[str, Any] = {"object": "list", "data": rows,
                                "next_after_id": rows[-1]["id"] if len(rows) == limit else None}
        if ctx is not None and ctx.principal.org == GLOBAL_ORG:
            body["writers"] = {w.name: {"quarantined": w.stats.get("quarantined", 0),
                                        "quarantined_to_file": w.stats.get("quarantined_to_file", 0)}
                               for w in writers}
        headers = {"x-request-id": ctx.request_id} if ctx is not None else {}
        return JSONResponse(body, headers=headers)

    return [Route("/admin/quarantine", listing, methods=["GET"])]
