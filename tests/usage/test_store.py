"""Contract suite for the ledger store, on SQLite and real PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from decimal import Decimal

import anyio
import pytest

from asgi_llm.stores.sql import SQLDatabase
from asgi_llm.usage.records import LedgerRow, from_pico, to_pico
from asgi_llm.usage.store import _INSERT_COLUMNS, SQLLedgerStore, _row_values, percentile

pytestmark = pytest.mark.anyio

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(sql_url: str) -> AsyncIterator[SQLLedgerStore]:
    db = SQLDatabase(sql_url)
    await db.start()
    try:
        yield SQLLedgerStore(db)
    finally:
        await db.aclose()


def row(**kw: object) -> LedgerRow:
    base: dict[str, object] = dict(request_id="req_1", org="acme", key_id="k1", model="chat", route="a/m", provider="a",
                                   upstream_model="m", ts=T0, prompt_tokens=10, completion_tokens=5,
                                   cost_usd=Decimal("0.0000045"), price_source="recipe", latency_ms=100.0, status=200)
    base.update(kw)
    return LedgerRow(**base)  # type: ignore[arg-type]


class TestInsert:
    async def test_insert_is_idempotent_on_attempt_id(self, store: SQLLedgerStore) -> None:
        """A batch retried after an outage never duplicates rows."""
        rows = [row(request_id=f"r{i}") for i in range(5)]
        await store.insert_many(rows)
        await store.insert_many(rows + [row(request_id="r9")])
        assert await store.count() == 6

    async def test_round_trip_keeps_every_field(self, store: SQLLedgerStore) -> None:
        """What is written is what is read, cost exactly."""
        r = row(cached_tokens=3, reasoning_tokens=2, estimated=True, ttft_ms=12.5, node="box1", error_code=None,
                prompt_hash="h" * 64, cost_usd=Decimal("0.000000123456"))
        await store.insert_many([r])
        (got,) = await store.rows()
        assert got["attempt_id"] == r.attempt_id and got["node"] == "box1" and got["estimated"] is True
        assert Decimal(got["cost_usd"]) == Decimal("0.000000123456")
        assert got["day"] == "2025-03-01" and got["ttft_ms"] == 12.5

    @pytest.mark.parametrize("sqlite", [True, False])
    def test_insert_values_are_to_db(self, sqlite: bool) -> None:
        """The insert's values are the row's ``to_db()`` columns (SQLite gets ``ts`` as SQLAlchemy's text)."""
        tz = dt.timezone(dt.timedelta(hours=-5))
        r = row(ts=dt.datetime(2025, 3, 1, 22, 0, tzinfo=tz), saved_usd=Decimal("0.25"), prompt_text="é")
        got = dict(zip(_INSERT_COLUMNS.split(", "), _row_values(r, sqlite), strict=True))
        want = r.to_db()
        assert want["day"] == "2025-03-02"
        if sqlite:
            want["ts"] = "2025-03-02 03:00:00.000000"
        assert got == want

    def test_pico_conversion_is_exact(self) -> None:
        """USD ↔ pico-dollars loses nothing at six decimals per 1M tokens."""
        usd = Decimal("123") * Decimal("0.075") / Decimal(1_000_000)
        assert from_pico(to_pico(usd)) == usd

    def test_spill_line_round_trip(self) -> None:
        """A row survives the spill file unchanged."""
        r = row(cost_usd=Decimal("0.1234"), ttft_ms=None)
        assert LedgerRow.from_json(r.to_json()) == r


class TestReport:
    async def _seed(self, store: SQLLedgerStore) -> None:
        rows = [
            row(request_id="r1", route="a/m", latency_ms=100, cost_usd=Decimal("0.01")),
            row(request_id="r2", route="a/m", latency_ms=300, cost_usd=Decimal("0.02")),
            row(request_id="r3", route="a/m", attempt=1, outcome="error", status=502, prompt_tokens=0,
                completion_tokens=0, cost_usd=Decimal(0), latency_ms=5),
            row(request_id="r3", route="b/n", provider="b", upstream_model="n", attempt=2, latency_ms=200,
                cost_usd=Decimal("0.005")),
            row(request_id="r4", route="b/n", outcome="cache_hit", prompt_tokens=0, completion_tokens=0,
                cost_usd=Decimal(0), saved_usd=Decimal("0.005"), latency_ms=1, cache_status="HIT"),
            row(request_id="r5", org="other", model="chat-b", ts=T0 + dt.timedelta(days=1), cost_usd=Decimal("1")),
        ]
        await store.insert_many(rows)

    async def test_group_by_route(self, store: SQLLedgerStore) -> None:
        """Requests, attempts, tokens, cost, errors, cache hits and saved cost per route."""
        await self._seed(store)
        by_route = {r["route"]: r for r in await store.report(group_by=["route"], org="acme")}
        a, b = by_route["a/m"], by_route["b/n"]
        assert (a["requests"], a["attempts"], a["errors"]) == (3, 3, 1)
        assert Decimal(a["cost_usd"]) == Decimal("0.03")
        assert a["prompt_tokens"] == 20 and a["total_tokens"] == 30
        assert a["p50_latency_ms"] == pytest.approx(200.0) and a["p95_latency_ms"] == pytest.approx(290.0)
        assert (b["cache_hits"], Decimal(b["saved_usd"]), b["requests"]) == (1, Decimal("0.005"), 2)

    async def test_group_by_org_day_and_window(self, store: SQLLedgerStore) -> None:
        """Groups by org and UTC day; since/until cut the window."""
        await self._seed(store)
        rows = await store.report(group_by=["org", "day"])
        assert [(r["org"], r["day"]) for r in rows] == [("acme", "2025-03-01"), ("other", "2025-03-02")]
        later = await store.report(group_by=["org"], since=T0 + dt.timedelta(hours=1))
        assert [r["org"] for r in later] == ["other"]
        none = await store.report(group_by=["model"], until=T0)
        assert none == []

    async def test_ungrouped_totals(self, store: SQLLedgerStore) -> None:
        """No group_by: one total row."""
        await self._seed(store)
        (total,) = await store.report(group_by=[])
        assert total["attempts"] == 6 and Decimal(total["cost_usd"]) == Decimal("1.035")

    async def test_unknown_group_refused(self, store: SQLLedgerStore) -> None:
        """An unknown group_by is a ValueError naming the choices."""
        with pytest.raises(ValueError, match="route"):
            await store.report(group_by=["colour"])

    async def test_compare_routes(self, store: SQLLedgerStore) -> None:
        """The same prompt hash over two routes is compared; a single-route prompt is not."""
        await store.insert_many([
            row(request_id="x1", prompt_hash="p1", route="a/m", cost_usd=Decimal("0.02"), latency_ms=100),
            row(request_id="x2", prompt_hash="p1", route="b/n", model="chat-b", cost_usd=Decimal("0.004"), latency_ms=50),
            row(request_id="x3", prompt_hash="p2", route="a/m", cost_usd=Decimal("0.02")),
        ])
        cmp = await store.compare_routes()
        assert [(c["prompt_hash"], c["route"]) for c in cmp] == [("p1", "b/n"), ("p1", "a/m")]
        assert cmp[0]["cost_per_request_usd"] == "0.004" and cmp[0]["avg_latency_ms"] == 50

    async def test_top_prompts(self, store: SQLLedgerStore) -> None:
        """Top prompt hashes by cost and by count; text only where stored (opt-in)."""
        await store.insert_many([
            row(request_id="y1", prompt_hash="cheap", cost_usd=Decimal("0.001")),
            row(request_id="y2", prompt_hash="cheap", cost_usd=Decimal("0.001")),
            row(request_id="y3", prompt_hash="dear", cost_usd=Decimal("0.5"), prompt_text='[{"content":"hi"}]'),
        ])
        by_cost = await store.top_prompts(by="cost")
        assert [p["prompt_hash"] for p in by_cost] == ["dear", "cheap"]
        assert by_cost[0]["prompt_text"] == '[{"content":"hi"}]' and "prompt_text" not in by_cost[1]
        by_count = await store.top_prompts(by="count", limit=1)
        assert by_count == [{"prompt_hash": "cheap", "requests": 2, "cost_usd": "0.002", "total_tokens": 30, "models": 1}]

    async def test_sums_of_capped_costs_do_not_overflow(self, store: SQLLedgerStore) -> None:
        """Twenty rows at the per-row cost cap sum past 2**63 pico-dollars: SQLite's integer
        sum() would raise "integer overflow" and fail every report; the sums stay exact."""
        from asgi_llm.usage.records import MAX_COST_USD

        await store.insert_many([row(request_id=f"z{i}", prompt_hash="p", route="a/m" if i % 2 else "b/n",
                                     cost_usd=MAX_COST_USD, saved_usd=MAX_COST_USD) for i in range(20)]
                                + [row(request_id="z99", prompt_hash="q", cost_usd=Decimal("0.000000000001"))])
        (total,) = await store.report(group_by=[])
        assert Decimal(total["cost_usd"]) == 20 * MAX_COST_USD + Decimal("1e-12")
        assert Decimal(total["saved_usd"]) == 20 * MAX_COST_USD
        assert [p["prompt_hash"] for p in await store.top_prompts(by="cost")] == ["p", "q"]
        assert Decimal((await store.top_prompts(by="cost"))[0]["cost_usd"]) == 20 * MAX_COST_USD
        cmp = await store.compare_routes()
        assert {c["route"]: Decimal(c["cost_usd"]) for c in cmp} == {"a/m": 10 * MAX_COST_USD, "b/n": 10 * MAX_COST_USD}


def test_percentile_matches_percentile_cont() -> None:
    """Linear interpolation, as PostgreSQL's percentile_cont."""
    assert percentile([], 0.5) is None
    assert percentile([1.0], 0.95) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5


async def test_sqlite_store_under_trio(tmp_path: object) -> None:
    """The SQLite ledger works under trio as well (worker threads)."""
    import trio

    async def main() -> int:
        db = SQLDatabase(f"sqlite:///{tmp_path}/t.db")  # type: ignore[str-format]
        await db.start()
        try:
            s = SQLLedgerStore(db)
            await s.insert_many([row()])
            return await s.count()
        finally:
            await db.aclose()

    assert await anyio.to_thread.run_sync(lambda: trio.run(main)) == 1
