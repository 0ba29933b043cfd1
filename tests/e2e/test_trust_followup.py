"""What the round-2 attack pass found, closed (issue 12 follow-up), against real gateway
processes, real agents (`asgi-llm node join`) and hostile engines on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, GatewayHandle, fake_upstream, gateway_process
from tests.e2e.test_nodes import agent, wait_for

pytestmark = pytest.mark.e2e

ADMIN = "sk-admin-followup-0123"
KEY_A = "sk-org-a-followup-inference"
ADMIN_A = "sk-org-a-followup-admin-01"
MB = 1024 * 1024
CLOSED_PORT = 1  # nothing listens there: every connection is refused
FLOOD_MB = 256


class FloodEngine:
    """An OpenAI-compatible engine whose non-stream answer is ``FLOOD_MB`` MiB of chunked JSON."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = json.dumps({"object": "list", "data": [{"id": "tiny-chat", "object": "model"}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                piece = b'{"pad":"' + b"x" * (MB - 10) + b'",'
                try:
                    for _ in range(FLOOD_MB):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass  # the gateway (or agent) gave up: what we want

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FloodEngine:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class SurrogateEngine:
    """An OpenAI-compatible upstream whose answers (whole and streamed) hold a lone
    surrogate, ``"ok\\ud800"`` — valid JSON text, not encodable as UTF-8 once decoded."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _send(self, ctype: str, body: bytes) -> None:
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._send("application/json", b'{"object":"list","data":[{"id":"odd","object":"model"}]}')

            def do_POST(self) -> None:
                req = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                if req.get("model") == "busy":  # a rate limit whose Retry-After is not ASCII
                    body = b'{"error":{"message":"slow down","type":"rate_limit_error"}}'
                    self.send_response(429)
                    self.send_header("content-type", "application/json")
                    self.send_header("retry-after", "5\xff\u00e9")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                usage = '"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}'
                if req.get("stream"):
                    events = [
                        '{"id":"c1","object":"chat.completion.chunk","model":"odd","choices":[{"index":0,'
                        '"delta":{"role":"assistant","content":"ok\\ud800"},"finish_reason":null}]}',
                        '{"id":"c1","object":"chat.completion.chunk","model":"odd","choices":[{"index":0,'
                        '"delta":{},"finish_reason":"stop"}],' + usage + "}",
                    ]
                    body = "".join(f"data: {e}\n\n" for e in events) + "data: [DONE]\n\n"
                    self._send("text/event-stream", body.encode())
                else:
                    body = ('{"id":"c1","object":"chat.completion","model":"odd","choices":[{"index":0,"message":'
                            '{"role":"assistant","content":"ok\\ud800"},"finish_reason":"stop"}],' + usage + "}")
                    self._send("application/json", body.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SurrogateEngine:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _recipe(tmp: Path, fallback: FakeUpstreamHandle, odd: str,
            nodes_extra: str = ', allowed_networks: ["127.0.0.1/32"]', ledger: str | None = None) -> Path:
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"""\
providers:
  fallback: {{base_url: "{fallback.base_url}", timeout_s: 10}}
  odd: {{base_url: "{odd}", timeout_s: 10}}
  closed: {{base_url: "http://127.0.0.1:{CLOSED_PORT}/v1/SECRETPATHTOKEN", timeout_s: 5}}
models:
  chat: {{targets: [{{provider: fallback, model: fallback-chat}}]}}
  odd: {{targets: [{{provider: odd, model: odd}}]}}
  odd-cached: {{targets: [{{provider: odd, model: odd}}]}}
  closed: {{targets: [{{provider: closed, model: m}}]}}
  busy: {{targets: [{{provider: odd, model: busy}}]}}
  nodes-only: {{targets: [{{nodes: any, model: tiny-chat}}]}}
cache: {{enabled: true, ttl_s: 300, models: {{odd: {{enabled: false}}, chat: {{enabled: false}}}}}}
auth:
  admin_keys: ["{ADMIN}"]
  pepper: "followup-pepper-0123456789"
  keys:
    - {{key: "{KEY_A}", org: org-a}}
    - {{key: "{ADMIN_A}", org: org-a, scopes: [admin]}}
