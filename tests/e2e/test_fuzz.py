"""Hostile input as a property: hypothesis drives a REAL gateway process (auth, admin
routes, a node registry with one enrolled node, a fake upstream) over its whole HTTP
surface — inference, admin and ``/nodes/*`` — with any body, any header, any path and
method. For every example:

* the status is below 500 (an upstream is healthy, so a 5xx could only be ours);
* the answer comes before the client's timeout (no hang);
* an error is in OpenAI's shape ``{"error": {"message", "type", ...}}``;

and after each property, the gateway's log holds no traceback and ``/healthz`` answers.

Hypothesis, not schemathesis: schemathesis is not installed in the dev environment and
would be a new dev dependency with its own large tree; its value here (generating from
the OpenAPI document) is kept by drawing paths, methods and body shapes from
:data:`asgi_llm.openapi.PATHS` and the pydantic models the document is built from.
Examples are derandomised under ``CI`` (reproducible runs) and bounded per property by
:data:`EXAMPLES`; the database is off (nothing written to the checkout).
"""

from __future__ import annotations

import json
import os
import re
import socket
import textwrap
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asgi_llm.openapi import PATHS
from asgi_llm.testing.processes import FakeUpstreamHandle, GatewayHandle, fake_upstream, gateway_process

pytestmark = pytest.mark.e2e

ADMIN = "adm-fuzz-0123456789abcdef"
USER = "sk-fuzz-user-0123456789abcdef"
ORG_ADMIN = "adm-fuzz-org-0123456789abcdef"
EXAMPLES = int(os.environ.get("ASGI_LLM_FUZZ_EXAMPLES", "150"))
TIMEOUT_S = 15.0

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# ----------------------------------------------------------------------------- the gateway


class Target:
    """The running gateway, its keys and the ids the admin routes can act on."""

    def __init__(self, gw: GatewayHandle, node_id: str, node_credential: str, key_id: str) -> None:
        self.gw = gw
        self.node_id = node_id
        self.node_credential = node_credential
        self.key_id = key_id
        self.http = httpx2.Client(base_url=gw.url, timeout=TIMEOUT_S, trust_env=False)

    def log(self) -> str:
        return self.gw.process.log_text()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstreamHandle]:
    with fake_upstream("fuzz-upstream", models=["gpt-4o-mini", "text-embedding-3-small", "tiny"]) as h:
        yield h


@pytest.fixture(scope="module")
def target(upstream: FakeUpstreamHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("fuzz")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        providers:
          up: {{base_url: "{upstream.base_url}", timeout_s: 10}}
        models:
          chat: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
          embed: {{targets: [{{provider: up, model: text-embedding-3-small}}]}}
          on-nodes: {{targets: [{{nodes: any, model: tiny}}, {{provider: up, model: gpt-4o-mini}}]}}
        auth:
          admin_keys: ["{ADMIN}"]
          pepper: "fuzz-pepper-0123456789abcdef"
          keys:
            - {{key: "{USER}", org: team-a}}
            - {{key: "{ORG_ADMIN}", org: team-a, scopes: [admin]}}
        stores: {{ledger: "sqlite:///{tmp / 'gw.db'}"}}
        usage: {{flush_interval_s: 0.05}}
        cache: {{enabled: true, ttl_s: 60}}
        nodes: {{heartbeat_interval_s: 5, heartbeat_window_s: 600, allowed_networks: ["127.0.0.1/32"]}}
        routing: {{health: {{failure_threshold: 1000000, probe_interval_s: 0}}}}
        """))
    with gateway_process(recipe, name="gateway-fuzz") as gw, \
            httpx2.Client(base_url=gw.url, timeout=TIMEOUT_S, trust_env=False) as http:
        adm = {"authorization": f"Bearer {ADMIN}"}
        tok = http.post("/admin/enrollment-tokens", json={"org": "team-a"}, headers=adm)
        assert tok.status_code == 201, tok.text
        enrolled = http.post("/nodes/enroll", headers={"authorization": f"Bearer {tok.json()['token']}"},
                             json={"name": "fuzz-node", "mode": "direct", "url": upstream.url, "models": ["tiny"]})
        assert enrolled.status_code == 201, enrolled.text
        key = http.post("/admin/keys", json={"org": "team-a", "name": "fuzzed"}, headers=adm)
        assert key.status_code == 201, key.text
        t = Target(gw, enrolled.json()["node_id"], enrolled.json()["credential"], key.json()["id"])
        try:
            yield t
        finally:
            t.http.close()


@pytest.fixture
def clean_log(target: Target) -> Iterator[Target]:
    """After the property: no traceback in the gateway's log, and it still answers."""
    before = len(target.log())
    yield target
    new = target.log()[before:]
    assert "Traceback" not in new, new[-4000:]
    health = target.http.get("/healthz")
    assert health.status_code == 200, health.text


# ----------------------------------------------------------------------------- strategies

_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)


