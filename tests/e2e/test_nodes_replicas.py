"""Node liveness shared across replicas through real Redis: a direct-mode node that
heartbeats to replica A is routable from replica B."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, fake_upstream, gateway_process
from tests.e2e.test_nodes import ADMIN, TEAM_A, admin, agent, client, new_token, wait_for
from tests.services import redis_url

pytestmark = pytest.mark.e2e


@pytest.fixture
def engine() -> Iterator[FakeUpstreamHandle]:
    with fake_upstream("replica-engine", models=["tiny-chat"]) as h:
        yield h


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[str]]:
    url = redis_url(db=10)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
models:
  chat: {{targets: [{{nodes: any, model: tiny-chat}}]}}
auth:
  admin_keys: ["{ADMIN}"]
  pepper: "nodes-test-pepper-0123456789"
  keys: [{{key: "{TEAM_A}", org: team-a}}]
stores: {{state: "{url}", ledger: "sqlite:///{tmp_path / 'shared.db'}"}}
nodes: {{heartbeat_interval_s: 0.5, heartbeat_window_s: 2, allowed_networks: ["127.0.0.1/32"]}}
routing: {{health: {{probe_interval_s: 0}}}}
""")
    urls = []
    with ExitStack() as stack:
        for i in range(2):
            gw = stack.enter_context(gateway_process(recipe, name=f"replica-{i}"))
            urls.append(gw.url)
        yield urls


class TestSharedLiveness:
    def test_node_heartbeating_to_one_replica_serves_through_the_other(
            self, replicas: list[str], engine: FakeUpstreamHandle, tmp_path: Path) -> None:
        """Replica B routes to a node it never heard from, and drops it when its heartbeats stop."""
        a, b = replicas
        with agent(a, engine.base_url, tmp_path / "agent", token=new_token(a), name="box-a"):
            def b_serves() -> bool:
                with client(b) as c:
                    try:
                        raw = c.chat.completions.with_raw_response.create(
                            model="chat", messages=[{"role": "user", "content": "hi"}])
                    except Exception:  # noqa: BLE001 - not yet: B has not adopted the node
                        return False
                    return raw.headers["x-asgi-llm-route"] == "node:box-a@team-a/tiny-chat"
            wait_for(b_serves, 10, "replica B to route to the node heartbeating to replica A")
            nodes_b = admin(b, "GET", "/admin/nodes").json()["data"]
            assert [n["status"] for n in nodes_b if n["name"] == "box-a"] == ["online"]
        # The agent is gone: B must stop routing to it within the heartbeat window.
        def b_dropped() -> bool:
            return [n["status"] for n in admin(b, "GET", "/admin/nodes").json()["data"] if n["name"] == "box-a"] == ["offline"]
        wait_for(b_dropped, 6, "replica B to see the node offline")
