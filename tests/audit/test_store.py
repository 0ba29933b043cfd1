"""Contract suite for the audit store (SQLite and PostgreSQL) and the hash chain."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import sqlalchemy as sa

from asgi_llm.audit.chain import GENESIS, AuditEvent, event_hash, verify_events
from asgi_llm.audit.store import SQLAuditStore
from asgi_llm.stores.sql import SQLDatabase

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def db(sql_url: str) -> AsyncIterator[SQLDatabase]:
    d = SQLDatabase(sql_url)
    await d.start()
    try:
        yield d
    finally:
        await d.aclose()


def ev(i: int, **kw: object) -> AuditEvent:
    base: dict[str, object] = dict(kind="inference", org="acme", actor="k1", action="chat", verdict="allowed",
                                   status=200, request_id=f"req_{i}", model="chat", route="a/m", attempts=1)
    base.update(kw)
    return AuditEvent(**base)  # type: ignore[arg-type]


async def tamper(db: SQLDatabase, sql: str) -> None:
    await db.run(lambda c: c.execute(sa.text(sql)), "tamper", write=True)


class TestAppend:
    async def test_chain_is_valid_and_ordered(self, db: SQLDatabase) -> None:
        """Appended batches form one chain: seq 1..n, each linked to the previous hash."""
        store = SQLAuditStore(db)
        await store.append_many([ev(i) for i in range(5)])
        await store.append_many([ev(i) for i in range(5, 8)])
        events = await store.query(limit=100)
        assert [e.seq for e in events] == list(range(1, 9))
        assert events[0].prev_hash == GENESIS and all(b.prev_hash == a.hash for a, b in zip(events, events[1:]))
        result = await store.verify()
        assert result.ok and result.events == 8 and result.head_seq == 8 and result.head_hash == events[-1].hash

    async def test_retried_batch_is_not_duplicated(self, db: SQLDatabase) -> None:
        """Re-appending events already stored (a retried batch) adds nothing."""
        store = SQLAuditStore(db)
        batch = [ev(i) for i in range(3)]
        await store.append_many(batch)
        await store.append_many([*batch, ev(3)])
        assert [e.request_id for e in await store.query()] == ["req_0", "req_1", "req_2", "req_3"]
        assert (await store.verify()).ok

    async def test_callers_events_are_left_unsealed(self, db: SQLDatabase) -> None:
        """Appending assigns chain fields to what is stored, not to the caller's events."""
        batch = [ev(i, detail={"é": [1]}) for i in range(3)]
        await SQLAuditStore(db).append_many(batch)
        assert all(e.seq is None and e.prev_hash is None and e.hash is None for e in batch)
        stored = await SQLAuditStore(db).query()
        assert [e.event_id for e in stored] == [e.event_id for e in batch]
        assert [e.ts for e in stored] == [e.ts for e in batch] and stored[0].detail == {"é": [1]}
        assert all(event_hash(e) == e.hash for e in stored)

    async def test_concurrent_writers_share_one_chain(self, sql_url: str, db: SQLDatabase) -> None:
        """Two writers (as two replicas, separate engines) appending at once keep one valid chain."""
        other = SQLDatabase(sql_url, migrate=False)
        try:
            a, b = SQLAuditStore(db), SQLAuditStore(other)

            async def write(store: SQLAuditStore, prefix: int) -> None:
                for n in range(10):
                    await store.append_many([ev(prefix * 1000 + n * 10 + k) for k in range(5)])

            async with anyio.create_task_group() as tg:
                tg.start_soon(write, a, 1)
                tg.start_soon(write, b, 2)
            result = await a.verify()
            assert result.ok and result.events == 100
        finally:
            await other.aclose()

    async def test_filters(self, db: SQLDatabase) -> None:
        """Query filters by org, actor, kind, verdict and action prefix; pages by after_seq."""
        store = SQLAuditStore(db)
        await store.append_many([
            ev(1), ev(2, org="other", actor="k2", verdict="rate_limited", status=429),
            ev(3, kind="admin", org="*", actor="admin:0", action="POST /admin/keys", target="key_1", model=None),
        ])
        assert [e.request_id for e in await store.query(org="other")] == ["req_2"]
        assert [e.request_id for e in await store.query(verdict="rate_limited")] == ["req_2"]
        assert [e.target for e in await store.query(action="POST /admin/")] == ["key_1"]
        assert [e.seq for e in await store.query(after_seq=1, limit=1)] == [2]


class TestTamperDetection:
    async def _chain(self, db: SQLDatabase) -> SQLAuditStore:
        store = SQLAuditStore(db)
        await store.append_many([ev(i) for i in range(6)])
        assert (await store.verify()).ok
        return store

    async def test_modified_event(self, db: SQLDatabase) -> None:
        """Changing a field of an event is found at that event."""
        store = await self._chain(db)
        await tamper(db, "UPDATE audit_events SET verdict = 'denied' WHERE seq = 3")
        result = await store.verify()
        assert not result.ok and result.first_break is not None
        assert result.first_break.seq == 3 and "modified" in result.first_break.reason

    async def test_modified_event_with_recomputed_hash(self, db: SQLDatabase) -> None:
        """Even with its own hash recomputed, a modified event breaks the next link."""
        store = await self._chain(db)
        (e,) = await store.query(after_seq=2, limit=1)
        e.actor = "mallory"
        forged = event_hash(e)
        await tamper(db, f"UPDATE audit_events SET actor = 'mallory', hash = '{forged}' WHERE seq = 3")
        result = await store.verify()
        assert not result.ok and result.first_break is not None and result.first_break.seq == 4

    async def test_deleted_event(self, db: SQLDatabase) -> None:
        """Deleting an event in the middle is found where the gap is."""
        store = await self._chain(db)
        await tamper(db, "DELETE FROM audit_events WHERE seq = 4")
        result = await store.verify()
        assert not result.ok and result.first_break is not None and result.first_break.seq == 4
        assert "deleted" in result.first_break.reason

    async def test_deleted_tail(self, db: SQLDatabase) -> None:
        """Deleting the last events is found against the chain head."""
        store = await self._chain(db)
        await tamper(db, "DELETE FROM audit_events WHERE seq >= 5")
        result = await store.verify()
        assert not result.ok and result.first_break is not None and "head" in result.first_break.reason

    async def test_reordered_events(self, db: SQLDatabase) -> None:
        """Swapping two events' positions is found."""
        store = await self._chain(db)
        await tamper(db, "UPDATE audit_events SET seq = 100 WHERE seq = 2")
        await tamper(db, "UPDATE audit_events SET seq = 2 WHERE seq = 3")
        await tamper(db, "UPDATE audit_events SET seq = 3 WHERE seq = 100")
        result = await store.verify()
        assert not result.ok and result.first_break is not None and result.first_break.seq == 2


def test_verify_events_in_memory() -> None:
    """The chain check works on any iterable of events (e.g. an export)."""
    from asgi_llm.audit.chain import seal

    events = [ev(i) for i in range(3)]
    head = seal(events, 0, GENESIS)
    assert verify_events(events, *head).ok
    events[1].status = 500
    assert verify_events(events, *head).first_break.seq == 2  # type: ignore[union-attr]


def test_spill_round_trip() -> None:
    """An event survives the spill file unchanged (chain fields are assigned at insert)."""
    e = ev(1, detail={"error": "x"})
    assert AuditEvent.from_json(e.to_json()).content() == e.content()
