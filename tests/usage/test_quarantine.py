"""Writers that cannot be poisoned: bounded rows, bisected batches, quarantine (SQLite and
PostgreSQL), bounded flushes, poisoned spill files, the audit chain across a quarantined event."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy.exc

from asgi_llm.audit.chain import AuditEvent, bounded as bounded_event, quarantine_placeholder
from asgi_llm.audit.store import SQLAuditStore
from asgi_llm.stores import StoreError
from asgi_llm.stores.sql import SQLDatabase
from asgi_llm.usage.quarantine import SQLQuarantineStore
from asgi_llm.usage.records import MAX_COST_USD, MAX_TOKENS, LedgerRow, bounded
from asgi_llm.usage.store import SQLLedgerStore
from asgi_llm.usage.failures import QuarantineEntry, failure_kind
from asgi_llm.usage.writer import BatchWriter

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
async def db(sql_url: str) -> AsyncIterator[SQLDatabase]:
    d = SQLDatabase(sql_url)
    await d.start()
    try:
        yield d
    finally:
        await d.aclose()


def row(i: int = 0, **kw: Any) -> LedgerRow:
    base: dict[str, Any] = dict(request_id=f"req_{i}", org="acme", key_id="k1", model="chat", route="a/m", provider="a",
                                upstream_model="m", ts=T0, prompt_tokens=10, completion_tokens=5,
                                cost_usd=Decimal("0.0000045"), price_source="recipe", latency_ms=100.0, status=200)
    base.update(kw)
    return LedgerRow(**base)


def ev(i: int, **kw: Any) -> AuditEvent:
    base: dict[str, Any] = dict(kind="inference", org="acme", actor="k1", action="chat", verdict="allowed",
                                status=200, request_id=f"req_{i}", model="chat", route="a/m", attempts=1)
    base.update(kw)
    return AuditEvent(**base)


POISON: dict[str, dict[str, Any]] = {
    "300-char model": dict(model="m" * 300, response_model="r" * 300, upstream_model="u" * 300),
    "2**70 prompt tokens": dict(prompt_tokens=2**70, completion_tokens=-5),
    "cost 1e30": dict(cost_usd=Decimal("1e30")),
    "cost NaN": dict(cost_usd=Decimal("NaN")),
    "cost Infinity": dict(cost_usd=Decimal("Infinity"), saved_usd=Decimal("-Infinity")),
    "NUL and lone surrogates": dict(org="ac\x00me", error_code="bad\ud800", prompt_text="x\udfff\x00"),
    "NaN latency": dict(latency_ms=float("nan"), ttft_ms=float("inf")),
    "status 2**40": dict(status=2**40, attempt=-(2**40)),
}


def writer(sink: Any, tmp_path: Path, **kw: Any) -> BatchWriter[Any]:
    opts: dict[str, Any] = dict(queue_max=10_000, batch_size=1000, flush_interval_s=0.02, retry_initial_s=0.01,
                                retry_max_s=0.05, shutdown_timeout_s=5, encode=LedgerRow.to_json,
                                decode=LedgerRow.from_json, normalise=bounded)
    opts.update(kw)
    return BatchWriter("ledger", sink=sink, spill_dir=tmp_path / "spill", **opts)


class RefusingSink:
    """The real ledger store, except that the database 'refuses' rows whose request id is
    in ``bad`` with a real SQLAlchemy DataError (mapped to StoreError like the real seam) —
    a refusal normalisation did not foresee."""

    def __init__(self, inner: Any, bad: set[str]) -> None:
        self.inner = inner
        self.bad = bad
        self.calls = 0

    async def __call__(self, batch: Sequence[Any]) -> None:
        self.calls += 1
        hit = [r.request_id for r in batch if r.request_id in self.bad]
        if hit:
            orig = ValueError(f"value refused: {hit[0]}")
            try:
                raise sqlalchemy.exc.DataError("INSERT …", {}, orig)
            except sqlalchemy.exc.DataError as exc:
                raise StoreError("SQL store failed during insert: value refused") from exc
        await self.inner(batch)


class TestBounded:
    @pytest.mark.parametrize("case", list(POISON))
    async def test_every_poison_value_is_bounded_and_stored(self, db: SQLDatabase, case: str) -> None:
        """Each value the attack pass used is made storable and flagged; the database takes the row."""
        r = bounded(row(**POISON[case]))
        assert r.flags, case
        store = SQLLedgerStore(db)
        await store.insert_many([r])
        (got,) = await store.rows()
        assert got["flags"] == r.flags
        assert len(got["model"]) <= 200 and 0 <= got["prompt_tokens"] <= MAX_TOKENS
        assert Decimal(got["cost_usd"]) <= MAX_COST_USD

    async def test_values_and_flags(self) -> None:
        """What each fix is: cut with a marker, clamped and estimated, cost kept (never dropped)."""
        r = bounded(row(model="m" * 300, prompt_tokens=2**70, cost_usd=Decimal("Infinity"), org="a\x00\ud800"))
        assert r.model == "m" * 199 + "…" and r.prompt_tokens == MAX_TOKENS and r.estimated is True
        assert r.cost_usd == MAX_COST_USD and r.org == "a\ufffd\ufffd"
        assert r.flags == "truncated,tokens_clamped,cost_invalid"
        assert bounded(row(cost_usd=Decimal("NaN"))).cost_usd == 0
        assert bounded(row(cost_usd=Decimal("-1"))).flags == "cost_invalid"
        ok = row()
        assert bounded(ok) is ok and ok.flags is None and ok.estimated is False

    async def test_limits_match_the_tables(self) -> None:
        """The bounds are the columns' lengths (a migration that changes one must change both)."""
        from asgi_llm.audit import chain
        from asgi_llm.audit.store import audit_table
        from asgi_llm.usage import records
        from asgi_llm.usage.store import ledger_table

        for table, limits in ((ledger_table, records.TEXT_LIMITS), (audit_table, chain.TEXT_LIMITS)):
            for name, limit, nullable in limits:
                col = table.c[name]
                length = getattr(col.type, "length", None)
                assert length in (limit, None) and col.nullable == nullable, name
                if length is None:
                    assert name == "prompt_text"

    async def test_audit_event_bounded_and_chain_verifies(self, db: SQLDatabase) -> None:
        """An event with a 450-char action, a 300-char model, surrogates and an unencodable
        detail is stored and the chain verifies."""
        store = SQLAuditStore(db)
        bad = ev(1, action="GET /admin/" + "x" * 450, model="m" * 300, actor="k\ud800\x00",
                 detail={"x": object()})
        big = ev(2, detail={"blob": "y" * 20_000})
        await store.append_many([bounded_event(bad), bounded_event(big), bounded_event(ev(3))])
        got = await store.query()
        assert len(got) == 3 and got[0].action.endswith("…") and len(got[0].action) == 400
        assert got[0].actor == "k\ufffd\ufffd" and "unencodable" in (got[0].detail or {})
        assert "truncated" in (got[1].detail or {})
        assert (await store.verify()).ok


