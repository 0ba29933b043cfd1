"""The ledger store: batched idempotent inserts and the report queries.

:class:`LedgerStore` is the seam; :class:`SQLLedgerStore` implements it on SQLite and
PostgreSQL with SQLAlchemy Core (sync engine in worker threads, see
:class:`~asgi_llm.stores.sql.SQLDatabase`). The schema is the Alembic revisions
``0002_ledger_audit`` and ``0004_quarantine`` (``flags``).
"""

from __future__ import annotations

import datetime as dt
import math
import operator
from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa

from asgi_llm.usage.records import LedgerRow, from_pico, to_pico, usd_text

if TYPE_CHECKING:
    from asgi_llm.stores.sql import SQLDatabase

__all__ = ["GROUPS", "LedgerStore", "SQLLedgerStore", "ledger_table", "percentile"]

metadata = sa.MetaData()

ledger_table = sa.Table(
    "usage_ledger",
    metadata,
    sa.Column("attempt_id", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("ts", sa.DateTime(), nullable=False),
    sa.Column("day", sa.String(10), nullable=False),
    sa.Column("org", sa.String(200), nullable=False),
    sa.Column("key_id", sa.String(200), nullable=False),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("route", sa.String(400), nullable=False),
    sa.Column("provider", sa.String(200), nullable=False),
    sa.Column("node", sa.String(200)),
    sa.Column("upstream_model", sa.String(200), nullable=False),
    sa.Column("response_model", sa.String(200)),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("endpoint", sa.String(32), nullable=False),
    sa.Column("stream", sa.Boolean(), nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
    sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
    sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
    sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
    sa.Column("estimated", sa.Boolean(), nullable=False),
    sa.Column("cost_pico", sa.BigInteger(), nullable=False),
    sa.Column("saved_pico", sa.BigInteger(), nullable=False),
    sa.Column("price_source", sa.String(32), nullable=False),
    sa.Column("latency_ms", sa.Float(), nullable=False),
    sa.Column("ttft_ms", sa.Float()),
    sa.Column("status", sa.Integer(), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error_code", sa.String(100)),
    sa.Column("cache_status", sa.String(16), nullable=False),
    sa.Column("prompt_hash", sa.String(64)),
    sa.Column("prompt_text", sa.Text()),
    sa.Column("flags", sa.String(64)),  # 0004_quarantine: what records.bounded() changed
)

# The INSERT lists the derived columns first, then the ones copied from the row's fields
# by name, so a row's values are four conversions and one attrgetter call (C) — the
# writer thread competes with the event loop for the GIL.
_DERIVED = ("ts", "day", "cost_pico", "saved_pico")
_COPIED = tuple(c.name for c in ledger_table.columns if c.name not in _DERIVED)
_copied_values = operator.attrgetter(*_COPIED)
_INSERT_COLUMNS = ", ".join((*_DERIVED, *_COPIED))
_INSERT_SQL_SQLITE = (f"INSERT INTO usage_ledger ({_INSERT_COLUMNS}) VALUES ({', '.join('?' for _ in ledger_table.columns)}) "
                      "ON CONFLICT (attempt_id) DO NOTHING")
_INSERT_SQL_PG = (f"INSERT INTO usage_ledger ({_INSERT_COLUMNS}) VALUES ({', '.join('%s' for _ in ledger_table.columns)}) "
                  "ON CONFLICT (attempt_id) DO NOTHING")


def _row_values(row: LedgerRow, sqlite: bool) -> tuple[Any, ...]:
    """The values of :meth:`LedgerRow.to_db`, in ``_INSERT_COLUMNS`` order."""
    utc = row.ts.astimezone(dt.UTC)
    # "YYYY-MM-DD HH:MM:SS.ffffff": the text SQLAlchemy's SQLite DateTime reads back (and
    # no deprecated adapter) for SQLite, and the day for both.
    text = utc.isoformat(" ", "microseconds")[:26]
    ts = text if sqlite else utc.replace(tzinfo=None)
    return (ts, text[:10], to_pico(row.cost_usd), to_pico(row.saved_usd), *_copied_values(row))


_T = ledger_table.c
GROUPS: dict[str, sa.ColumnElement[Any]] = {
    "model": _T.model,
    "route": _T.route,
    "key": _T.key_id,
    "node": _T.node,
    "org": _T.org,
    "day": _T.day,
    "provider": _T.provider,
    "upstream_model": _T.upstream_model,
    "status": _T.status,
    "outcome": _T.outcome,
}
"""``group_by`` names accepted by reports → ledger columns."""

_SERVED = ("ok", "cache_hit")


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (as PostgreSQL ``percentile_cont``)."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class LedgerStore(Protocol):
    """Where ledger rows are kept. Inserts are idempotent on ``attempt_id``."""

    async def insert_many(self, rows: Sequence[LedgerRow]) -> None:
        """Insert rows in one transaction; rows whose ``attempt_id`` exists are skipped.

        Raises :class:`~asgi_llm.stores.StoreError` when the store is unreachable (the
        batch writer keeps the batch and retries).
        """
        ...

    async def report(self, *, group_by: Sequence[str], since: dt.datetime | None = None,
                     until: dt.datetime | None = None, org: str | None = None) -> list[dict[str, Any]]:
        """Aggregates per group: requests, attempts, tokens, cost, cache hits/saved, errors, p50/p95."""
        ...


def _naive_utc(t: dt.datetime | None) -> dt.datetime | None:
    if t is None or t.tzinfo is None:
        return t
    return t.astimezone(dt.UTC).replace(tzinfo=None)


def _where(since: dt.datetime | None, until: dt.datetime | None, org: str | None, **eq: Any) -> list[Any]:
    cond: list[Any] = []
    if since is not None:
        cond.append(_T.ts >= _naive_utc(since))
    if until is not None:
        cond.append(_T.ts < _naive_utc(until))
    if org is not None:
        cond.append(_T.org == org)
    for name, value in eq.items():
        if value is not None:
            cond.append(_T[name] == value)
    return cond


def _usd(pico: Any) -> str:
    return usd_text(from_pico(pico))


_SPLIT = 10**6


def _pico_sums(sqlite: bool, *names: str) -> list[Any]:
    """Exact sums of pico columns that cannot overflow.

    PostgreSQL sums BIGINT into NUMERIC. SQLite's ``sum()`` of integers raises "integer
    overflow" past 2**63 — ten rows at the per-row cost cap — which would make every
    report of an org fail: there each column is summed as its millions and its
    remainder (``<name>_hi``, ``<name>_lo``), put together by :func:`_pico_total`.
    """
    cols: list[Any] = []
    for name in names:
        col = _T[name]
        if sqlite:
            cols.append(sa.func.coalesce(sa.func.sum(col // _SPLIT), 0).label(f"{name}_hi"))
            cols.append(sa.func.coalesce(sa.func.sum(col % _SPLIT), 0).label(f"{name}_lo"))
        else:
            cols.append(sa.func.coalesce(sa.func.sum(col), 0).label(name))
    return cols


def _pico_total(r: Any, name: str) -> int:
    """A sum selected by :func:`_pico_sums`, as one integer."""
    if f"{name}_hi" in r:
        return int(r[f"{name}_hi"]) * _SPLIT + int(r[f"{name}_lo"])
    return int(r[name])


class SQLLedgerStore:
    """The ledger on SQLite or PostgreSQL.

    Example:
        >>> store = SQLLedgerStore(SQLDatabase("sqlite:///ledger.db"))
        >>> await store.insert_many(rows)
        >>> await store.report(group_by=["model", "day"])
    """

    def __init__(self, db: SQLDatabase) -> None:
        self.db = db

    async def start(self, task_group: Any = None) -> None:
        await self.db.start(task_group)

    async def aclose(self) -> None:
        await self.db.aclose()

    async def insert_many(self, rows: Sequence[LedgerRow]) -> None:
        """Insert a batch, skipping rows already there (``attempt_id``): retries are safe.

        The statement goes to the driver's ``executemany`` with plain tuples: SQLAlchemy's
        per-row parameter processing cost ~45 µs a row, on the gateway's own core.
        """
        if not rows:
            return
        sqlite = self.db.dialect == "sqlite"
        sql = _INSERT_SQL_SQLITE if sqlite else _INSERT_SQL_PG

        def insert(c: sa.Connection) -> None:
            # The values are built in the worker thread too: a second's worth of rows
            # (~3,000 under load) took ~9 ms, a pause of the event loop (p99) when done
            # before the hand-off.
            c.exec_driver_sql(sql, [_row_values(r, sqlite) for r in rows])

        await self.db.run(insert, "ledger insert", write=True)

    async def rows(self, *, since: dt.datetime | None = None, until: dt.datetime | None = None,
                   org: str | None = None, request_id: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Raw rows, oldest first (cost as USD strings)."""
        q = sa.select(ledger_table).where(*_where(since, until, org, request_id=request_id)).order_by(_T.ts, _T.attempt)
        if limit:
            q = q.limit(limit)

        def run(c: sa.Connection) -> list[dict[str, Any]]:
            out = []
            for r in c.execute(q).mappings():
                d = dict(r)
                d["cost_usd"] = _usd(d.pop("cost_pico"))
                d["saved_usd"] = _usd(d.pop("saved_pico"))
                out.append(d)
            return out

        return await self.db.run(run, "ledger read")

    async def count(self) -> int:
        """Number of rows (tests, checks)."""
        return int(await self.db.run(lambda c: c.execute(sa.select(sa.func.count()).select_from(ledger_table)).scalar_one(), "ledger count"))

    async def report(self, *, group_by: Sequence[str], since: dt.datetime | None = None,
                     until: dt.datetime | None = None, org: str | None = None) -> list[dict[str, Any]]:
        unknown = [g for g in group_by if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown group_by {unknown}; choose from {', '.join(GROUPS)}")
        keys = list(dict.fromkeys(group_by))
        cols = [GROUPS[g].label(g) for g in keys]
        served = _T.outcome.in_(_SERVED)
        aggregates = [
            sa.func.count(sa.distinct(_T.request_id)).label("requests"),
            sa.func.count().label("attempts"),
            sa.func.coalesce(sa.func.sum(_T.prompt_tokens), 0).label("prompt_tokens"),
            sa.func.coalesce(sa.func.sum(_T.completion_tokens), 0).label("completion_tokens"),
            sa.func.coalesce(sa.func.sum(_T.cached_tokens), 0).label("cached_tokens"),
            sa.func.coalesce(sa.func.sum(_T.reasoning_tokens), 0).label("reasoning_tokens"),
            *_pico_sums(self.db.dialect == "sqlite", "cost_pico", "saved_pico"),
            sa.func.coalesce(sa.func.sum(sa.case((_T.outcome == "cache_hit", 1), else_=0)), 0).label("cache_hits"),
            sa.func.coalesce(sa.func.sum(sa.case((served, 0), else_=1)), 0).label("errors"),
            sa.func.coalesce(sa.func.sum(sa.case((_T.estimated, 1), else_=0)), 0).label("estimated_rows"),
            sa.func.coalesce(sa.func.sum(sa.case((_T.flags.is_not(None), 1), else_=0)), 0).label("flagged_rows"),
        ]
        native_pct = self.db.dialect == "postgresql"
        if native_pct:
            aggregates += [
                sa.func.percentile_cont(0.5).within_group(_T.latency_ms).filter(served).label("p50"),
                sa.func.percentile_cont(0.95).within_group(_T.latency_ms).filter(served).label("p95"),
            ]
        where = _where(since, until, org)
        q = sa.select(*cols, *aggregates).where(*where)
        if cols:
            q = q.group_by(*[GROUPS[g] for g in keys]).order_by(*[GROUPS[g] for g in keys])
        lat_q = sa.select(*cols, _T.latency_ms).where(*where, served).order_by(_T.latency_ms)

        def run(c: sa.Connection) -> list[dict[str, Any]]:
            rows = [dict(r) for r in c.execute(q).mappings()]
            latencies: dict[tuple[Any, ...], list[float]] = defaultdict(list)
            if not native_pct:
                for r in c.execute(lat_q).mappings():
                    latencies[tuple(r[g] for g in keys)].append(r["latency_ms"])
            out = []
            for r in rows:
                if r["attempts"] == 0:
                    continue
                if not native_pct:
                    values = latencies.get(tuple(r[g] for g in keys), [])
                    r["p50"], r["p95"] = percentile(values, 0.5), percentile(values, 0.95)
                row = {g: r[g] for g in keys}
                row.update({k: int(r[k]) for k in ("requests", "attempts", "prompt_tokens", "completion_tokens",
                                                   "cached_tokens", "reasoning_tokens", "cache_hits", "errors",
                                                   "estimated_rows", "flagged_rows")})
                row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
                row["cost_usd"] = _usd(_pico_total(r, "cost_pico"))
                row["saved_usd"] = _usd(_pico_total(r, "saved_pico"))
                row["p50_latency_ms"] = None if r["p50"] is None else round(float(r["p50"]), 3)
                row["p95_latency_ms"] = None if r["p95"] is None else round(float(r["p95"]), 3)
                out.append(row)
            return out

        return await self.db.run(run, "usage report")

    async def compare_routes(self, *, since: dt.datetime | None = None, until: dt.datetime | None = None,
                             org: str | None = None, prompt_hash: str | None = None,
                             min_routes: int = 2) -> list[dict[str, Any]]:
        """The same prompt over different routes: cost and latency side by side.

        One row per (prompt hash, route) for prompts served by at least ``min_routes``
        routes; cost and latency are per served request, averaged.
        """
        served = _T.outcome == "ok"
        q = (
            sa.select(
                _T.prompt_hash, _T.route, _T.model,
                sa.func.count().label("requests"),
                sa.func.sum(_T.prompt_tokens).label("prompt_tokens"),
                sa.func.sum(_T.completion_tokens).label("completion_tokens"),
                *_pico_sums(self.db.dialect == "sqlite", "cost_pico"),
                sa.func.avg(_T.latency_ms).label("avg_latency_ms"),
                sa.func.avg(_T.ttft_ms).label("avg_ttft_ms"),
            )
            .where(*_where(since, until, org, prompt_hash=prompt_hash), served, _T.prompt_hash.is_not(None))
            .group_by(_T.prompt_hash, _T.route, _T.model)
        )

        def run(c: sa.Connection) -> list[dict[str, Any]]:
            by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for r in c.execute(q).mappings():
                n = int(r["requests"])
                cost = from_pico(_pico_total(r, "cost_pico"))
                by_prompt[r["prompt_hash"]].append({
                    "prompt_hash": r["prompt_hash"], "route": r["route"], "model": r["model"], "requests": n,
                    "prompt_tokens": int(r["prompt_tokens"]), "completion_tokens": int(r["completion_tokens"]),
                    "cost_usd": usd_text(cost), "cost_per_request_usd": usd_text(cost / n if n else Decimal(0)),
                    "avg_latency_ms": round(float(r["avg_latency_ms"]), 3),
                    "avg_ttft_ms": None if r["avg_ttft_ms"] is None else round(float(r["avg_ttft_ms"]), 3),
                })
            out = []
            for group in by_prompt.values():
                if len({g["route"] for g in group}) >= min_routes:
                    out.extend(sorted(group, key=lambda g: (Decimal(g["cost_per_request_usd"]), g["route"])))
            return out

        return await self.db.run(run, "route comparison")

    async def top_prompts(self, *, by: str = "cost", limit: int = 10, since: dt.datetime | None = None,
                          until: dt.datetime | None = None, org: str | None = None) -> list[dict[str, Any]]:
        """The highest-impact inputs: prompt hashes by total cost or by count.

        ``prompt_text`` is only present for orgs that opted in to storing prompt content.
        """
        if by not in ("cost", "count"):
            raise ValueError("by must be 'cost' or 'count'")
        sqlite = self.db.dialect == "sqlite"
        # Ordering by SQLite's float total() cannot overflow; the value shown is the exact sum.
        cost = (sa.func.total(_T.cost_pico) if sqlite else sa.func.sum(_T.cost_pico)).label("cost_order")
        n = sa.func.count(sa.distinct(_T.request_id)).label("requests")
        q = (
            sa.select(
                _T.prompt_hash, n, cost, *_pico_sums(sqlite, "cost_pico"),
                sa.func.sum(_T.prompt_tokens + _T.completion_tokens).label("total_tokens"),
                sa.func.count(sa.distinct(_T.model)).label("models"),
                sa.func.max(_T.prompt_text).label("prompt_text"),
            )
            .where(*_where(since, until, org), _T.prompt_hash.is_not(None))
            .group_by(_T.prompt_hash)
            .order_by(*( (cost.desc(), n.desc()) if by == "cost" else (n.desc(), cost.desc()) ), _T.prompt_hash)
            .limit(limit)
        )

        def run(c: sa.Connection) -> list[dict[str, Any]]:
            out = []
            for r in c.execute(q).mappings():
                row = {"prompt_hash": r["prompt_hash"], "requests": int(r["requests"]), "cost_usd": _usd(_pico_total(r, "cost_pico")),
                       "total_tokens": int(r["total_tokens"] or 0), "models": int(r["models"])}
                if r["prompt_text"] is not None:
                    row["prompt_text"] = r["prompt_text"]
                out.append(row)
            return out

        return await self.db.run(run, "top prompts")
