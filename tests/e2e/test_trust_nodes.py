"""Tenancy and SSRF for BYOI nodes, against real gateway processes and real agents
(`asgi-llm node join`): consent to shared capacity, fixed node URLs under a network
policy, per-org names, one tunnel per credential, bounded numbers (issue 12, items 3, 4,
8, 10, 11 — the node parts).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, GatewayHandle, fake_upstream, gateway_process
from tests.e2e.test_nodes import agent, client, wait_for

pytestmark = pytest.mark.e2e

ADMIN = "sk-admin-trust-nodes-0123"
KEYS = {org: f"sk-{org}-inference-key" for org in ("org-a", "org-b", "org-c")}
ORG_ADMIN = {org: f"sk-{org}-admin-key-01" for org in ("org-a", "org-b", "org-c")}
MSG = [{"role": "user", "content": "secret prompt"}]


class Recorder:
    """A tiny HTTP service on 127.0.0.1 that records every hit (the SSRF target)."""

    def __init__(self) -> None:
        hits: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def _hit(self) -> None:
                hits.append(f"{self.command} {self.path}")
                body = b'{"internal": "secret"}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _hit

            def log_message(self, *args: Any) -> None:
                pass

        self.hits = hits
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class AbsurdEngine:
    """An OpenAI-compatible engine (behind a real agent) that reports 2**70 prompt tokens."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def _json(self, status: int, obj: Any) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/v1/models"):
                    self._json(200, {"object": "list", "data": [{"id": "tiny-chat", "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "no"}})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self._json(200, {"id": "x", "object": "chat.completion", "model": "tiny-chat",
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                              "finish_reason": "stop"}],
                                 "usage": {"prompt_tokens": 2**70, "completion_tokens": -5, "total_tokens": 2**71}})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> AbsurdEngine:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _recipe(tmp: Path, fallback: FakeUpstreamHandle, nodes_extra: str) -> Path:
    keys = "\n".join(f'    - {{key: "{KEYS[o]}", org: {o}}}\n    - {{key: "{ORG_ADMIN[o]}", org: {o}, scopes: [admin]}}'
                     for o in KEYS)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"""\
providers:
  fallback: {{base_url: "{fallback.base_url}", timeout_s: 10}}
models:
  chat: {{targets: [{{nodes: any, model: tiny-chat}}, {{provider: fallback, model: fallback-chat}}]}}
  nodes-only: {{targets: [{{nodes: any, model: tiny-chat}}]}}
auth:
  admin_keys: ["{ADMIN}"]
  pepper: "trust-nodes-pepper-0123456789"
  keys:
{keys}
stores: {{ledger: "sqlite:///{tmp / 'gw.db'}"}}
usage: {{flush_interval_s: 0.05}}
nodes: {{heartbeat_interval_s: 0.5, heartbeat_window_s: 2{nodes_extra}}}
routing: {{health: {{failure_threshold: 1000, probe_interval_s: 0}}}}
""")
    return recipe


@pytest.fixture(scope="module")
def fallback() -> Iterator[FakeUpstreamHandle]:
    with fake_upstream("trust-fallback", models=["fallback-chat"]) as h:
        yield h


@pytest.fixture(scope="module")
def engine_b() -> Iterator[FakeUpstreamHandle]:
    """Org B's engine (behind its node): counts the prompts it receives."""
    with fake_upstream("engine-b", models=["tiny-chat"]) as h:
        yield h


