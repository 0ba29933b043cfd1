"""The registry's resolution cache: always the answer a fresh scan would give.

``NodeRegistry.resolve`` caches its node targets per (selector, org); these tests change
the registry in every way the gateway does (records put / reloaded, heartbeats, agent
state, tunnels, forgetting, time passing, availability windows) and check each answer
against a from-scratch reference scan.
"""

from __future__ import annotations

import random
import time
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from asgi_llm.nodes.consent import AcceptRule, accepts
from asgi_llm.nodes.netpolicy import NetworkPolicy
from asgi_llm.nodes.records import NodeRecord
from asgi_llm.nodes.registry import NodeRegistry, NodeTarget, _matches, node_provider
from asgi_llm.nodes.selector import NodeSelector
from asgi_llm.nodes.tunnel import TunnelConnection
from asgi_llm.routing.router import Price, Target


class _Store:
    def __init__(self) -> None:
        self.rows: list[NodeRecord] = []

    async def list(self) -> list[NodeRecord]:
        return list(self.rows)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ctx(org: str) -> Any:
    return SimpleNamespace(principal=SimpleNamespace(org=org))


def _record(i: int, **kw: Any) -> NodeRecord:
    base: dict[str, Any] = {"id": f"node_{i}", "name": f"box{i}", "org": "team-a", "credential_hash": f"h{i}",
                            "url": "http://127.0.0.1:9/v1", "models": [{"id": "m", "context_length": 4096}]}
    base.update(kw)
    return NodeRecord(**base)


# team-b accepts team-a's shared nodes up to 0.5/1 USD per 1M; team-c accepts nobody's.
CONSENTS = {"team-b": (AcceptRule("team-a", Decimal("0.5"), Decimal("1")),)}


def _registry() -> tuple[NodeRegistry, _Clock]:
    clock = _Clock()
    reg = NodeRegistry(_Store(), pepper=lambda: b"p" * 32, window_s=15.0, clock=clock,  # type: ignore[arg-type]
                       policy=NetworkPolicy.from_config(["127.0.0.1/32"]), accept_shared=CONSENTS)
    return reg, clock


def _reference(reg: NodeRegistry, spec: NodeSelector, org: str) -> list[Target]:
    """The uncached scan (the registry's behaviour before caching)."""
    out: list[Target] = []
    for record in sorted(reg.records.values(), key=lambda r: r.name):
        consented = org == record.org or (record.visible_to(org)
                                          and accepts(CONSENTS.get(org, ()), record.org, record.price_decimal()))
        if not consented or not _matches(spec.selector, record):
            continue
        if not any(m.get("id") == spec.model for m in record.models):
            continue
        if not reg.routable(record):
            continue
        price = spec.price
        owner = record.price_decimal()
        if owner is not None:
            price = Price(owner[0], owner[1])
        window = next((m.get("context_length") for m in record.models if m.get("id") == spec.model), None)
        out.append(NodeTarget(provider=node_provider(record.name, record.org), model=spec.model, price=price,
                              weight=spec.weight,
                              context_window=spec.context_window or (window if isinstance(window, int) else None),
                              prefill=spec.prefill, kind="node", node=record.id))
    return out


SPECS = [NodeSelector("any", "m"), NodeSelector("label:gpu=a100", "m", price=Price(Decimal(1), Decimal(2))),
         NodeSelector("box1,box3", "m", weight=2.0), NodeSelector("any", "other", context_window=100)]
ORGS = ["team-a", "team-b", "team-c"]


def _check(reg: NodeRegistry) -> None:
    for spec in SPECS:
        for org in ORGS:
            for _ in range(2):  # a miss, then a hit
                assert reg.resolve(spec, _ctx(org)) == _reference(reg, spec, org)