stores: {{ledger: "{ledger or f'sqlite:///{tmp / "gw.db"}'}"}}
usage: {{flush_interval_s: 0.05}}
nodes: {{heartbeat_interval_s: 0.5, heartbeat_window_s: 3{nodes_extra}}}
routing: {{health: {{failure_threshold: 1000, probe_interval_s: 0}}}}
""")
    return recipe


@pytest.fixture(scope="module")
def fallback() -> Iterator[FakeUpstreamHandle]:
    with fake_upstream("followup-fallback", models=["fallback-chat"]) as h:
        yield h


@pytest.fixture(scope="module")
def odd() -> Iterator[SurrogateEngine]:
    with SurrogateEngine() as engine:
        yield engine


@pytest.fixture(scope="module")
def gw(fallback: FakeUpstreamHandle, odd: SurrogateEngine, tmp_path_factory: pytest.TempPathFactory
       ) -> Iterator[GatewayHandle]:
    with gateway_process(_recipe(tmp_path_factory.mktemp("followup"), fallback, odd.url), name="followup-gw") as g:
        yield g


def admin(url: str, method: str, path: str, body: Any = None, key: str = ADMIN) -> httpx2.Response:
    with httpx2.Client(timeout=10, trust_env=False) as http:
        return http.request(method, url + path, json=body, headers={"authorization": f"Bearer {key}"})


def token(url: str, org: str = "org-a") -> str:
    resp = admin(url, "POST", "/admin/enrollment-tokens", {"org": org})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["token"])


def assert_error(resp: httpx2.Response, status: int, *, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


class RSSPeak:
    """Samples a process's resident set every 10 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = self.peak = rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> RSSPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def rise(self) -> int:
        return self.peak - self.base


def node_ready(url: str, name: str) -> bool:
    rows = admin(url, "GET", "/admin/nodes").json()["data"]
    return any(n["name"] == name and n["status"] == "online" and n["revoked_at"] is None for n in rows)


class TestBoundedNodeAnswers:
    """Item 1: a node's non-stream answer is read at most up to the response limit, in direct
    and tunnel mode; the gateway's RSS does not follow the size of what the node sends."""

    @pytest.mark.parametrize("tunnel", [False, True], ids=["direct", "tunnel"])
    def test_flood_answer_is_cut_at_the_limit(self, gw: GatewayHandle, tmp_path: Path, tunnel: bool) -> None:
        name = "flood-tun" if tunnel else "flood-direct"
        with FloodEngine() as engine, agent(gw.url, engine.url, tmp_path / name, token=token(gw.url), name=name,
                                            tunnel=tunnel):
            wait_for(lambda: node_ready(gw.url, name), 15, f"{name} ready")
            pid = gw.process.proc.pid
            with RSSPeak(pid) as rss, httpx2.Client(timeout=60, trust_env=False) as http:
                t0 = time.monotonic()
                resp = http.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY_A}"},
                                 json={"model": "nodes-only", "messages": [{"role": "user", "content": "x"}]})
                elapsed = time.monotonic() - t0
            node_id = next(n["id"] for n in admin(gw.url, "GET", "/admin/nodes").json()["data"] if n["name"] == name)
            assert admin(gw.url, "POST", f"/admin/nodes/{node_id}/revoke").status_code == 200
        assert resp.status_code == 502, resp.text
        assert "larger than" in resp.json()["error"]["message"], resp.text
        assert rss.rise < 100, f"gateway RSS {rss.base} -> {rss.peak} MB for a {FLOOD_MB} MB answer ({elapsed:.1f} s)"


class TestMetricsVocabulary:
    """Item 2: label values come from the gateway, not the client: 300 made-up 10 kB model
    names (404 each) add one ``unknown`` series, not 300."""

    def test_unknown_models_do_not_grow_metrics(self, gw: GatewayHandle) -> None:
        with httpx2.Client(timeout=10, trust_env=False) as http:
            before = len(http.get(gw.url + "/metrics").content)
            for i in range(300):
                resp = http.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY_A}"},
                                 json={"model": f"m{i:05d}-" + "z" * 10_000, "messages": [{"role": "user", "content": "x"}]})
                assert_error(resp, 404, param="model")
            ok = http.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY_A}"},
                           json={"model": "chat", "messages": [{"role": "user", "content": "x"}]})
            assert ok.status_code == 200, ok.text
            text = http.get(gw.url + "/metrics").text
        assert "zzzzzzzzzz" not in text
        assert len(text) - before < 64 * 1024, f"/metrics grew from {before} to {len(text)} bytes"
        assert 'asgi_llm_requests_total{endpoint="chat",model="unknown",status="404"} 300.0' in text
        assert 'model="chat"' in text


