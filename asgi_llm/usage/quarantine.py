"""Quarantine: rows the database refused, kept aside instead of blocking their writer.

A batch writer whose batch fails for the data's sake (not because the store is down)
bisects it, writes the good rows and hands each refused row here as a
:class:`QuarantineEntry`: the row's JSON (its spill-file line), the error, the writer's
name, the row's org and the time. They are listed by ``GET /admin/quarantine`` (org-scoped
for org admins) and counted by ``asgi_llm_quarantined_rows_total{writer}``; an operator
can fix and re-insert them by hand. The table is the Alembic revision ``0004_quarantine``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from asgi_llm.usage.failures import QuarantineEntry

if TYPE_CHECKING:
    from asgi_llm.stores.sql import SQLDatabase

__all__ = ["QuarantineEntry", "SQLQuarantineStore", "quarantine_table"]

metadata = sa.MetaData()
quarantine_table = sa.Table(
    "quarantine",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("ts", sa.DateTime(), nullable=False),
    sa.Column("writer", sa.String(32), nullable=False),
    sa.Column("org", sa.String(200)),
    sa.Column("error", sa.Text(), nullable=False),
    sa.Column("payload", sa.Text(), nullable=False),
)
_Q = quarantine_table.c


class SQLQuarantineStore:
    """Quarantined rows on SQLite or PostgreSQL (the gateway's ``stores.ledger``).

    Example:
        >>> store = SQLQuarantineStore(SQLDatabase("sqlite:///asgi-llm.db"))
        >>> await store.add(QuarantineEntry("ledger", "team-a", row.to_json(), "DataError: …"))
        >>> await store.rows(org="team-a")
    """

    def __init__(self, db: SQLDatabase) -> None:
        self.db = db

    async def add(self, entry: QuarantineEntry) -> None:
        """Store one entry (bounded first). Raises :class:`~asgi_llm.stores.StoreError`."""
        e = entry.bounded()
        values = {"ts": e.ts, "writer": e.writer, "org": e.org, "error": e.error, "payload": e.payload}
        await self.db.run(lambda c: c.execute(sa.insert(quarantine_table).values(**values)), "quarantine insert",
                          write=True)

    async def rows(self, *, org: str | None = None, writer: str | None = None, after_id: int | None = None,
                   limit: int = 100) -> list[dict[str, Any]]:
        """Entries oldest first, filtered by org and writer; page with ``after_id``."""
        cond: list[Any] = []
        if org is not None:
            cond.append(_Q.org == org)
        if writer is not None:
            cond.append(_Q.writer == writer)
        if after_id is not None:
            cond.append(_Q.id > after_id)
        q = sa.select(quarantine_table).where(*cond).order_by(_Q.id).limit(limit)

        def run(c: sa.Connection) -> list[dict[str, Any]]:
            return [QuarantineEntry(r["writer"], r["org"], r["payload"], r["error"], r["ts"]).to_api(int(r["id"]))
                    for r in c.execute(q).mappings()]

        return await self.db.run(run, "quarantine read")

    async def count(self, *, writers: Sequence[str] = ()) -> int:
        """Number of entries (of the given writers, or all)."""
        q = sa.select(sa.func.count()).select_from(quarantine_table)
        if writers:
            q = q.where(_Q.writer.in_(list(writers)))
        return int(await self.db.run(lambda c: c.execute(q).scalar_one(), "quarantine count"))