class TestResolveCache:
    """Cached answers match a fresh scan after every kind of change."""

    def test_hits_return_fresh_lists(self) -> None:
        """A hit returns the same targets, in a list the caller may change."""
        reg, _ = _registry()
        r = _record(1)
        reg.put(r)
        reg.heartbeat(r, load={}, agent_state="ready")
        first = reg.resolve(SPECS[0], _ctx("team-a"))
        first.clear()
        assert [t.provider for t in reg.resolve(SPECS[0], _ctx("team-a"))] == ["node:box1@team-a"]

    def test_node_goes_offline_without_any_event(self) -> None:
        """A node silent past the window drops out at once, cached or not."""
        reg, clock = _registry()
        for i in (1, 2):
            reg.put(_record(i))
            reg.heartbeat(_record(i), load={}, agent_state="ready")
        clock.now += 10
        reg.heartbeat(_record(2), load={}, agent_state="ready")
        assert len(reg.resolve(SPECS[0], _ctx("team-a"))) == 2
        clock.now += 5.0  # box1 exactly at the window edge: still online
        assert len(reg.resolve(SPECS[0], _ctx("team-a"))) == 2
        clock.now += 0.001
        assert [t.provider for t in reg.resolve(SPECS[0], _ctx("team-a"))] == ["node:box2@team-a"]
        clock.now += 10
        assert reg.resolve(SPECS[0], _ctx("team-a")) == []

    def test_revoke_cordon_drain_and_forget(self) -> None:
        """Record changes, agent state and forgetting take effect on the next request."""
        reg, _ = _registry()
        for i in (1, 2, 3, 4):
            reg.put(_record(i))
            reg.heartbeat(_record(i), load={}, agent_state="ready")
        _check(reg)
        reg.put(reg.records["node_1"].with_(revoked_at=1.0))
        reg.put(reg.records["node_2"].with_(state="cordoned"))
        reg.heartbeat(reg.records["node_3"], load={}, agent_state="draining")
        assert [t.provider for t in reg.resolve(SPECS[0], _ctx("team-a"))] == ["node:box4@team-a"]
        _check(reg)

    @pytest.mark.anyio
    async def test_forget_and_reload(self) -> None:
        """Forgetting a node's liveness, or a reload dropping it, takes it out."""
        reg, _ = _registry()
        store = reg.store
        for i in (1, 2):
            reg.put(_record(i))
            store.rows.append(_record(i))  # type: ignore[attr-defined]
            reg.heartbeat(_record(i), load={}, agent_state="ready")
        assert len(reg.resolve(SPECS[0], _ctx("team-a"))) == 2
        await reg.forget("node_1")
        assert [t.provider for t in reg.resolve(SPECS[0], _ctx("team-a"))] == ["node:box2@team-a"]
        store.rows[1] = store.rows[1].with_(shared_with=("team-b",))  # type: ignore[attr-defined]
        await reg.reload()
        assert [t.provider for t in reg.resolve(SPECS[0], _ctx("team-b"))] == ["node:box2@team-a"]
        _check(reg)
        await reg.aclose()
        assert reg.resolve(SPECS[0], _ctx("team-a")) == []

    def test_availability_window_follows_the_minute(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A node with availability windows enters and leaves routing as the UTC minute turns."""
        reg, _ = _registry()
        r = _record(1, availability={"mode": "windows", "windows": ["12:00-12:01"]})
        reg.put(r)
        reg.heartbeat(r, load={}, agent_state="ready")
        noon = time.mktime((2025, 1, 1, 12, 0, 0, 0, 0, 0)) - time.timezone
        now = [noon - 1]
        monkeypatch.setattr(time, "time", lambda: now[0])
        assert reg.resolve(SPECS[0], _ctx("team-a")) == []
        now[0] = noon
        assert len(reg.resolve(SPECS[0], _ctx("team-a"))) == 1
        now[0] = noon + 59.9
        assert len(reg.resolve(SPECS[0], _ctx("team-a"))) == 1
        now[0] = noon + 60
        assert reg.resolve(SPECS[0], _ctx("team-a")) == []

    def test_tunnel_close_attach_detach(self) -> None:
        """A tunnel node leaves routing when its tunnel closes or detaches, returns on attach."""
        reg, _ = _registry()

        async def send(text: str) -> None:
            return None

        r = _record(1, mode="tunnel", url=None)
        reg.put(r)
        reg.heartbeat(r, load={}, agent_state="ready")
        assert reg.resolve(SPECS[0], _ctx("team-a")) == []  # no tunnel yet
        conn = TunnelConnection(send, name="box1")
        reg.attach_tunnel(r, conn)
        assert len(reg.resolve(SPECS[0], _ctx("team-a"))) == 1
        conn.closed = True  # closed from the socket side, registry not told yet
        assert reg.resolve(SPECS[0], _ctx("team-a")) == []
        conn2 = TunnelConnection(send, name="box1")
        reg.attach_tunnel(r, conn2)
        assert len(reg.resolve(SPECS[0], _ctx("team-a"))) == 1
        reg.detach_tunnel(r, conn2)
        assert reg.resolve(SPECS[0], _ctx("team-a")) == []

    def test_rename_moves_load_and_adapter(self) -> None:
        """extra_load / adapter / by_name follow renames and new nodes."""
        reg, _ = _registry()
        r = _record(1)
        reg.put(r)
        reg.heartbeat(r, load={"queue_depth": 2.0, "kv_cache_usage": 0.5}, agent_state="ready")
        target = reg.resolve(SPECS[0], _ctx("team-a"))[0]
        assert reg.extra_load(target) == 2.5 and reg.adapter("node:box1@team-a") is not None
        renamed = r.with_(name="big")
        reg.put(renamed)
        assert reg.extra_load(target) == 0.0 and reg.adapter("node:box1@team-a") is None
        assert reg.by_name("big", "team-a") == renamed and reg.by_name("box1", "team-a") is None
        assert reg.by_name("big", "team-b") is None  # names are per org
        assert reg.extra_load(Target("node:big@team-a", "m", kind="node")) == 2.5
        assert reg.extra_load(Target("node:big@team-a", "m")) == 0.0  # not a node target
        assert reg.adapter("openai") is None

    @pytest.mark.anyio
    async def test_random_changes_match_a_fresh_scan(self) -> None:
        """Random sequences of every registry change: each answer equals the reference."""
        rng = random.Random(7)
        reg, clock = _registry()
        ids = list(range(8))
        for step in range(600):
            i = rng.choice(ids)
            nid = f"node_{i}"
            cur = reg.records.get(nid) or _record(i)
            op = rng.randrange(9)
            if op == 0:
                reg.put(cur.with_(state=rng.choice(["active", "active", "cordoned", "draining"])))
            elif op == 1:
                reg.put(cur.with_(labels=rng.choice([{}, {"gpu": "a100"}])))
            elif op == 2:
                reg.put(cur.with_(shared_with=rng.choice([(), ("team-b",), ("*",)]), org=rng.choice(["team-a", "team-c"])))
            elif op == 3:
                reg.put(cur.with_(models=rng.choice([[{"id": "m"}], [{"id": "other", "context_length": 8}], []]),
                                  price=rng.choice([None, {"input": "0.5", "output": "1"}])))
            elif op in (4, 5):
                reg.put(cur)
                reg.heartbeat(cur, load={"queue_depth": float(step)}, agent_state=rng.choice(["ready", "ready", "draining"]))
            elif op == 6:
                clock.now += rng.choice([0.5, 3.0, 7.0, 16.0])
            elif op == 7:
                await reg.forget(nid)
            else:
                reg.put(cur.with_(revoked_at=rng.choice([None, None, 5.0])))
            _check(reg)
        await reg.aclose()
