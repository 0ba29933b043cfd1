"""Contract suite for the node store (enrollment tokens, node records, consents), on
SQLite and real PostgreSQL, like the ledger, audit and key stores' suites.

What every backend must keep: a token is consumed once (also under concurrency, and
never after it expired); a record round-trips every field; names are unique per org
among nodes that are not revoked (also under concurrency); listings are ordered and
org-scoped; a driver failure leaves as ``StoreError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import sqlalchemy as sa

from asgi_llm.nodes.records import EnrollmentToken, NodeRecord
from asgi_llm.nodes.store import NodeStore, SQLNodeStore
from asgi_llm.stores import StoreError
from asgi_llm.stores.sql import SQLDatabase

pytestmark = pytest.mark.anyio

NOW = 1_700_000_000.0


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


@pytest.fixture
def store(db: SQLDatabase) -> NodeStore:
    """Every backend of the NodeStore Protocol (today the SQL one, over SQLite and PostgreSQL)."""
    return SQLNodeStore(db)


def token(i: int, *, org: str = "team-a", expires_at: float = NOW + 600, created_at: float = NOW, **kw: object) -> EnrollmentToken:
    return EnrollmentToken(id=f"tok_{i}", hash=f"{i:064x}", org=org, expires_at=expires_at, created_at=created_at,
                           **kw)  # type: ignore[arg-type]


def node(i: int, name: str | None = None, *, org: str = "team-a", **kw: object) -> NodeRecord:
    base: dict[str, object] = dict(id=f"node_{i}", name=name or f"box-{i}", org=org, credential_hash=f"c{i:063x}",
                                   url=f"http://10.0.0.{i % 250 + 1}:8000/v1", created_at=NOW + i)
    base.update(kw)
    return NodeRecord(**base)  # type: ignore[arg-type]


class TestTokens:
    async def test_consumed_once(self, store: NodeStore) -> None:
        """The first use returns the token, marked with the node and time; a replay is 'used'."""
        await store.create_token(token(1, defaults={"labels": {"gpu": "a10"}}, created_by="k_admin"))
        got, problem = await store.consume_token(f"{1:064x}", node_id="node_1", at=NOW + 1)
        assert problem is None and got is not None
        assert (got.id, got.org, got.used_at, got.node_id, got.defaults, got.created_by) == \
            ("tok_1", "team-a", NOW + 1, "node_1", {"labels": {"gpu": "a10"}}, "k_admin")
        assert await store.consume_token(f"{1:064x}", node_id="node_2", at=NOW + 2) == (None, "used")
        (listed,) = await store.list_tokens()
        assert listed.node_id == "node_1" and listed.used_at == NOW + 1  # the replay changed nothing

    async def test_unknown_and_expired(self, store: NodeStore) -> None:
        """An unknown hash is 'unknown'; at or after its expiry a token is 'expired' and stays unused."""
        await store.create_token(token(2, expires_at=NOW + 10))
        assert await store.consume_token("f" * 64, node_id="node_x", at=NOW) == (None, "unknown")
        assert await store.consume_token(f"{2:064x}", node_id="node_x", at=NOW + 10) == (None, "expired")
        (listed,) = await store.list_tokens()
        assert listed.used_at is None and listed.node_id is None

    async def test_concurrent_joins_with_one_token_one_wins(self, store: NodeStore) -> None:
        """Ten joins racing with one token: exactly one succeeds, nine see 'used'."""
        await store.create_token(token(3))
        results: list[tuple[EnrollmentToken | None, str | None]] = []

        async def join(i: int) -> None:
            results.append(await store.consume_token(f"{3:064x}", node_id=f"node_{i}", at=NOW + 1))

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(join, i)
        assert sorted(str(p) for _t, p in results) == ["None"] + ["used"] * 9
        (winner,) = [t for t, p in results if p is None]
        assert winner is not None and (await store.list_tokens())[0].node_id == winner.node_id

    async def test_token_org_and_org_scoped_listing(self, store: NodeStore) -> None:
        """token_org answers without consuming; list_tokens is ordered by creation and filters by org."""
        await store.create_token(token(5, org="team-b", created_at=NOW + 5))
        await store.create_token(token(4, org="team-a", created_at=NOW + 4))
        await store.create_token(token(6, org="team-a", created_at=NOW + 6))
        assert await store.token_org(f"{5:064x}") == "team-b" and await store.token_org("0" * 63 + "f") is None
        assert [t.id for t in await store.list_tokens()] == ["tok_4", "tok_5", "tok_6"]
        assert [t.id for t in await store.list_tokens(org="team-a")] == ["tok_4", "tok_6"]
        assert await store.list_tokens(org="team-c") == []
        assert all(t.used_at is None for t in await store.list_tokens())

    async def test_duplicate_token_hash_is_a_store_error(self, store: NodeStore) -> None:
        """A second token with the same hash is refused at the seam (StoreError), never stored twice."""
        await store.create_token(token(7))
        with pytest.raises(StoreError):
            await store.create_token(EnrollmentToken(id="tok_other", hash=f"{7:064x}", org="team-b", expires_at=NOW + 60))
        assert [t.id for t in await store.list_tokens()] == ["tok_7"]


class TestNodes:
    async def test_every_field_round_trips(self, store: NodeStore) -> None:
        """get, get_by_credential and list return the record as written, field for field."""
        rec = node(
            1, "gpu-box-é", mode="tunnel", url=None, labels={"gpu": "rtx 4090", "zone": "ü"},
            models=[{"id": "tiny-chat", "context_window": 8192}, {"id": "e5", "kind": "embeddings"}],
            price={"input": "0.10", "output": "0.20"}, shared_with=("team-b", "*"),
            availability={"mode": "windows", "windows": ["18:00-08:00"]}, state="cordoned",
            rotated_at=NOW + 50, last_seen_at=NOW + 60, created_by="k_admin",
        )
        await store.create_node(rec)
        assert await store.get("node_1") == rec
        assert await store.get_by_credential(rec.credential_hash) == rec
        assert await store.list() == [rec]
        assert await store.get("node_missing") is None and await store.get_by_credential("nope") is None

    async def test_update_writes_every_field_of_that_node_only(self, store: NodeStore) -> None:
        """update replaces the record by id; the other node is untouched; an unknown id creates nothing."""
        a, b = node(1), node(2)
        await store.create_node(a)
        await store.create_node(b)
        changed = a.with_(state="draining", labels={"x": "y"}, price=None, shared_with=("team-c",),
                          credential_hash="d" * 64, rotated_at=NOW + 9, last_seen_at=NOW + 10, revoked_at=NOW + 11)
        await store.update(changed)
        assert await store.get("node_1") == changed and await store.get("node_2") == b
        assert await store.get_by_credential(a.credential_hash) is None  # rotated away
        await store.update(node(3))
        assert [r.id for r in await store.list()] == ["node_1", "node_2"]

    async def test_listing_is_ordered_and_org_scoped(self, store: NodeStore) -> None:
        """list orders by creation time; org= returns that org's nodes only."""
        for i, org in ((3, "team-a"), (1, "team-b"), (2, "team-a")):
            await store.create_node(node(i, org=org))
        assert [r.id for r in await store.list()] == ["node_1", "node_2", "node_3"]
        assert [r.id for r in await store.list(org="team-a")] == ["node_2", "node_3"]
        assert await store.list(org="team-z") == []

    async def test_names_are_unique_per_org_among_active_nodes(self, store: NodeStore) -> None:
        """Same name in another org: fine. In the same org: refused while active; once revoked,
        the old node gives the name up (renamed name#id) and keeps its id."""
        await store.create_node(node(1, "box", org="team-a"))
        await store.create_node(node(2, "box", org="team-b"))
        with pytest.raises(ValueError, match="already enrolled"):
            await store.create_node(node(3, "box", org="team-a"))
        assert await store.get("node_3") is None
        old = await store.get("node_1")
        assert old is not None
        await store.update(old.with_(revoked_at=NOW + 100))
        await store.create_node(node(4, "box", org="team-a"))
        renamed = await store.get("node_1")
        assert renamed is not None and renamed.name == "box#node_1" and renamed.revoked_at == NOW + 100
        assert sorted((r.org, r.name, r.id) for r in await store.list()) == [
            ("team-a", "box", "node_4"), ("team-a", "box#node_1", "node_1"), ("team-b", "box", "node_2")]

    async def test_concurrent_enrollments_of_one_name_one_wins(self, store: NodeStore) -> None:
        """Eight enrollments racing for one name in one org: one record, seven ValueErrors."""
        outcomes: list[str] = []

        async def enroll(i: int) -> None:
            try:
                await store.create_node(node(i, "racer"))
                outcomes.append("ok")
            except ValueError:
                outcomes.append("taken")
            except StoreError:  # a serialisation failure is also a refusal, never a second record
                outcomes.append("store")

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(enroll, i)
        assert outcomes.count("ok") == 1 and len(outcomes) == 8
        assert [r.name for r in await store.list()] == ["racer"]