JSON = st.recursive(_SCALARS, _containers, max_leaves=12)

# Raw JSON-ish text that json.dumps never produces: the classic hostile literals.
_HOSTILE_LITERALS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 400, "9" * 30, '"\\ud800"',
                     '"\\udfff"', "[" * 5000 + "]" * 5000, "{" * 3, '"\\u0000"', "true", "null", "0.1e-999",
                     '"' + "x" * 3000 + '"', "[]", "{}", "-0", "1E400", '"\\x"', "'x'", "0x10", "+1", "01"]
HOSTILE = st.sampled_from(_HOSTILE_LITERALS)


def _valid_bodies(model: str) -> dict[str, dict[str, Any]]:
    return {
        "chat": {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
        "completions": {"model": model, "max_tokens": 3, "prompt": "hi"},
        "embeddings": {"model": "embed", "input": "hi"},
    }


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    """A valid body with one field replaced by anything, one added, or a literal spliced in raw."""
    body = json.loads(json.dumps(base))
    how = draw(st.sampled_from(["replace", "add", "raw", "duplicate", "nested"]))
    field = draw(st.sampled_from(sorted(body)))
    if how == "replace":
        body[field] = draw(JSON)
    elif how == "add":
        body[draw(st.text(max_size=20))] = draw(JSON)
    elif how == "nested" and isinstance(body.get("messages"), list):
        msg = body["messages"][0]
        msg[draw(st.sampled_from(["role", "content", "name", "tool_calls", "x"]))] = draw(JSON)
    if how == "raw":
        text = json.dumps(body)
        return text.replace(json.dumps(body[field]), draw(HOSTILE), 1).encode()
    if how == "duplicate":
        text = json.dumps(body)
        return (text[:-1] + f", {json.dumps(field)}: {json.dumps(draw(JSON))}}}").encode()
    return json.dumps(body).encode()


def bodies(base: dict[str, Any] | None) -> st.SearchStrategy[bytes]:
    """Any body: a mutation of a valid one (most), arbitrary JSON, arbitrary bytes."""
    options: list[st.SearchStrategy[bytes]] = [
        JSON.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
        HOSTILE.map(str.encode),
        st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    ]
    if base is not None:
        options = [mutated(base), mutated(base), *options]
    return st.one_of(*options)


_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=30)
_HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=80).map(str.strip)  # h11: no edge spaces
_OUR_HEADERS = ["x-request-id", "x-asgi-llm-cache-key", "x-asgi-llm-cache-ttl", "x-asgi-llm-route",
                "x-asgi-llm-node-secret", "content-type", "accept", "accept-encoding", "x-api-key",
                "anthropic-version", "openai-organization", "x-forwarded-for", "cache-control", "expect",
                "transfer-encoding-x", "x-ratelimit-limit-requests", "range", "if-none-match", "origin"]
HEADERS = st.dictionaries(st.sampled_from(_OUR_HEADERS) | _TOKEN.map(lambda s: "x-" + s), _HEADER_VALUE, max_size=5)
METHODS = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND"])


def _fill(path: str, t: Target, draw: st.DrawFn) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        known = {"node_id": t.node_id, "key_id": t.key_id, "model": "chat"}.get(name, "cordon")
        action = ["cordon", "uncordon", "drain", "pause", "resume", "revoke"] if name == "action" else []
        choice = draw(st.sampled_from([known, *action]) | st.text(alphabet=st.characters(
            min_codepoint=0x21, max_codepoint=0x7e, exclude_characters="/?#%"), min_size=1, max_size=40))
        return choice
    return re.sub(r"\{(\w+)\}", one, path)


_QUERY_HOSTILE = st.sampled_from(["1e999", "NaN", "-1", "0", "2026-13-45", "9" * 40, "jsonl", "csv", "*",
                                  "team-a", "", " ", "24h", "-24h", "99999999d", "1970-01-01", "9999-12-31T23:59:59"])
_QUERY_VALUE = (st.text(max_size=30) | _QUERY_HOSTILE
                | st.integers(min_value=-(2**80), max_value=2**80).map(str))