@pytest.fixture(scope="module")
def gw(fallback: FakeUpstreamHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    """Loopback explicitly allowed (the agents run on 127.0.0.1); org A accepts org B's free nodes."""
    tmp = tmp_path_factory.mktemp("trust-nodes")
    extra = ', allowed_networks: ["127.0.0.1/32"], accept_shared: {org-a: [{owner: org-b, max_price: {input: 0, output: 0}}]}'
    with gateway_process(_recipe(tmp, fallback, extra), name="trust-gw") as g:
        yield g


@pytest.fixture(scope="module")
def strict_gw(fallback: FakeUpstreamHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayHandle]:
    """The default policy: loopback, link-local and unspecified refused."""
    tmp = tmp_path_factory.mktemp("trust-nodes-strict")
    with gateway_process(_recipe(tmp, fallback, ""), name="trust-gw-strict") as g:
        yield g


def admin(url: str, method: str, path: str, body: Any = None, key: str = ADMIN) -> httpx2.Response:
    with httpx2.Client(timeout=10, trust_env=False) as http:
        return http.request(method, url + path, json=body, headers={"authorization": f"Bearer {key}"})


def admin_raw(url: str, method: str, path: str, raw: str, key: str = ADMIN) -> httpx2.Response:
    """A hand-written JSON body (NaN / Infinity literals a JSON encoder would refuse)."""
    with httpx2.Client(timeout=10, trust_env=False) as http:
        return http.request(method, url + path, content=raw,
                            headers={"authorization": f"Bearer {key}", "content-type": "application/json"})


def token(url: str, org: str, key: str = ADMIN, **extra: Any) -> str:
    body = {"org": org, **extra} if key == ADMIN else extra
    resp = admin(url, "POST", "/admin/enrollment-tokens", body, key=key)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["token"])


def enroll(url: str, tok: str, body: dict[str, Any]) -> httpx2.Response:
    with httpx2.Client(timeout=10, trust_env=False) as http:
        return http.post(url + "/nodes/enroll", json=body, headers={"authorization": f"Bearer {tok}"})


def node_call(url: str, path: str, credential: str, body: Any) -> httpx2.Response:
    with httpx2.Client(timeout=10, trust_env=False) as http:
        return http.post(url + path, json=body, headers={"authorization": f"Bearer {credential}"})


def nodes(url: str) -> list[dict[str, Any]]:
    return list(admin(url, "GET", "/admin/nodes").json()["data"])


def node_by_name(url: str, name: str, org: str) -> dict[str, Any]:
    return next(n for n in nodes(url) if n["name"] == name and n["org"] == org and n["revoked_at"] is None)


def chat_route(url: str, org: str, model: str = "chat") -> str:
    with client(url, KEYS[org]) as c:
        raw = c.chat.completions.with_raw_response.create(model=model, messages=MSG)
        assert raw.parse().choices[0].message.content
        return str(raw.headers["x-asgi-llm-route"])


def engine_hits(engine: FakeUpstreamHandle) -> int:
    return int(engine.stats()["requests"].get("/v1/chat/completions", 0))


