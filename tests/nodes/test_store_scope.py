"""The node store after revision 0005_node_scope, on SQLite and real PostgreSQL: names per
org, consents, and node URLs scrubbed of credentials by the migration."""

from __future__ import annotations

import anyio
import pytest
import sqlalchemy as sa

from asgi_llm.nodes.records import NodeRecord
from asgi_llm.nodes.store import SQLNodeStore
from asgi_llm.stores.sql import SQLDatabase

pytestmark = pytest.mark.anyio


def _node(i: int, name: str, org: str, **kw: object) -> NodeRecord:
    return NodeRecord(id=f"node_{i}", name=name, org=org, credential_hash=f"h{i}", url="http://10.0.0.1:8000/v1",
                      **kw)  # type: ignore[arg-type]


async def test_migration_scrubs_urls_and_scopes_names(sql_url: str) -> None:
    """Rows from before 0005: credentials/query/fragment leave stored URLs; names become per org."""
    db = SQLDatabase(sql_url, migrate=False)
    await anyio.to_thread.run_sync(lambda: db.upgrade("0003_nodes"))
    with db.engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO nodes (id, name, org, credential_hash, mode, url, labels, models, shared_with, availability, "
            "state, created_at) VALUES ('node_old', 'box', 'team-a', 'hx', 'direct', "
            "'http://bob:hunter2@10.0.0.9:8000/v1?key=abc#x', '{}', '[]', '[]', '{\"mode\": \"always\"}', 'active', 1.0)"))
    await anyio.to_thread.run_sync(db.upgrade)
    store = SQLNodeStore(db)
    old = await store.get("node_old")
    assert old is not None and old.url == "http://10.0.0.9:8000/v1"
    # Another org may now use the same name while team-a's node is active; team-a may not.
    await store.create_node(_node(1, "box", "team-b"))
    with pytest.raises(ValueError, match="already enrolled"):
        await store.create_node(_node(2, "box", "team-a"))
    # Revoked: the name is given up (renamed name#id), its id — its history — stays.
    await store.update(old.with_(revoked_at=2.0))
    await store.create_node(_node(3, "box", "team-a"))
    renamed = await store.get("node_old")
    assert renamed is not None and renamed.name == "box#node_old"
    assert sorted((r.org, r.name) for r in await store.list()) == [("team-a", "box"), ("team-a", "box#node_old"),
                                                                 ("team-b", "box")]
    await db.aclose()


async def test_consents_round_trip(sql_url: str) -> None:
    """set_consent replaces an org's rules; [] withdraws them."""
    db = SQLDatabase(sql_url)
    await anyio.to_thread.run_sync(db.upgrade)
    store = SQLNodeStore(db)
    rule = {"owner": "team-a", "max_price": {"input": "1", "output": "2"}}
    await store.set_consent("team-b", [rule], at=1.0, by="k1")
    await store.set_consent("team-c", [rule, {**rule, "owner": "*"}], at=1.0, by="k1")
    await store.set_consent("team-b", [], at=2.0, by="k2")
    assert await store.list_consents() == {"team-b": [], "team-c": [rule, {**rule, "owner": "*"}]}
    await db.aclose()