def _param_value(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    """Values for one documented query parameter, weighted to the edges of its type."""
    if "enum" in schema:
        return st.sampled_from([str(v) for v in schema["enum"]]) | _QUERY_VALUE
    if schema.get("type") == "integer":
        edges = [schema.get("minimum", 0) - 1, schema.get("minimum", 0), schema.get("maximum", 2**63) + 1, 2**63,
                 2**64, -(2**63) - 1]
        return (st.sampled_from([str(e) for e in edges])
                | st.integers(min_value=-(2**80), max_value=2**80).map(str) | _QUERY_VALUE)
    return _QUERY_VALUE


def _valid_value(name: str, schema: dict[str, Any]) -> st.SearchStrategy[str]:
    if "enum" in schema:
        return st.sampled_from([str(v) for v in schema["enum"]])
    if schema.get("type") == "integer":
        return st.integers(schema.get("minimum", 0), schema.get("maximum", 2**63 - 1)).map(str)
    if name in ("since", "until"):
        return st.sampled_from(["24h", "7d", "2026-01-01", "2026-01-01T00:00:00Z"])
    if name == "org":
        return st.sampled_from(["team-a", "team-b"])
    return st.text(alphabet="abcdefghij-_0123456789", min_size=1, max_size=12)


@st.composite
def queries(draw: st.DrawFn, path: str, method: str) -> dict[str, str]:
    """Query parameters for one operation. Mostly valid ones with exactly one hostile value
    (so the hostile one is not hidden behind another parameter's 400); sometimes anything."""
    params = [p for p in PATHS[path].get(method.lower(), {}).get("parameters", []) if p["in"] == "query"]
    positive = draw(st.integers(0, 3)) > 0
    out = {p["name"]: draw(_valid_value(p["name"], p["schema"]) if positive else _param_value(p["schema"]))
           for p in params if draw(st.booleans())}
    if positive and params:
        hostile = draw(st.sampled_from(params))
        out[hostile["name"]] = draw(_param_value(hostile["schema"]))
    if draw(st.integers(0, 4)) == 0:
        out[draw(_TOKEN)] = draw(_QUERY_VALUE)
    return out


def check(resp: httpx2.Response, what: str) -> None:
    """The per-example property: no 5xx, and an error in OpenAI's shape."""
    assert resp.status_code < 500, f"{what} -> {resp.status_code} {resp.text[:500]}"
    if resp.status_code >= 400 and resp.request.method != "HEAD":
        body = resp.json()
        assert isinstance(body.get("error"), dict), f"{what} -> {resp.status_code} {resp.text[:500]}"
        assert isinstance(body["error"].get("message"), str) and body["error"].get("type"), resp.text[:500]


def send(t: Target, method: str, path: str, *, key: str | None, body: bytes | None = None,
         headers: dict[str, str] | None = None, params: dict[str, str] | None = None) -> httpx2.Response:
    h = dict(headers or {})
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    started = time.monotonic()
    resp = t.http.request(method, path, content=body, headers=h, params=params)
    assert time.monotonic() - started < TIMEOUT_S
    return resp


# ----------------------------------------------------------------------------- properties

INFERENCE = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings"}


class TestFuzzInference:
    """Chat, completions, embeddings and models under any body and any header."""

    @pytest.mark.parametrize("endpoint", sorted(INFERENCE))
    @SETTINGS
    @given(data=st.data())
    def test_any_body_any_header(self, clean_log: Target, endpoint: str, data: st.DataObject) -> None:
        t = clean_log
        model = data.draw(st.sampled_from(["chat", "on-nodes", "embed", "nope"]))
        base = _valid_bodies(model)[endpoint]
        if endpoint != "embeddings" and data.draw(st.booleans()):
            base = {**base, "stream": True, "stream_options": {"include_usage": True}, "n": 1, "user": "u",
                    "temperature": 0.5, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}
        body = data.draw(bodies(base))
        headers = data.draw(HEADERS)
        key = data.draw(st.sampled_from([USER, ORG_ADMIN, ADMIN, None, "sk-wrong", t.node_credential]))
        resp = send(t, "POST", INFERENCE[endpoint], key=key, body=body, headers=headers)
        check(resp, f"POST {INFERENCE[endpoint]} {body[:200]!r} {headers}")

    @SETTINGS
    @given(data=st.data())
    def test_models_any_path_and_header(self, clean_log: Target, data: st.DataObject) -> None:
        t = clean_log
        name = data.draw(st.sampled_from(["chat", "", "nope", "../admin/keys"]) | st.text(max_size=30))
        path = "/v1/models/" + urllib.parse.quote(name, safe="/") if name else "/v1/models"
        resp = send(t, data.draw(st.sampled_from(["GET", "HEAD"])), path,
                    key=data.draw(st.sampled_from([USER, ADMIN, None])), headers=data.draw(HEADERS))
        check(resp, f"/v1/models/{name!r}")


ADMIN_OPERATIONS = sorted((p, m.upper()) for p, ops in PATHS.items() if p.startswith("/admin/") for m in ops)


class TestFuzzAdmin:
    """Every documented admin operation, with any query, body and header; any method on its path."""

    @pytest.mark.parametrize(("path", "method"), ADMIN_OPERATIONS)
    @settings(SETTINGS, max_examples=max(10, EXAMPLES // 4))
    @given(data=st.data())
    def test_operation(self, clean_log: Target, path: str, method: str, data: st.DataObject) -> None:
        t = clean_log
        base = _admin_body(path, method)
        body = data.draw(bodies(base)) if method in ("POST", "PUT", "PATCH") else None
        url = _fill(path, t, data.draw)
        resp = send(t, method, url, key=data.draw(st.sampled_from([ADMIN, ADMIN, ADMIN, ORG_ADMIN, USER, None])),
                    body=body, headers=data.draw(HEADERS), params=data.draw(queries(path, method)))
        check(resp, f"{method} {url} {body[:200] if body else b''!r}")

    @SETTINGS
    @given(data=st.data())
    def test_any_method_on_admin_paths(self, clean_log: Target, data: st.DataObject) -> None:
        t = clean_log
        path = data.draw(st.sampled_from(sorted(p for p in PATHS if p.startswith("/admin/"))))
        method = data.draw(METHODS)
        body = data.draw(bodies(None)) if data.draw(st.booleans()) else None
        url = _fill(path, t, data.draw)
        resp = send(t, method, url, key=data.draw(st.sampled_from([ADMIN, ORG_ADMIN, USER, None])), body=body,
                    headers=data.draw(HEADERS))
        check(resp, f"{method} {url}")


class TestFuzzNodes:
    """``/nodes/*`` with the node's credential, an enrollment-ish token or junk."""

    @SETTINGS
    @given(data=st.data())
    def test_node_routes(self, clean_log: Target, data: st.DataObject) -> None:
        t = clean_log
        path = data.draw(st.sampled_from(["/nodes/heartbeat", "/nodes/register", "/nodes/enroll", "/nodes/me",
                                          "/nodes/rotate-x", "/nodes/"]))
        method = data.draw(st.sampled_from(["POST", "GET"]) | METHODS)
        base = {"/nodes/heartbeat": {"status": "ready", "load": {"in_flight": 0, "queue_depth": 0}},
                "/nodes/register": {"mode": "direct", "url": "http://127.0.0.1:9/v1", "models": ["tiny"]},
                "/nodes/enroll": {"name": "n", "mode": "direct", "url": "http://127.0.0.1:9/v1", "models": ["tiny"]},
                }.get(path)
        body = data.draw(bodies(base)) if method != "GET" else None
        key = data.draw(st.sampled_from([t.node_credential, "ent-llm-junk", "nc-llm-junk", USER, None]))
        resp = send(t, method, path, key=key, body=body, headers=data.draw(HEADERS))
        check(resp, f"{method} {path} {body[:200] if body else b''!r}")


class TestFuzzAnyPath:
    """Any path and method, with or without a key."""

    @SETTINGS
    @given(path=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters="?#"),
                        max_size=60),
           method=METHODS, key=st.sampled_from([ADMIN, USER, None]), headers=HEADERS)
    def test_any_path(self, clean_log: Target, path: str, method: str, key: str | None,
                      headers: dict[str, str]) -> None:
        prefix = "" if path.startswith("/") else "/"
        resp = send(clean_log, method, prefix + path, key=key, headers=headers)
        check(resp, f"{method} {prefix + path}")


class TestFuzzRawHeaders:
    """Header bytes no HTTP client library would send (obs-text, controls, odd names), over a raw socket."""

    @SETTINGS
    @given(name=st.sampled_from([b"x-request-id", b"authorization", b"content-type", b"x-asgi-llm-cache-ttl",
                                 b"x-asgi-llm-cache-key", b"x-api-key", b"accept-encoding"])
           | st.binary(min_size=1, max_size=20).filter(lambda b: b":" not in b and b"\r" not in b and b"\n" not in b),
           value=st.binary(max_size=120).filter(lambda b: b"\r" not in b and b"\n" not in b),
           path=st.sampled_from([b"/v1/models", b"/v1/chat/completions", b"/admin/keys", b"/nodes/me", b"/healthz"]),
           key=st.sampled_from([USER.encode(), ADMIN.encode(), None]))
    def test_any_header_bytes(self, clean_log: Target, name: bytes, value: bytes, path: bytes,
                              key: bytes | None) -> None:
        body = b'{"model":"chat","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}'
        method = b"POST" if path == b"/v1/chat/completions" else b"GET"
        head = [method + b" " + path + b" HTTP/1.1", b"host: 127.0.0.1", b"connection: close", name + b": " + value]
        if key is not None:
            head.append(b"authorization: Bearer " + key)
        if method == b"POST":
            head += [b"content-type: application/json", b"content-length: " + str(len(body)).encode()]
        raw = b"\r\n".join(head) + b"\r\n\r\n" + (body if method == b"POST" else b"")
        with socket.create_connection(("127.0.0.1", clean_log.gw.port), timeout=TIMEOUT_S) as sock:
            sock.sendall(raw)
            data = b""
            while chunk := sock.recv(65536):  # bounded: the server closes (connection: close) or times out
                data += chunk
                if len(data) > 1_000_000:
                    break
        status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else None
        # A server may also just close on a request it cannot parse; a 5xx is never right.
        assert status is None or status < 500, (raw[:300], data[:300])


def _admin_body(path: str, method: str) -> dict[str, Any] | None:
    return {
        ("/admin/keys", "POST"): {"org": "team-a", "name": "k", "scopes": ["inference"], "models": ["chat"],
                                  "limits": {"rpm": 5}, "expires_in_s": 60},
        ("/admin/enrollment-tokens", "POST"): {"org": "team-a", "ttl_s": 60, "labels": {"a": "b"}},
        ("/admin/nodes/{node_id}", "PATCH"): {"labels": {"a": "b"}, "availability": {"mode": "always"},
                                              "shared_with": ["team-b"], "price": {"input": 1, "output": 2}},
        ("/admin/node-acceptance", "PUT"): {"org": "team-a", "accept": [{"owner": "*"}]},
        ("/admin/explain", "POST"): {"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
    }.get((path, method))


# ----------------------------------------------------------------------------- regressions


class TestHostileJsonRegressions:
    """Examples the fuzzing found or the issue named, kept as plain tests."""

    @pytest.mark.parametrize("raw", [
        b'{"model": "chat", "model": "other", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "hi", "content": "bye"}]}',
    ])
    def test_duplicate_keys_are_a_400(self, target: Target, raw: bytes) -> None:
        resp = send(target, "POST", "/v1/chat/completions", key=USER, body=raw)
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["code"] == "invalid_json" and "twice" in err["message"], err

    def test_duplicate_keys_on_admin_key_creation_are_a_400(self, target: Target) -> None:
        raw = b'{"org": "team-a", "scopes": ["inference"], "scopes": ["admin"]}'
        resp = send(target, "POST", "/admin/keys", key=ADMIN, body=raw)
        assert resp.status_code == 400, resp.text
        assert "'scopes' twice" in resp.json()["error"]["message"]

    @pytest.mark.parametrize("after_seq", [str(2**63), str(2**64 + 1), "-1"])
    def test_audit_after_seq_past_64_bits_is_a_400(self, target: Target, after_seq: str) -> None:
        # Found by TestFuzzAdmin: a huge after_seq reached SQLite ("Python int too large") -> 500.
        resp = send(target, "GET", "/admin/audit", key=ADMIN, params={"after_seq": after_seq})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "after_seq"

    @pytest.mark.parametrize(("path", "since"), [
        ("/admin/nodes/report", "740000d"),  # found by TestFuzzAdmin: timedelta overflow -> 500
        ("/admin/usage", "9" * 5000 + "d"),
        ("/admin/usage/compare", "0001-01-01T00:00:00+14:00"),
        ("/admin/audit", "9999-12-31T23:59:59-14:00"),
    ])
    def test_time_outside_the_calendar_is_a_400(self, target: Target, path: str, since: str) -> None:
        resp = send(target, "GET", path, key=ADMIN, params={"since": since})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "since"
        assert target.http.get(path, params={"since": "24h"}, headers={"authorization": f"Bearer {ADMIN}"}).status_code == 200