def assert_error(resp: httpx2.Response, status: int, *, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


class TestSharedCapacityConsent:
    """Item 3: a shared node serves another org only with that org's consent, up to its price."""

    def test_share_with_everyone_needs_the_recipe_admin(self, gw: GatewayHandle, engine_b: FakeUpstreamHandle,
                                                         tmp_path: Path) -> None:
        """An org admin sharing with "*" (PATCH or token defaults) → 403; the recipe admin may."""
        err = assert_error(admin(gw.url, "POST", "/admin/enrollment-tokens", {"shared_with": ["*"]},
                                 key=ORG_ADMIN["org-b"]), 403)
        assert "recipe admin" in err["message"]
        with agent(gw.url, engine_b.base_url, tmp_path / "b", token=token(gw.url, "org-b"), name="b-box"):
            node = node_by_name(gw.url, "b-box", "org-b")
            try:
                resp = admin(gw.url, "PATCH", f"/admin/nodes/{node['id']}", {"shared_with": ["*"]}, key=ORG_ADMIN["org-b"])
                assert_error(resp, 403)
                # Named orgs are fine for an org admin (the consumer must still accept).
                ok = admin(gw.url, "PATCH", f"/admin/nodes/{node['id']}", {"shared_with": ["org-c"]}, key=ORG_ADMIN["org-b"])
                assert ok.status_code == 200 and ok.json()["shared_with"] == ["org-c"]
                assert chat_route(gw.url, "org-c") == "fallback/fallback-chat"  # shared, not accepted
                ok = admin(gw.url, "PATCH", f"/admin/nodes/{node['id']}", {"shared_with": ["*"]})
                assert ok.status_code == 200 and ok.json()["shared_with"] == ["*"]
                # The recipe's consent (org-a accepts org-b's nodes at price 0) applies; org C has none.
                assert chat_route(gw.url, "org-a") == "node:b-box@org-b/tiny-chat"
                assert chat_route(gw.url, "org-c") == "fallback/fallback-chat"
                mine = admin(gw.url, "GET", "/admin/node-acceptance", key=ORG_ADMIN["org-a"]).json()
                assert mine["accept"] == [] and mine["recipe"] == [{"owner": "org-b", "max_price": {"input": "0", "output": "0"}}]
                # A price above the recipe's cap takes it out of org A's routes.
                admin(gw.url, "PATCH", f"/admin/nodes/{node['id']}", {"price": {"input": "0.01", "output": "0"}})
                assert chat_route(gw.url, "org-a") == "fallback/fallback-chat"
            finally:
                admin(gw.url, "POST", f"/admin/nodes/{node['id']}/revoke")

    def test_consent_and_price_cap(self, gw: GatewayHandle, engine_b: FakeUpstreamHandle, tmp_path: Path) -> None:
        """B's node shared with "*" at $5,000/1M: org C without consent never reaches it (its own
        route serves; a nodes-only model is a clean 503); consent capped below B's price →
        still not used; consent at or above B's price → used; withdrawn → not used."""
        with agent(gw.url, engine_b.base_url, tmp_path / "b2", token=token(gw.url, "org-b"), name="b-gpu"):
            node = node_by_name(gw.url, "b-gpu", "org-b")
            try:
                shared = admin(gw.url, "PATCH", f"/admin/nodes/{node['id']}",
                               {"shared_with": ["*"], "price": {"input": "5000", "output": "5000"}})
                assert shared.status_code == 200, shared.text
                assert chat_route(gw.url, "org-b") == "node:b-gpu@org-b/tiny-chat"
                before = engine_hits(engine_b)
                for _ in range(3):
                    assert chat_route(gw.url, "org-c") == "fallback/fallback-chat"
                with httpx2.Client(timeout=10, trust_env=False) as http:
                    resp = http.post(gw.url + "/v1/chat/completions", json={"model": "nodes-only", "messages": MSG},
                                     headers={"authorization": f"Bearer {KEYS['org-c']}"})
                assert resp.status_code in (404, 503), resp.text
                assert_error(resp, resp.status_code)
                assert engine_hits(engine_b) == before  # org C's prompt never reached org B's engine
                # Consent below B's price: still not used.
                low = admin(gw.url, "PUT", "/admin/node-acceptance",
                            {"accept": [{"owner": "org-b", "max_price": {"input": 1, "output": 1}}]}, key=ORG_ADMIN["org-c"])
                assert low.status_code == 200, low.text
                assert low.json()["accept"] == [{"owner": "org-b", "max_price": {"input": "1", "output": "1"}}]
                assert chat_route(gw.url, "org-c") == "fallback/fallback-chat"
                assert engine_hits(engine_b) == before
                # An org admin cannot consent for another org.
                assert_error(admin(gw.url, "PUT", "/admin/node-acceptance",
                                   {"org": "org-a", "accept": []}, key=ORG_ADMIN["org-c"]), 403)
                # Consent at B's price: B's node serves org C.
                ok = admin(gw.url, "PUT", "/admin/node-acceptance",
                           {"accept": [{"owner": "org-b", "max_price": {"input": 5000, "output": 5000}}]}, key=ORG_ADMIN["org-c"])
                assert ok.status_code == 200, ok.text
                assert chat_route(gw.url, "org-c") == "node:b-gpu@org-b/tiny-chat"
                assert engine_hits(engine_b) == before + 1
                # Org A (no consent) still never reaches it.
                assert chat_route(gw.url, "org-a") == "fallback/fallback-chat"
                # Withdrawn: back to org C's own route.
                admin(gw.url, "PUT", "/admin/node-acceptance", {"accept": []}, key=ORG_ADMIN["org-c"])
                assert chat_route(gw.url, "org-c") == "fallback/fallback-chat"
                assert engine_hits(engine_b) == before + 1
            finally:
                admin(gw.url, "PUT", "/admin/node-acceptance", {"org": "org-c", "accept": []})
                admin(gw.url, "POST", f"/admin/nodes/{node['id']}/revoke")

    def test_bad_acceptance_is_a_400(self, gw: GatewayHandle) -> None:
        """Acceptance rules are validated: an owner, a finite max_price in range."""
        for accept in ([{"owner": "org-b"}], [{"owner": "org-b", "max_price": {"input": "NaN", "output": 1}}],
                       [{"owner": "", "max_price": {"input": 1, "output": 1}}], "org-b",
                       [{"owner": "org-b", "max_price": {"input": 1, "output": 1}, "extra": 1}]):
            assert_error(admin(gw.url, "PUT", "/admin/node-acceptance", {"accept": accept}, key=ORG_ADMIN["org-c"]), 400)
        assert_error(admin(gw.url, "PUT", "/admin/node-acceptance", {"accept": []}), 400, param="org")


class TestNodeURLs:
    """Items 4 and 8: a node's URL is fixed at enrollment, checked against the network policy,
    free of query, fragment, '..' and credentials; the internal service records 0 hits."""

    def test_heartbeat_cannot_move_a_node(self, gw: GatewayHandle, engine_b: FakeUpstreamHandle, tmp_path: Path) -> None:
        """A heartbeat naming an internal URL is ignored; traffic keeps going to the engine."""
        with Recorder() as rec, agent(gw.url, engine_b.base_url, tmp_path / "hb", token=token(gw.url, "org-a"),
                                      name="a-hb"):
            credential = json.loads((tmp_path / "hb" / "node.json").read_text())["credential"]
            evil = f"http://127.0.0.1:{rec.port}/internal/secret?x=1#"
            for url in (evil, f"http://127.0.0.1:{rec.port}/v1", "redis://127.0.0.1:6379"):
                resp = node_call(gw.url, "/nodes/heartbeat", credential, {"status": "ready", "mode": "direct", "url": url})
                assert resp.status_code == 200 and resp.json()["url_ignored"] is True, resp.text
                assert chat_route(gw.url, "org-a") == "node:a-hb@org-a/tiny-chat"
            stored = node_by_name(gw.url, "a-hb", "org-a")["url"]
            assert str(rec.port) not in stored
            # Re-registration is checked like enrollment.
            for url in (evil, f"http://user:hunter2@127.0.0.1:{rec.port}/v1", f"http://127.0.0.1:{rec.port}/v1/../internal",
                        f"http://127.0.0.1:{gw.port}/v1"):
                resp = node_call(gw.url, "/nodes/register", credential, {"mode": "direct", "url": url})
                err = assert_error(resp, 400, param="url")
                assert "hunter2" not in err["message"]
            assert chat_route(gw.url, "org-a") == "node:a-hb@org-a/tiny-chat"
            node_id = node_by_name(gw.url, "a-hb", "org-a")["id"]

            def audited() -> list[dict[str, Any]]:
                rows = admin(gw.url, "GET", "/admin/audit?action=POST /nodes/register&limit=1000").json()["data"]
                return [r for r in rows if r.get("target") == node_id]

            # Every re-registration is in the audit log (the agent's own at start-up is not: it
            # enrolled fresh), with the requested URL redacted.
            wait_for(lambda: len(audited()) >= 4, 10, "re-registrations in the audit log")
            events = audited()
            assert all(e["status"] == 400 for e in events)
            assert "hunter2" not in json.dumps(events) and any("requested_url" in (e.get("detail") or {}) for e in events)
            admin(gw.url, "POST", f"/admin/nodes/{node_id}/revoke")
            assert rec.hits == []

    def test_enrollment_refuses_bad_urls(self, gw: GatewayHandle, strict_gw: GatewayHandle) -> None:
        """'?', '#', userinfo, '..', non-http schemes → 400 and the token is not spent;
        loopback / link-local / localhost refused where allowed_networks does not allow them;
        the gateway's own address refused even where loopback is allowed."""
        with Recorder() as rec:
            tok = token(gw.url, "org-a")
            base = f"http://127.0.0.1:{rec.port}"
            for url in (f"{base}/internal/secret?x=1", f"{base}/v1#frag", f"http://admin:hunter2@127.0.0.1:{rec.port}/v1",
                        f"{base}/v1/../internal", f"{base}/v1/%2e%2e/x", "redis://127.0.0.1:6379", "file:///etc/passwd",
                        f"http://127.0.0.1:{gw.port}/v1"):
                err = assert_error(enroll(gw.url, tok, {"name": "bad-url", "mode": "direct", "url": url, "models": ["m"]}),
                                   400, param="url")
                assert "hunter2" not in err["message"]
            stok = token(strict_gw.url, "org-a")
            for url in (f"{base}/v1", f"http://localhost:{rec.port}/v1", "http://169.254.169.254/latest",
                        f"http://[::1]:{rec.port}/v1", "http://0.0.0.0:80/v1", f"http://[::ffff:127.0.0.1]:{rec.port}/v1"):
                err = assert_error(enroll(strict_gw.url, stok, {"name": "loop", "mode": "direct", "url": url, "models": ["m"]}),
                                   400, param="url")
                assert err["code"] == "node_url_not_allowed", err
            # Neither token was spent by the refusals: both still enroll (tunnel mode needs no URL).
            ok = enroll(gw.url, tok, {"name": "after-refusals", "mode": "tunnel", "models": ["m"]})
            assert ok.status_code == 201, ok.text
            ok2 = enroll(strict_gw.url, stok, {"name": "after-refusals", "mode": "tunnel", "models": ["m"]})
            assert ok2.status_code == 201, ok2.text
            admin(gw.url, "POST", f"/admin/nodes/{ok.json()['node_id']}/revoke")
            admin(strict_gw.url, "POST", f"/admin/nodes/{ok2.json()['node_id']}/revoke")
            assert rec.hits == []


class TestNamesPerOrg:
    """Item 10: names are per org; a reused name never inherits another node's history."""

    def test_revoked_name_reused_by_another_org(self, gw: GatewayHandle, engine_b: FakeUpstreamHandle,
                                                tmp_path: Path) -> None:
        """Org B enrolling org A's revoked name gets its own identity; A's report is unchanged."""
        with agent(gw.url, engine_b.base_url, tmp_path / "a", token=token(gw.url, "org-a"), name="same-name"):
            for _ in range(3):
                assert chat_route(gw.url, "org-a") == "node:same-name@org-a/tiny-chat"
            a_id = node_by_name(gw.url, "same-name", "org-a")["id"]
        assert admin(gw.url, "POST", f"/admin/nodes/{a_id}/revoke").json()["status"] == "revoked"
        admin(gw.url, "POST", "/admin/usage/flush")
        before = next(r for r in admin(gw.url, "GET", "/admin/nodes/report").json()["data"] if r["node_id"] == a_id)
        assert before["requests"] == 3 and before["owner"] == "org-a"
        with agent(gw.url, engine_b.base_url, tmp_path / "b", token=token(gw.url, "org-b"), name="same-name"):
            b = node_by_name(gw.url, "same-name", "org-b")
            assert b["id"] != a_id
            for _ in range(2):
                assert chat_route(gw.url, "org-b") == "node:same-name@org-b/tiny-chat"
            assert chat_route(gw.url, "org-a") == "fallback/fallback-chat"
            admin(gw.url, "POST", "/admin/usage/flush")
            report = admin(gw.url, "GET", "/admin/nodes/report").json()["data"]
            a_row = next(r for r in report if r["node_id"] == a_id)
            b_row = next(r for r in report if r["node_id"] == b["id"])
            assert a_row["requests"] == 3 and a_row["owner"] == "org-a"
            assert b_row["requests"] == 2 and b_row["owner"] == "org-b"
            # Org A's admin sees only its own node's row.
            a_view = admin(gw.url, "GET", "/admin/nodes/report", key=ORG_ADMIN["org-a"]).json()["data"]
            assert a_id in {r["node_id"] for r in a_view} and b["id"] not in {r["node_id"] for r in a_view}
            assert {r["owner"] for r in a_view} == {"org-a"}
            admin(gw.url, "POST", f"/admin/nodes/{b['id']}/revoke")

    def test_same_name_in_two_orgs_at_once(self, gw: GatewayHandle) -> None:
        """Two active nodes called the same in two orgs; a duplicate within one org is a 409."""
        first = enroll(gw.url, token(gw.url, "org-a"), {"name": "twin", "mode": "tunnel", "models": ["m"]})
        second = enroll(gw.url, token(gw.url, "org-b"), {"name": "twin", "mode": "tunnel", "models": ["m"]})
        assert first.status_code == 201 and second.status_code == 201, (first.text, second.text)
        again_tok = token(gw.url, "org-a")
        assert_error(enroll(gw.url, again_tok, {"name": "twin", "mode": "tunnel", "models": ["m"]}), 409)
        for r in (first, second):
            admin(gw.url, "POST", f"/admin/nodes/{r.json()['node_id']}/revoke")


class TestOneTunnelPerCredential:
    """Item 11: a new WebSocket with the same credential replaces and closes the old one."""

    def test_second_tunnel_closes_the_first(self, gw: GatewayHandle) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        resp = enroll(gw.url, token(gw.url, "org-a"), {"name": "tun-one", "mode": "tunnel", "models": ["m"]})
        assert resp.status_code == 201, resp.text
        credential = resp.json()["credential"]
        ws_url = gw.url.replace("http://", "ws://") + "/nodes/tunnel"
        headers = {"authorization": f"Bearer {credential}"}
        sockets: list[Any] = []
        try:
            with ExitStack() as stack:
                for _ in range(10):
                    sockets.append(stack.enter_context(connect(ws_url, additional_headers=headers, open_timeout=5)))

                def closed(ws: Any) -> bool:
                    try:
                        ws.recv(timeout=0.05)
                    except TimeoutError:
                        return False
                    except ConnectionClosed:
                        return True
                    return False

                wait_for(lambda: all(closed(ws) for ws in sockets[:-1]), 10, "superseded tunnels to close")
                assert all(ws.close_code == 4409 for ws in sockets[:-1]), [ws.close_code for ws in sockets[:-1]]
                assert not closed(sockets[-1])  # the newest stays open
                assert sum(1 for ws in sockets if ws.close_code is None) == 1
        finally:
            admin(gw.url, "POST", f"/admin/nodes/{resp.json()['node_id']}/revoke")


class TestNumbers:
    """Item 2 (source side): prices and node-reported numbers are finite and bounded."""

    def test_absurd_prices_are_refused(self, gw: GatewayHandle) -> None:
        """PATCH price NaN / 1e30 / Infinity / negative / bool → 400 naming the field; a sane one is kept."""
        resp = enroll(gw.url, token(gw.url, "org-a"), {"name": "priced", "mode": "tunnel", "models": ["m"]})
        node_id = resp.json()["node_id"]
        try:
            for bad in ("NaN", "1e30", "Infinity", "-Infinity", "-1", True, "10000.01", "1" * 60, None, [1]):
                for key in (ORG_ADMIN["org-a"], ADMIN):
                    r = admin(gw.url, "PATCH", f"/admin/nodes/{node_id}", {"price": {"input": bad, "output": 1}}, key=key)
                    assert_error(r, 400, param="price.input")
            ok = admin(gw.url, "PATCH", f"/admin/nodes/{node_id}", {"price": {"input": "0.5", "output": 10000}},
                       key=ORG_ADMIN["org-a"])
            assert ok.status_code == 200 and ok.json()["price"] == {"input": "0.5", "output": "10000"}, ok.text
            # Enrollment-token defaults and the node's own price are checked the same way.
            assert_error(admin(gw.url, "POST", "/admin/enrollment-tokens", {"org": "org-a", "price": {"input": "NaN"}}),
                         400, param="price.input")
            # Not JSON at all: refused by the body parser before any field is read.
            err = assert_error(admin_raw(gw.url, "POST", "/admin/enrollment-tokens", '{"org": "org-a", "ttl_s": Infinity}'),
                               400)
            assert err["code"] == "invalid_json"
            err = assert_error(admin_raw(gw.url, "PATCH", f"/admin/nodes/{node_id}", '{"price": {"input": NaN, "output": 1}}'),
                               400)
            assert err["code"] == "invalid_json"
            assert_error(enroll(gw.url, token(gw.url, "org-a"),
                                {"name": "p2", "mode": "tunnel", "models": ["m"], "price": {"input": "1e30"}}), 400)
        finally:
            admin(gw.url, "POST", f"/admin/nodes/{node_id}/revoke")

    def test_absurd_load_is_clamped(self, gw: GatewayHandle) -> None:
        """Heartbeat load: 2**70, NaN, negatives, strings → clamped or dropped, never stored raw."""
        resp = enroll(gw.url, token(gw.url, "org-a"), {"name": "loady", "mode": "tunnel", "models": ["m"]})
        credential, node_id = resp.json()["credential"], resp.json()["node_id"]
        try:
            raw = ('{"status": "ready", "load": {"queue_depth": %d, "running": -5, "kv_cache_usage": NaN, '
                   '"in_flight": "many", "evil": 1}}' % 2**70)
            with httpx2.Client(timeout=10, trust_env=False) as http:
                hb = http.post(gw.url + "/nodes/heartbeat", content=raw,
                               headers={"authorization": f"Bearer {credential}", "content-type": "application/json"})
            assert hb.status_code == 200, hb.text
            listed = admin(gw.url, "GET", f"/admin/nodes/{node_id}")
            assert listed.status_code == 200, listed.text
            assert listed.json()["load"] == {"queue_depth": 1e6, "running": 0.0}
        finally:
            admin(gw.url, "POST", f"/admin/nodes/{node_id}/revoke")

    def test_absurd_usage_is_clamped_for_accounting(self, gw: GatewayHandle, tmp_path: Path) -> None:
        """A node reporting prompt_tokens = 2**70 is accounted at what the request can hold
        (the accounting's plausibility bound: body bytes + 256, far under the node cap of 10M
        tokens); the ledger row lands."""
        with AbsurdEngine() as engine, agent(gw.url, engine.url, tmp_path / "absurd", token=token(gw.url, "org-a"),
                                             name="absurd"):
            node_id = node_by_name(gw.url, "absurd", "org-a")["id"]
            try:
                assert chat_route(gw.url, "org-a") == "node:absurd@org-a/tiny-chat"
                admin(gw.url, "POST", "/admin/usage/flush")

                def row() -> dict[str, Any] | None:
                    rows = admin(gw.url, "GET", "/admin/nodes/report").json()["data"]
                    return next((r for r in rows if r["node_id"] == node_id), None)

                wait_for(lambda: row() is not None, 10, "the node's ledger row")
                got = row()
                assert got is not None and got["requests"] == 1
                assert 0 < got["prompt_tokens"] < 1_000 and got["completion_tokens"] == 0
            finally:
                admin(gw.url, "POST", f"/admin/nodes/{node_id}/revoke")


class TestHostileNodeBodies:
    def test_deep_or_non_finite_json_on_node_and_admin_routes_is_a_400(self, gw: GatewayHandle) -> None:
        """10k-deep JSON, NaN and lone surrogates on /nodes/* and /admin/nodes bodies are 400s
        in OpenAI's shape, never a 500 (they used to reach json.loads unguarded)."""
        deep = b"[" * 10_000 + b"]" * 10_000
        bodies = [deep, b'{"name": NaN}', b'{"name": "\\ud800"}', b"[1, 2]"]
        with httpx2.Client(timeout=10, trust_env=False) as http:
            for body in bodies:
                for path, key in (("/nodes/enroll", "ent-llm-not-a-real-token"),
                                  ("/admin/enrollment-tokens", ADMIN)):
                    r = http.post(gw.url + path, content=body,
                                  headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
                    assert r.status_code in (400, 401), (path, body[:20], r.status_code, r.text[:200])
                    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
            # the admin route authenticates the key first, so its refusal is about the body
            r = http.post(gw.url + "/admin/enrollment-tokens", content=deep,
                          headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
