"""SQLAuditStore: one hash chain on SQLite or PostgreSQL, shared by every replica.

Appending a batch is one transaction that first takes the chain head's row lock
(``UPDATE audit_head SET seq = seq WHERE id = 1``: a row lock in PostgreSQL, the
database write lock in SQLite — taken *before* reading, so two writers never both read
the same head), skips events whose ``event_id`` is already stored (a retried batch),
seals the rest after the head, inserts them and moves the head. Replicas therefore
append whole batches one after another to a single chain; an event's ``seq`` is its
commit order, its ``ts`` the time of the request (so ``ts`` may be slightly out of order
across replicas; ``seq`` never is).
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from asgi_llm.audit.chain import AuditEvent, ChainVerifier, VerifyResult, links

if TYPE_CHECKING:
    from asgi_llm.stores.sql import SQLDatabase

__all__ = ["SQLAuditStore", "audit_table", "head_table"]

metadata = sa.MetaData()
audit_table = sa.Table(
    "audit_events",
    metadata,
    sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
    sa.Column("event_id", sa.String(64), nullable=False, unique=True),
    sa.Column("ts", sa.DateTime(), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("org", sa.String(200), nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(400), nullable=False),
    sa.Column("target", sa.String(400)),
    sa.Column("model", sa.String(200)),
    sa.Column("route", sa.String(400)),
    sa.Column("verdict", sa.String(32), nullable=False),
    sa.Column("status", sa.Integer(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("detail", sa.Text()),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)
head_table = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger(), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)
_A = audit_table.c
_PAGE = 5000

# The INSERT takes ``ts`` and ``hash`` first, then the rest of an event's hashed content
# by key: one itemgetter call (C) a row, straight to the driver's ``executemany`` —
# SQLAlchemy's per-row parameter processing would run in the writer thread, which
# competes with the event loop for the GIL.
_HASHED = tuple(c.name for c in audit_table.columns if c.name not in ("ts", "hash"))
_hashed_values = operator.itemgetter(*_HASHED)
_INSERT_COLUMNS = ", ".join(("ts", "hash", *_HASHED))
_INSERT_SQL_SQLITE = f"INSERT INTO audit_events ({_INSERT_COLUMNS}) VALUES ({', '.join('?' for _ in audit_table.columns)})"
_INSERT_SQL_PG = f"INSERT INTO audit_events ({_INSERT_COLUMNS}) VALUES ({', '.join('%s' for _ in audit_table.columns)})"

# Which of a batch's events are stored already, asked in chunks of a fixed size: one SQL
# text, so one prepared statement. An IN list as long as each batch made a new statement
# per batch size, and SQLite's statement cache (128 per connection) grew to tens of MiB
# of prepared 1,000s-parameter statements under load (RSS +220 B/request).
_KNOWN_CHUNK = 256
_KNOWN_SQL_SQLITE = f"SELECT event_id FROM audit_events WHERE event_id IN ({', '.join(['?'] * _KNOWN_CHUNK)})"
_KNOWN_SQL_PG = f"SELECT event_id FROM audit_events WHERE event_id IN ({', '.join(['%s'] * _KNOWN_CHUNK)})"


def _naive(t: dt.datetime | None) -> dt.datetime | None:
    if t is None or t.tzinfo is None:
        return t
    return t.astimezone(dt.UTC).replace(tzinfo=None)


class SQLAuditStore:
    """The audit log on SQLite or PostgreSQL.

    Example:
        >>> store = SQLAuditStore(SQLDatabase("sqlite:///asgi-llm.db"))
        >>> await store.append_many([AuditEvent(kind="admin", org="*", actor="admin", ...)])
        >>> (await store.verify()).ok
        True
    """

    def __init__(self, db: SQLDatabase) -> None:
        self.db = db

    async def append_many(self, events: Sequence[AuditEvent]) -> None:
        """Append to the chain in one transaction (idempotent on ``event_id``)."""
        if not events:
            return
        await self.db.run(lambda c: self._append(c, events), "audit append", write=True)

    def _append(self, c: sa.Connection, events: Sequence[AuditEvent]) -> None:
        c.execute(sa.update(head_table).where(head_table.c.id == 1).values(seq=head_table.c.seq))  # lock first
        head_seq, head_hash = c.execute(sa.select(head_table.c.seq, head_table.c.hash).where(head_table.c.id == 1)).one()
        ids = [e.event_id for e in events]
        sqlite = self.db.dialect == "sqlite"
        known_sql = _KNOWN_SQL_SQLITE if sqlite else _KNOWN_SQL_PG
        known: set[str] = set()
        for i in range(0, len(ids), _KNOWN_CHUNK):
            chunk = ids[i:i + _KNOWN_CHUNK]
            chunk += [chunk[-1]] * (_KNOWN_CHUNK - len(chunk))  # pad: always the same statement
            known.update(c.exec_driver_sql(known_sql, tuple(chunk)).scalars())
        fresh = [e for e in dict((e.event_id, e) for e in events).values() if e.event_id not in known]
        if not fresh:
            return
        values: list[tuple[Any, ...]] = []
        for e, content, last in links(fresh, int(head_seq), head_hash):
            # SQLite: the text SQLAlchemy's SQLite DateTime writes and reads back (ts is naive UTC).
            ts = e.ts.isoformat(" ", "microseconds")[:26] if sqlite else e.ts
            values.append((ts, last, *_hashed_values(content)))
        c.exec_driver_sql(_INSERT_SQL_SQLITE if sqlite else _INSERT_SQL_PG, values)
        c.execute(sa.update(head_table).where(head_table.c.id == 1).values(seq=content["seq"], hash=last))

    async def head(self) -> tuple[int, str]:
        """The chain head: last ``seq`` and its hash."""
        row = await self.db.run(lambda c: c.execute(sa.select(head_table.c.seq, head_table.c.hash).where(head_table.c.id == 1)).one(), "audit head")
        return int(row[0]), str(row[1])

    async def query(self, *, since: dt.datetime | None = None, until: dt.datetime | None = None, org: str | None = None,
                    actor: str | None = None, kind: str | None = None, action: str | None = None,
                    verdict: str | None = None, model: str | None = None, request_id: str | None = None,
                    after_seq: int | None = None, limit: int = 100) -> list[AuditEvent]:
        """Events matching every given filter, in chain order; page with ``after_seq``."""
        cond: list[Any] = []
        if since is not None:
            cond.append(_A.ts >= _naive(since))
        if until is not None:
            cond.append(_A.ts < _naive(until))
        if after_seq is not None:
            cond.append(_A.seq > after_seq)
        for col, value in (("org", org), ("actor", actor), ("kind", kind), ("verdict", verdict), ("model", model),
                           ("request_id", request_id)):
            if value is not None:
                cond.append(_A[col] == value)
        if action is not None:
            cond.append(_A.action.like(action.replace("%", r"\%").replace("_", r"\_") + "%", escape="\\"))
        q = sa.select(audit_table).where(*cond).order_by(_A.seq).limit(limit)
        return await self.db.run(lambda c: [AuditEvent.from_row(r) for r in c.execute(q).mappings()], "audit query")

    async def verify(self) -> VerifyResult:
        """Walk the whole chain (in pages) and report the first broken link."""

        def run(c: sa.Connection) -> VerifyResult:
            head_seq, head_hash = c.execute(sa.select(head_table.c.seq, head_table.c.hash).where(head_table.c.id == 1)).one()
            v = ChainVerifier()
            last: int | None = None
            while True:
                q = sa.select(audit_table).order_by(_A.seq).limit(_PAGE)
                if last is not None:
                    q = q.where(_A.seq > last)
                rows = c.execute(q).mappings().all()
                if not rows:
                    break
                for r in rows:
                    v.feed(AuditEvent.from_row(r))
                last = rows[-1]["seq"]
            return v.result(int(head_seq), str(head_hash))

        return await self.db.run(run, "audit verify")