class TestFailureKind:
    def test_classification(self) -> None:
        """Data errors bisect; outages retry; a bare StoreError is an outage."""
        def mapped(orig: BaseException, cls: type[sqlalchemy.exc.DBAPIError]) -> StoreError:
            try:
                try:
                    raise cls("SQL", {}, orig)
                except sqlalchemy.exc.DBAPIError as exc:
                    raise StoreError("x") from exc
            except StoreError as err:
                return err

        assert failure_kind(mapped(ValueError("v"), sqlalchemy.exc.DataError)) == "data"
        assert failure_kind(mapped(ValueError("v"), sqlalchemy.exc.IntegrityError)) == "data"
        assert failure_kind(mapped(RuntimeError("gone"), sqlalchemy.exc.OperationalError)) == "outage"
        assert failure_kind(OverflowError("Python int too large to convert to SQLite INTEGER")) == "data"
        assert failure_kind(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")) == "data"
        assert failure_kind(StoreError("store down")) == "outage"
        assert failure_kind(ConnectionRefusedError()) == "outage"
        assert failure_kind(RuntimeError("?")) == "unknown"


class TestQuarantine:
    async def test_unforeseen_refusal_is_bisected_and_quarantined(self, db: SQLDatabase, tmp_path: Path,
                                                                  anyio_backend: str) -> None:
        """A row the database refuses for a reason normalisation did not foresee: the good
        rows of its batch are written, it is quarantined (SQL), the next batch is unaffected."""
        store, quarantine = SQLLedgerStore(db), SQLQuarantineStore(db)
        sink = RefusingSink(store.insert_many, {"req_17"})
        w = writer(sink, tmp_path, quarantine=quarantine.add)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(50):
                w.put(row(i))
            assert await w.flush(timeout_s=20)
            assert await store.count() == 49
            for i in range(50, 60):
                w.put(row(i))
            assert await w.flush(timeout_s=20)
            await w.aclose()
        assert await store.count() == 59
        assert w.stats["quarantined"] == 1 and w.stats["failures"] == 0 and sink.calls < 20
        (entry,) = await quarantine.rows()
        assert entry["writer"] == "ledger" and entry["org"] == "acme" and "DataError" in entry["error"]
        assert LedgerRow.from_json(entry["payload"]).request_id == "req_17"
        assert await quarantine.rows(org="other") == []

    async def test_real_refusals_without_normalisation_are_quarantined(self, db: SQLDatabase, tmp_path: Path,
                                                                       anyio_backend: str) -> None:
        """Even with no normalise step, the driver's/database's own refusals (BIGINT overflow,
        NOT NULL on NaN, surrogates) cost those rows only."""
        store, quarantine = SQLLedgerStore(db), SQLQuarantineStore(db)
        w = writer(store.insert_many, tmp_path, quarantine=quarantine.add, normalise=None)
        poisoned = [row(100, prompt_tokens=2**70), row(101, org="\ud800"), row(102, cost_usd=Decimal("NaN"))]
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(30):
                w.put(row(i))
                if i % 10 == 5:
                    w.put(poisoned[i // 10])
            assert await w.flush(timeout_s=20)
            await w.aclose()
        assert await store.count() == 30
        assert w.stats["quarantined"] == 3
        assert sorted(LedgerRow.from_json(e["payload"]).request_id for e in await quarantine.rows()) == \
            ["req_100", "req_101", "req_102"]

    async def test_outage_is_retried_not_quarantined(self, tmp_path: Path) -> None:
        """The store unreachable: the batch is kept and retried, nothing is set aside."""
        written: list[Any] = []
        fails = {"n": 3}

        async def sink(batch: Sequence[Any]) -> None:
            if fails["n"]:
                fails["n"] -= 1
                raise StoreError("SQL store failed during ledger insert: connection refused")
            written.extend(batch)

        kept: list[QuarantineEntry] = []

        async def keep(entry: QuarantineEntry) -> None:
            kept.append(entry)

        w = writer(sink, tmp_path, quarantine=keep)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(20):
                w.put(row(i))
            assert await w.flush(timeout_s=20)
            await w.aclose()
        assert len(written) == 20 and kept == [] and w.stats["failures"] == 3

    async def test_unknown_error_is_retried_a_few_times_then_bisected(self, tmp_path: Path) -> None:
        """An error that says neither outage nor data: retried ``unknown_retries`` times, then
        bisected without sleeping through every sub-range; the good rows are written."""
        written: list[Any] = []
        kept: list[QuarantineEntry] = []

        async def sink(batch: Sequence[Any]) -> None:
            if any(r.request_id == "req_40" for r in batch):
                raise RuntimeError("something nobody classified")
            written.extend(batch)

        async def keep(entry: QuarantineEntry) -> None:
            kept.append(entry)

        w = writer(sink, tmp_path, quarantine=keep, retry_initial_s=0.2, retry_max_s=0.2)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(64):
                w.put(row(i))
            with anyio.fail_after(5):  # 3 retries of 0.1–0.3 s, then no more sleeps
                assert await w.flush()
            await w.aclose()
        assert len(written) == 63 and len(kept) == 1
        assert LedgerRow.from_json(kept[0].payload).request_id == "req_40"
        assert w.stats["failures"] == 3 and w.stats["quarantined"] == 1

    async def test_quarantine_store_down_falls_back_to_a_file(self, tmp_path: Path) -> None:
        """When even the quarantine table refuses, the row goes to quarantine-<writer>-*.jsonl."""
        async def sink(batch: Sequence[Any]) -> None:
            if any(r.request_id == "req_3" for r in batch):
                raise ValueError("refused")

        async def keep(entry: QuarantineEntry) -> None:
            raise StoreError("quarantine table unreachable")

        w = writer(sink, tmp_path, quarantine=keep)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(8):
                w.put(row(i))
            assert await w.flush(timeout_s=20)
            await w.aclose()
        (path,) = (tmp_path / "spill").glob("quarantine-ledger-*.jsonl")
        (line,) = path.read_text().splitlines()
        entry = json.loads(line)
        assert entry["writer"] == "ledger" and LedgerRow.from_json(entry["payload"]).request_id == "req_3"
        assert w.stats["quarantined"] == 1 and w.stats["quarantined_to_file"] == 1

    async def test_poisoned_spill_file_does_not_stick(self, db: SQLDatabase, tmp_path: Path, anyio_backend: str) -> None:
        """A spill file written by a version without bounds (a 2**70 token count, a 300-char
        model) and a torn line: replayed bounded, the torn line quarantined, the file gone."""
        store, quarantine = SQLLedgerStore(db), SQLQuarantineStore(db)
        spill = tmp_path / "spill"
        spill.mkdir()
        lines = [row(i).to_json() for i in range(5)]
        lines.insert(2, row(50, prompt_tokens=2**70, model="m" * 300).to_json())
        lines.append('{"request_id": "torn')
        (spill / "ledger-1234-abcd.jsonl").write_text("\n".join(lines) + "\n")
        w = writer(store.insert_many, tmp_path, quarantine=quarantine.add)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            with anyio.fail_after(20):
                while list(spill.glob("ledger-*")):
                    await anyio.sleep(0.02)
            w.put(row(60))
            assert await w.flush(timeout_s=20)
            await w.aclose()
        got = {r["request_id"]: r for r in await store.rows()}
        assert len(got) == 7 and got["req_50"]["flags"] == "truncated,tokens_clamped"
        (entry,) = await quarantine.rows()
        assert "unreadable spill line" in entry["error"] and entry["payload"].startswith('{"request_id": "torn')

    async def test_a_row_that_cannot_be_encoded_is_spilled_and_quarantined_on_replay(self, tmp_path: Path) -> None:
        """Spilling never raises from put()/aclose(): an item encode() refuses is spilled as
        what can be said about it, and quarantined (not lost, not replayed) at the next start."""
        def encode(r: LedgerRow) -> str:
            if r.request_id == "req_2":
                raise TypeError("cannot encode this one")
            return r.to_json()

        first = writer(lambda batch: anyio.sleep(0), tmp_path, encode=encode)
        for i in range(4):
            first.put(row(i))
        await first.aclose()  # never started: everything is spilled
        written: list[Any] = []
        kept: list[QuarantineEntry] = []

        async def sink(batch: Sequence[Any]) -> None:
            written.extend(batch)

        async def keep(entry: QuarantineEntry) -> None:
            kept.append(entry)

        second = writer(sink, tmp_path, quarantine=keep)
        async with anyio.create_task_group() as tg:
            await second.start(tg)
            with anyio.fail_after(10):
                while len(written) < 3 or not kept:
                    await anyio.sleep(0.02)
            await second.aclose()
        assert sorted(r.request_id for r in written) == ["req_0", "req_1", "req_3"]
        assert len(kept) == 1 and "cannot encode this one" in kept[0].payload

    async def test_bounded_flush_gives_up_and_loses_nothing(self, tmp_path: Path) -> None:
        """A store that does not answer: flush(timeout_s) returns False promptly, the rows stay
        queued, and are written once the store answers."""
        release = anyio.Event()
        written: list[Any] = []

        async def sink(batch: Sequence[Any]) -> None:
            await release.wait()
            written.extend(batch)

        w = writer(sink, tmp_path, flush_interval_s=60)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(10):
                w.put(row(i))
            with anyio.fail_after(5):
                assert await w.flush(timeout_s=0.2) is False
            assert w.backlog == 10
            release.set()
            assert await w.flush(timeout_s=20)
            await w.aclose()
        assert sorted(r.request_id for r in written) == sorted(f"req_{i}" for i in range(10))


class TestAuditChainAcrossQuarantine:
    async def test_refused_event_leaves_a_placeholder_and_the_chain_verifies(self, db: SQLDatabase, tmp_path: Path,
                                                                            anyio_backend: str) -> None:
        """One event refused for an unforeseen reason: the others are appended, a 'quarantined'
        placeholder takes its place, the chain verifies intact, the next batch follows."""
        store, quarantine = SQLAuditStore(db), SQLQuarantineStore(db)
        refused = ev(5)

        async def sink(batch: Sequence[AuditEvent]) -> None:
            if any(e.event_id == refused.event_id for e in batch):
                raise ValueError("refused for a reason nobody foresaw")
            await store.append_many(batch)

        w = BatchWriter("audit", sink=sink, encode=AuditEvent.to_json, decode=AuditEvent.from_json,
                        spill_dir=tmp_path / "spill", flush_interval_s=0.02, retry_initial_s=0.01,
                        normalise=bounded_event, quarantine=quarantine.add, substitute=quarantine_placeholder)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(10):
                w.put(refused if i == 5 else ev(i))
            assert await w.flush(timeout_s=20)
            for i in range(10, 15):
                w.put(ev(i))
            assert await w.flush(timeout_s=20)
            await w.aclose()
        events = await store.query(limit=1000)
        assert len(events) == 15 and [e.seq for e in events] == list(range(1, 16))
        placeholder = events[5]
        assert placeholder.kind == "quarantined" and placeholder.target == refused.event_id
        assert placeholder.request_id == "req_5" and "nobody foresaw" in placeholder.detail["error"]  # type: ignore[index]
        result = await store.verify()
        assert result.ok and result.events == 15
        (entry,) = await quarantine.rows()
        assert entry["writer"] == "audit" and AuditEvent.from_json(entry["payload"]).event_id == refused.event_id


class TestFlushEndpoint:
    async def test_flush_answers_503_within_its_timeout_when_the_store_does_not_answer(self, tmp_path: Path) -> None:
        """POST /admin/usage/flush?timeout_s=1 against a store that never answers: a
        store_unavailable error after ~1 s (never a hang); the rows stay queued."""
        from starlette.requests import Request

        from asgi_llm.admin.usage import usage_routes

        async def sink(batch: Sequence[Any]) -> None:
            await anyio.sleep_forever()

        w = writer(sink, tmp_path, flush_interval_s=60)
        (route,) = [r for r in usage_routes(None, w) if r.path == "/admin/usage/flush"]  # type: ignore[arg-type]
        scope = {"type": "http", "method": "POST", "path": "/admin/usage/flush", "query_string": b"timeout_s=1",
                 "headers": []}
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(5):
                w.put(row(i))
            with anyio.fail_after(5), pytest.raises(StoreError) as exc:
                await route.endpoint(Request(scope))
            assert "within 1 s" in exc.value.message and exc.value.status_code == 503
            assert w.backlog == 5
            tg.cancel_scope.cancel()
