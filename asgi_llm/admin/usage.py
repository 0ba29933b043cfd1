"""Admin: usage reports from the ledger.

* ``GET /admin/usage?group_by=model,route,key,node,org,day&since=7d&until=…[&org=…][&format=csv]``
  → ``{"object": "usage.report", "group_by": [...], "since": ..., "until": ..., "data": [rows]}``;
  each row: the group columns, ``requests``, ``attempts``, ``prompt_tokens``,
  ``completion_tokens``, ``cached_tokens``, ``reasoning_tokens``, ``total_tokens``,
  ``cost_usd`` (decimal string), ``cache_hits``, ``saved_usd``, ``errors``,
  ``estimated_rows``, ``flagged_rows`` (rows whose values had to be bounded to be stored),
  ``p50_latency_ms``, ``p95_latency_ms``. CSV with ``format=csv`` or
  ``Accept: text/csv``.
* ``GET /admin/usage/compare?[prompt_hash=…]`` — the same prompt over different routes:
  cost and latency side by side.
* ``GET /admin/usage/top-prompts?by=cost|count&limit=10`` — the highest-impact inputs
  (prompt hashes; prompt text only for orgs that opted in).
* ``POST /admin/usage/flush[?timeout_s=10]`` — write the queued rows now (tests, before a
  report). Bounded: when the store does not take them within ``timeout_s`` (1–60, default
  10) it answers 503 ``store_unavailable``; the rows stay queued.

An admin key bound to one org sees only that org's rows.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_llm.admin._params import org_scope, parse_time, wants_csv
from asgi_llm.context import get_context
from asgi_llm.errors import InvalidRequestError
from asgi_llm.stores import StoreError
from asgi_llm.usage.store import GROUPS, SQLLedgerStore
from asgi_llm.usage.writer import BatchWriter

__all__ = ["FLUSH_TIMEOUT_S", "rows_to_csv", "usage_routes"]

FLUSH_TIMEOUT_S = 10
"""How long ``POST /admin/usage/flush`` (and the audit verification's flush) waits at most."""


def rows_to_csv(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows as CSV text with a header line."""
    cols = columns or (list(rows[0]) if rows else [])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _respond(request: Request, obj: str, rows: list[dict[str, Any]], **meta: Any) -> Response:
    ctx = get_context(request.scope)
    headers = {"x-request-id": ctx.request_id} if ctx is not None else {}
    if wants_csv(request):
        return Response(rows_to_csv(rows), media_type="text/csv; charset=utf-8", headers=headers)
    return JSONResponse({"object": obj, **meta, "data": rows}, headers=headers)


def _int(request: Request, name: str, default: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 1 <= value <= hi:
        raise InvalidRequestError(f"'{name}' must be an integer from 1 to {hi}.", param=name, code="invalid_value")
    return value


def usage_routes(store: SQLLedgerStore, writer: BatchWriter[Any] | None = None) -> list[Route]:
    """The routes to append to :attr:`BuildParts.admin_routes <asgi_llm.recipe.parts.BuildParts>`."""

    def window(request: Request) -> dict[str, Any]:
        return {"since": parse_time(request.query_params.get("since"), "since"),
                "until": parse_time(request.query_params.get("until"), "until"),
                "org": org_scope(request)}

    async def report(request: Request) -> Response:
        raw = request.query_params.get("group_by", "model")
        group_by = [g.strip() for g in raw.split(",") if g.strip()]
        unknown = [g for g in group_by if g not in GROUPS]
        if unknown:
            raise InvalidRequestError(f"Unknown group_by {', '.join(unknown)}; choose from {', '.join(GROUPS)}.",
                                      param="group_by", code="invalid_value")
        w = window(request)
        rows = await store.report(group_by=group_by, **w)
        return _respond(request, "usage.report", rows, group_by=group_by,
                        since=w["since"].isoformat() if w["since"] else None,
                        until=w["until"].isoformat() if w["until"] else None)

    async def compare(request: Request) -> Response:
        rows = await store.compare_routes(prompt_hash=request.query_params.get("prompt_hash") or None,
                                          min_routes=_int(request, "min_routes", 2, 100), **window(request))
        return _respond(request, "usage.route_comparison", rows)

    async def top_prompts(request: Request) -> Response:
        by = request.query_params.get("by", "cost")
        if by not in ("cost", "count"):
            raise InvalidRequestError("'by' must be cost or count.", param="by", code="invalid_value")
        rows = await store.top_prompts(by=by, limit=_int(request, "limit", 10, 1000), **window(request))
        return _respond(request, "usage.top_prompts", rows, by=by)

    async def flush(request: Request) -> Response:
        timeout_s = _int(request, "timeout_s", FLUSH_TIMEOUT_S, 60)
        if writer is not None and not await writer.flush(timeout_s=timeout_s):
            raise StoreError(f"The ledger store did not take the queued rows within {timeout_s} s "
                             f"({writer.backlog} waiting; last error: {writer.stats['last_error']}). "
                             "They stay queued and are retried; nothing is lost.")
        return JSONResponse({"object": "usage.flush", "backlog": writer.backlog if writer else 0})

    return [
        Route("/admin/usage", report, methods=["GET"]),
        Route("/admin/usage/compare", compare, methods=["GET"]),
        Route("/admin/usage/top-prompts", top_prompts, methods=["GET"]),
        Route("/admin/usage/flush", flush, methods=["POST"]),
    ]