class TestConsents:
    async def test_replace_withdraw_and_skip_garbage(self, store: NodeStore, db: SQLDatabase) -> None:
        """set_consent replaces an org's rules, [] withdraws; a row whose JSON is not a list is skipped."""
        rule = {"owner": "team-a", "max_price": {"input": "1", "output": "2"}}
        await store.set_consent("team-b", [rule], at=NOW, by="k1")
        await store.set_consent("team-b", [rule, {"owner": "*"}], at=NOW + 1, by="k2")
        await store.set_consent("team-c", [rule], at=NOW, by=None)
        await store.set_consent("team-c", [], at=NOW + 2, by="k3")
        assert await store.list_consents() == {"team-b": [rule, {"owner": "*"}], "team-c": []}
        with db.engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO node_consents (org, rules, updated_at) VALUES ('team-x', '{oops', 1.0), "
                                 "('team-y', '{\"not\": \"a list\"}', 1.0)"))
        assert await store.list_consents() == {"team-b": [rule, {"owner": "*"}], "team-c": []}


@pytest.mark.postgres
async def test_an_unreachable_database_is_a_store_error() -> None:
    """A database that cannot be opened fails every call with StoreError, never a driver exception."""
    d = SQLDatabase("postgresql://nobody@127.0.0.1:1/none", migrate=False)
    store = SQLNodeStore(d)
    try:
        with pytest.raises(StoreError):
            await store.list()
        with pytest.raises(StoreError):
            await store.consume_token("a" * 64, node_id="node_1", at=NOW)
    finally:
        await d.aclose()