def _post_head(port: int, path: str, length: int, first: bytes, auth: str | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n"
    if auth is not None:
        head += f"authorization: Bearer {auth}\r\n"
    sock.sendall(head.encode() + b"\r\n" + first)
    return sock


def _status_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n" not in data:
        more = sock.recv(4096)
        if not more:
            break
        data += more
    return data.split(b"\r\n", 1)[0]


class TestEnrollmentTokenFirst:
    """Item 3: /nodes/enroll checks the enrollment token before it reads the body or resolves
    a host; /nodes/register and /nodes/heartbeat check the node credential first too."""

    @pytest.mark.parametrize("auth", [None, "ent-llm-not-a-real-token-000000000000", "nc-llm-not-a-real-credential"])
    @pytest.mark.parametrize("path", ["/nodes/enroll", "/nodes/register", "/nodes/heartbeat"])
    def test_refused_before_the_body_arrives(self, gw: GatewayHandle, path: str, auth: str | None) -> None:
        """A 15 MB body is announced, 1 kB sent: the 401 comes without waiting for the rest."""
        sock = _post_head(gw.port, path, 15_000_000, b'{"name":"x","models":["' + b"a" * 1000, auth)
        try:
            assert _status_line(sock).startswith(b"HTTP/1.1 401"), path
        finally:
            sock.close()

    def test_unauthenticated_bodies_do_not_cost_memory(self, gw: GatewayHandle) -> None:
        size = 15_000_000
        body = b'{"name":"x","url":"http://10.0.0.1/v1","models":["' + b"a" * (size - 60) + b'"]}'
        statuses: list[bytes] = []

        def one() -> None:
            try:
                sock = _post_head(gw.port, "/nodes/enroll", len(body), b"", None)
            except OSError:
                return
            try:
                sock.sendall(body)
                statuses.append(_status_line(sock))
            except OSError:
                pass  # the gateway answered 401 and closed while we were still sending: fine
            finally:
                sock.close()

        with RSSPeak(gw.process.proc.pid) as rss:
            threads = [threading.Thread(target=one) for _ in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        assert all(s.startswith(b"HTTP/1.1 401") for s in statuses), statuses
        assert rss.rise < 60, f"gateway RSS {rss.base} -> {rss.peak} MB for 12 unauthenticated 15 MB bodies"

    def test_no_resolution_for_a_bad_token(self, gw: GatewayHandle) -> None:
        """An unknown token with a refused or unresolvable URL: 401, no word about the host."""
        with httpx2.Client(timeout=10, trust_env=False) as http:
            for url in ("http://10.0.0.1/v1", "http://does-not-exist.invalid/v1"):
                resp = http.post(gw.url + "/nodes/enroll", headers={"authorization": "Bearer ent-llm-unknown-0000000000"},
                                 json={"name": "probe", "url": url, "models": ["tiny-chat"]})
                err = assert_error(resp, 401)
                assert err["code"] == "enrollment_token_unknown"
                assert "10.0.0.1" not in resp.text and "resolve" not in resp.text
            used = token(gw.url)
            first = http.post(gw.url + "/nodes/enroll", headers={"authorization": f"Bearer {used}"},
                              json={"name": "once", "mode": "tunnel", "models": ["tiny-chat"]})
            assert first.status_code == 201, first.text
            again = http.post(gw.url + "/nodes/enroll", headers={"authorization": f"Bearer {used}"},
                              json={"name": "twice", "url": "http://10.0.0.1/v1", "models": ["tiny-chat"]})
            assert assert_error(again, 401)["code"] == "enrollment_token_used"
            node_id = first.json()["node_id"]
            assert admin(gw.url, "POST", f"/admin/nodes/{node_id}/revoke").status_code == 200


class TestLoneSurrogates:
    """Item 4: an upstream answer with a lone surrogate is relayed as sent (whole, streamed,
    cached), not a 500; its ledger rows land."""

    def test_relayed_and_metered(self, gw: GatewayHandle) -> None:
        headers = {"authorization": f"Bearer {KEY_A}"}
        msg = [{"role": "user", "content": "x"}]
        with httpx2.Client(timeout=10, trust_env=False) as http:
            for model in ("odd", "odd-cached", "odd-cached"):
                resp = http.post(gw.url + "/v1/chat/completions", headers=headers, json={"model": model, "messages": msg, "temperature": 0})
                assert resp.status_code == 200, resp.text
                assert b'"ok\\ud800"' in resp.content
            assert resp.headers.get("x-asgi-llm-cache") in ("hit", "HIT"), dict(resp.headers)
            with http.stream("POST", gw.url + "/v1/chat/completions", headers=headers,
                             json={"model": "odd", "messages": msg, "stream": True}) as streamed:
                assert streamed.status_code == 200
                text = b"".join(streamed.iter_bytes())
            assert b'ok\\ud800' in text and text.rstrip().endswith(b"data: [DONE]"), text
            assert http.post(gw.url + "/admin/usage/flush", headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
            rows = http.get(gw.url + "/admin/usage", params={"group_by": "model"},
                            headers={"authorization": f"Bearer {ADMIN}"}).json()["data"]
        by_model = {r["model"]: r for r in rows}
        assert by_model["odd"]["attempts"] == 2, rows
        assert by_model["odd-cached"]["attempts"] >= 1, rows


class TestHangUpMidBody:
    """Item 5: a client that hangs up mid-body on /nodes/* and /admin/* is no error: no
    traceback in the gateway's log."""

    def test_no_traceback(self, gw: GatewayHandle) -> None:
        enrolled = httpx2.post(gw.url + "/nodes/enroll", headers={"authorization": f"Bearer {token(gw.url)}"},
                               json={"name": "hangup", "mode": "tunnel", "models": ["tiny-chat"]}, timeout=10)
        assert enrolled.status_code == 201, enrolled.text
        credential = enrolled.json()["credential"]
        log_before = len(gw.process.log_text())
        for path, key in (("/admin/enrollment-tokens", ADMIN), ("/admin/keys", ADMIN), ("/nodes/register", credential),
                          ("/nodes/heartbeat", credential)):
            sock = _post_head(gw.port, path, 100_000, b'{"org": "org-a", "pad": "', key)
            sock.close()
        # The gateway still answers, and every hang-up has been handled by the time a
        # request sent after them (on a fresh connection) is: poll the log briefly.
        assert admin(gw.url, "GET", "/admin/nodes").status_code == 200
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            tail = gw.process.log_text()[log_before:]
            assert "Traceback" not in tail and "unhandled error" not in tail, tail
            time.sleep(0.1)
        assert admin(gw.url, "POST", f"/admin/nodes/{enrolled.json()['node_id']}/revoke").status_code == 200


@pytest.fixture(scope="module")
def strict_gw(fallback: FakeUpstreamHandle, odd: SurrogateEngine, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[GatewayHandle]:
    """The default network policy (no nodes.allowed_networks)."""
    with gateway_process(_recipe(tmp_path_factory.mktemp("followup-strict"), fallback, odd.url, nodes_extra=""),
                         name="followup-gw-strict") as g:
        yield g


class TestTransitionAddresses:
    """Item 6: IPv6 forms that embed a denied IPv4 address, and cloud metadata addresses,
    are refused by the default policy (400 on ``url``), the token left unspent."""

    @pytest.mark.parametrize("host", [
        "[::127.0.0.1]", "[64:ff9b::7f00:1]", "[::ffff:0:7f00:1]", "[2002:7f00:1::]", "[fd00:ec2::254]",
        "100.100.100.200", "[64:ff9b::a9fe:a9fe]", "[2001:0:4136:e378:8000:63bf:80ff:fffe]", "[64:ff9b:1::a00:1]",
    ])
    def test_refused(self, strict_gw: GatewayHandle, host: str) -> None:
        tok = token(strict_gw.url)
        with httpx2.Client(timeout=10, trust_env=False) as http:
            resp = http.post(strict_gw.url + "/nodes/enroll", headers={"authorization": f"Bearer {tok}"},
                             json={"name": "v6probe", "url": f"http://{host}:8080/v1", "models": ["tiny-chat"]})
            assert_error(resp, 400, param="url")
            ok = http.post(strict_gw.url + "/nodes/enroll", headers={"authorization": f"Bearer {tok}"},
                           json={"name": "v6ok", "mode": "tunnel", "models": ["tiny-chat"]})
        assert ok.status_code == 201, ok.text  # the refused attempt did not spend the token
        assert admin(strict_gw.url, "POST", f"/admin/nodes/{ok.json()['node_id']}/revoke").status_code == 200


@pytest.fixture(scope="module")
def pg_gw(fallback: FakeUpstreamHandle, odd: SurrogateEngine, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[GatewayHandle]:
    """Keys, tokens and consents in a real PostgreSQL (which refuses NUL in text)."""
    from tests.services import postgres_database

    pg = postgres_database()
    url = next(pg)
    try:
        with gateway_process(_recipe(tmp_path_factory.mktemp("followup-pg"), fallback, odd.url, ledger=url),
                             name="followup-gw-pg") as g:
            yield g
    finally:
        pg.close()


class TestAdminBodies:
    """Item 7: control characters in names and orgs, and absurd limits, are a 400 on the
    field — not a 503 store error from PostgreSQL."""

    @pytest.mark.parametrize(("body", "param"), [
        ({"org": "org-a", "name": "ci\u0000x"}, "name"),
        ({"org": "org-\u0000a"}, "org"),
        ({"org": "org-a", "name": "bell\u0007"}, "name"),
        ({"org": "org-a", "limits": {"rpm": 2**70}}, "limits"),
        ({"org": "org-a", "limits": {"concurrency": 2**53 + 1}}, "limits"),
        ({"org": "org-a", "limits": {"spend_usd_per_day": 1e300}}, "limits"),
        ({"org": "org-a", "model_limits": {"chat": {"tpm": 2**60}}}, "model_limits"),
        ({"org": "org-a", "expires_in_s": 1e300}, "expires_in_s"),
    ])
    def test_keys(self, pg_gw: GatewayHandle, body: dict[str, Any], param: str) -> None:
        raw = json.dumps(body)
        with httpx2.Client(timeout=10, trust_env=False) as http:
            resp = http.post(pg_gw.url + "/admin/keys", content=raw,
                             headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json"})
        err = assert_error(resp, 400)
        assert str(err["param"]).startswith(param), err

    def test_sane_key_still_created(self, pg_gw: GatewayHandle) -> None:
        resp = admin(pg_gw.url, "POST", "/admin/keys", {"org": "org-a", "name": "ci", "limits": {"rpm": 2**53,
                     "spend_usd_per_day": 1000}})
        assert resp.status_code == 201, resp.text

    @pytest.mark.parametrize(("method", "path", "raw", "param"), [
        ("POST", "/admin/enrollment-tokens", '{"org": "org-\\u0000a"}', "org"),
        ("POST", "/admin/enrollment-tokens", '{"org": "org-a", "labels": {"k": "v\\u0000"}}', "labels"),
        ("PUT", "/admin/node-acceptance", '{"org": "org-\\u0000a", "accept": []}', "org"),
        ("PUT", "/admin/node-acceptance", '{"org": "org-a", "accept": [{"owner": "b\\u0000", '
                                          '"max_price": {"input": 0, "output": 0}}]}', "accept[0].owner"),
    ])
    def test_node_admin_bodies(self, pg_gw: GatewayHandle, method: str, path: str, raw: str, param: str) -> None:
        with httpx2.Client(timeout=10, trust_env=False) as http:
            resp = http.request(method, pg_gw.url + path, content=raw,
                                headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json"})
        assert_error(resp, 400, param=param)


class TestHeaderLimitExact:
    """Item 8: max_header_bytes (64 KiB by default) holds even when the whole oversized header
    block arrives in one read: 431, not 200."""

    @pytest.mark.parametrize("size", [66_000, 100_000, 200_000])
    def test_whole_block_in_one_send(self, gw: GatewayHandle, size: int) -> None:
        from tests.e2e.test_trust_edge import error_of, read_response

        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * size + b"\r\n\r\n")
            status, headers, body = read_response(sock, timeout=5)
        assert status == 431 and "connection: close" in headers
        assert "exceed 65536 bytes" in error_of(body)["message"]

    def test_just_under_the_limit_is_served(self, gw: GatewayHandle) -> None:
        from tests.e2e.test_trust_edge import read_response

        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 60_000 + b"\r\n\r\n")
            status, _, _ = read_response(sock, timeout=5)
        assert status == 200


class TestUpstreamErrorMessages:
    """Item 9: a connection error names the target and the upstream's origin, never its path
    (which may hold a secret) or credentials."""

    def test_no_path_in_the_message(self, gw: GatewayHandle) -> None:
        model = "closed"
        with httpx2.Client(timeout=20, trust_env=False) as http:
            resp = http.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY_A}"},
                             json={"model": model, "messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code in (502, 503), resp.text
        message = resp.json()["error"]["message"]
        assert "SECRETPATHTOKEN" not in resp.text, message
        assert f"127.0.0.1:{CLOSED_PORT}" in message and model in message, message


class TestUpstreamRetryAfter:
    """An upstream's Retry-After that is not plain ASCII is not relayed (it was a 500 when
    the error response's headers were encoded)."""

    def test_non_ascii_retry_after(self, gw: GatewayHandle) -> None:
        with httpx2.Client(timeout=20, trust_env=False) as http:
            resp = http.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY_A}"},
                             json={"model": "busy", "messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code in (429, 502, 503), resp.text
        assert resp.json()["error"]["message"]
        assert "\xff" not in resp.headers.get("retry-after", "")
