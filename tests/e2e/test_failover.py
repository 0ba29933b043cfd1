"""The fault matrix: each upstream fault against a healthy fallback, through a real
gateway process, streaming and not. The caller gets the complete answer or a clean
bounded error — never a hang, never a truncated success — and attempts stay bounded.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from asgi_llm.testing.fake_upstream import count_tokens
from asgi_llm.testing.processes import FakeUpstreamHandle, gateway_process
from tests.conftest import UPSTREAM_KEYS

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "status report"}]
FALLBACK_TEXT = "Hello from provider-b. You said: status report"

# case → (faults on the primary, stream?, expected: "fallback" | "primary" | "error-event" | http status)
CASES: dict[str, tuple[list[dict], bool, object]] = {
    "429-retry-after": ([{"kind": "status", "status": 429, "retry_after": 30, "times": None}], False, "fallback"),
    "429-no-header": ([{"kind": "status", "status": 429, "times": None}], True, "fallback"),
    "500-once": ([{"kind": "status", "status": 500}], False, "primary"),
    "500-once-stream": ([{"kind": "status", "status": 500}], True, "primary"),
    "503-persistent": ([{"kind": "status", "status": 503, "times": None}], False, "fallback"),
    "503-persistent-stream": ([{"kind": "status", "status": 503, "times": None}], True, "fallback"),
    "reset": ([{"kind": "reset", "times": None}], False, "fallback"),
    "reset-stream": ([{"kind": "reset", "times": None}], True, "fallback"),
    "silent": ([{"kind": "silence", "times": None}], False, "fallback"),
    "silent-stream": ([{"kind": "silence", "times": None}], True, "fallback"),
    "slow-first-token": ([{"kind": "slow_first_token", "delay_s": 3, "times": None}], True, "fallback"),
    "garbage": ([{"kind": "garbage", "times": None}], False, "fallback"),
    "cut-before-content": ([{"kind": "cut", "after_chunks": 0, "times": None}], True, "fallback"),
    "cut-mid-answer": ([{"kind": "cut", "after_chunks": 3, "times": None}], True, "error-event"),
    "stall-before-content": ([{"kind": "stall", "after_chunks": 0, "times": None}], True, "fallback"),
    "stall-mid-answer": ([{"kind": "stall", "after_chunks": 2, "times": None}], True, "error-event"),
    "malformed-first": ([{"kind": "malformed", "after_chunks": 0, "times": None}], True, "fallback"),
    "malformed-mid": ([{"kind": "malformed", "after_chunks": 2, "times": None}], True, "error-event"),
    "no-done": ([{"kind": "no_done", "times": None}], True, "error-event"),
    "context-length": ([{"kind": "context_length", "times": None}], False, "fallback"),
    "content-filter": ([{"kind": "content_filter", "times": None}], False, 400),
    "content-filter-stream": ([{"kind": "content_filter", "times": None}], True, 400),
}


def _recipe(a: FakeUpstreamHandle, b: FakeUpstreamHandle) -> str:
    """One model per case, each with its own provider entries, so health state never
    leaks from one case into another."""
    providers, models = [], []
    limits = "timeout_s: 2, ttft_timeout_s: 1, idle_timeout_s: 1"
    for case in CASES:
        providers.append(f'  p-{case}: {{base_url: "{a.base_url}", api_keys: ["{UPSTREAM_KEYS["provider-a"]}"], {limits}}}')
        providers.append(f'  f-{case}: {{base_url: "{b.base_url}", api_keys: ["{UPSTREAM_KEYS["provider-b"]}"], {limits}}}')
        models.append(
            f"  {case}: {{targets: [{{provider: p-{case}, model: {case}-primary, context_window: 1000}},"
            f" {{provider: f-{case}, model: {case}-fallback, context_window: 128000}}]}}"
        )
    extra = textwrap.dedent(f"""\
      p-ctx-small: {{base_url: "{a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"]}}
      f-ctx-small: {{base_url: "{b.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-b']}"]}}
      p-prefill:   {{base_url: "{a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"]}}
      f-prefill:   {{base_url: "{b.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-b']}"]}}
    """)
    extra_models = textwrap.dedent("""\
      ctx-small: {targets: [{provider: p-ctx-small, model: ctx-small-primary, context_window: 8000}, {provider: f-ctx-small, model: ctx-small-fallback, context_window: 4000}]}
      prefill: {targets: [{provider: p-prefill, model: prefill-primary}, {provider: f-prefill, model: prefill-fallback, prefill: false}]}
    """)
    return (
        "providers:\n" + "\n".join(providers) + "\n" + textwrap.indent(extra, "  ")
        + "models:\n" + "\n".join(models) + "\n" + textwrap.indent(extra_models, "  ")
        + "routing: {retries_per_target: 1, max_attempts: 4, max_retry_wait_s: 1, health: {failure_threshold: 1000, probe_interval_s: 0}}\n"
    )


@pytest.fixture(scope="module")
def matrix_gateway(_upstream_a: FakeUpstreamHandle, _upstream_b: FakeUpstreamHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    recipe = tmp_path_factory.mktemp("failover") / "recipe.yaml"
    recipe.write_text(_recipe(_upstream_a, _upstream_b))
    with gateway_process(recipe, name="gateway-failover") as gw:
        yield gw.base_url


def _calls(upstream: FakeUpstreamHandle, model: str) -> int:
    return int(upstream.stats()["by_model"].get(model, 0))


def _stream(gateway: str, model: str, messages: list[dict] = MESSAGES) -> tuple[httpx2.Response, list[str]]:
    with httpx2.Client(timeout=20) as http:
        with http.stream("POST", gateway + "/chat/completions", json={"model": model, "messages": messages, "stream": True}) as resp:
            body = resp.read().decode()
    return resp, [blk[6:] for blk in body.split("\n\n") if blk.startswith("data: ")]


class TestFaultMatrix:
    @pytest.mark.parametrize("case", list(CASES))
    def test_fault_against_healthy_fallback(self, case: str, matrix_gateway: str, upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle) -> None:
        """Each fault: the complete answer (from the fallback or a retried primary) or a clean bounded error."""
        faults, stream, expected = CASES[case]
        upstream_a.add_faults(*({**f, "match": {"model": f"{case}-primary"}} for f in faults))
        t0 = time.monotonic()
        if stream:
            resp, events = _stream(matrix_gateway, case)
            status = resp.status_code
        else:
            with httpx2.Client(timeout=20) as http:
                resp = http.post(matrix_gateway + "/chat/completions", json={"model": case, "messages": MESSAGES})
            status, events = resp.status_code, []
        elapsed = time.monotonic() - t0
        assert elapsed < 8, f"{case} took {elapsed:.1f}s"
        primary_calls, fallback_calls = _calls(upstream_a, f"{case}-primary"), _calls(upstream_b, f"{case}-fallback")
        assert primary_calls + fallback_calls <= 4  # attempts stay bounded

        if expected in ("fallback", "primary"):
            assert status == 200, resp.text if not stream else events
            served_by = "provider-b" if expected == "fallback" else "provider-a"
            route = resp.headers["x-asgi-llm-route"]
            assert route.startswith(("f-" if expected == "fallback" else "p-") + case + "/")
            assert int(resp.headers["x-asgi-llm-attempts"]) >= 2
            if stream:
                assert events[-1] == "[DONE]"
                chunks = [json.loads(e) for e in events[:-1]]
                text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
                assert text == f"Hello from {served_by}. You said: status report"
                assert all(c["model"] == f"{case}-{expected}" for c in chunks)  # the model that actually served
            else:
                body = resp.json()
                assert body["choices"][0]["message"]["content"] == f"Hello from {served_by}. You said: status report"
                assert body["model"] == f"{case}-{expected}"
                assert body["usage"]["completion_tokens"] == count_tokens(f"Hello from {served_by}. You said: status report")
            if expected == "fallback":
                assert fallback_calls == 1
        elif expected == "error-event":
            assert status == 200  # the stream had committed: the error can only be an event
            assert "[DONE]" not in events
            err = json.loads(events[-1])["error"]
            assert set(err) == {"message", "type", "param", "code"}
            text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1] if "choices" in json.loads(e))
            if case != "no-done":  # without [DONE] all text may have arrived; it still is not a success
                assert len(text) < len("Hello from provider-a. You said: status report")
            assert fallback_calls == 0  # after the commit point nothing is retried
        else:
            assert status == expected
            assert resp.headers["content-type"].startswith("application/json")
            assert fallback_calls == 0  # content policy / bad request: never retried elsewhere
            assert primary_calls == 1


class TestCapabilityFailover:
    def test_context_length_moves_only_to_larger_window(self, matrix_gateway: str, upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle) -> None:
        """context_length_exceeded never goes to a target that declares a smaller window."""
        upstream_a.add_faults({"kind": "context_length", "times": None, "match": {"model": "ctx-small-primary"}})
        with httpx2.Client(timeout=20) as http:
            resp = http.post(matrix_gateway + "/chat/completions", json={"model": "ctx-small", "messages": MESSAGES})
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "context_length_exceeded"
        assert _calls(upstream_b, "ctx-small-fallback") == 0

    def test_prefill_never_sent_to_target_without_it(self, matrix_gateway: str, upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle) -> None:
        """A fallback declared `prefill: false` is never sent an assistant prefill — even when the primary fails."""
        upstream_a.add_faults({"kind": "status", "status": 503, "times": None, "match": {"model": "prefill-primary"}})
        messages = [*MESSAGES, {"role": "assistant", "content": "Status:"}]
        with httpx2.Client(timeout=20) as http:
            resp = http.post(matrix_gateway + "/chat/completions", json={"model": "prefill", "messages": messages})
            assert resp.status_code == 502
            assert _calls(upstream_b, "prefill-fallback") == 0
            # Without a prefill, the same fallback is used normally.
            upstream_a.add_faults({"kind": "status", "status": 503, "times": None, "match": {"model": "prefill-primary"}})
            resp = http.post(matrix_gateway + "/chat/completions", json={"model": "prefill", "messages": MESSAGES})
        assert resp.status_code == 200 and resp.headers["x-asgi-llm-route"] == "f-prefill/prefill-fallback"

    def test_fallback_rejecting_prefill_at_runtime_moves_on(self, matrix_gateway: str, upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle) -> None:
        """A target that refuses a prefill it did not declare is passed over (the request itself is fine)."""
        upstream_a.add_faults({"kind": "reject_prefill", "times": None, "match": {"model": "503-persistent-primary"}})
        messages = [*MESSAGES, {"role": "assistant", "content": "Status:"}]
        with httpx2.Client(timeout=20) as http:
            resp = http.post(matrix_gateway + "/chat/completions", json={"model": "503-persistent", "messages": messages})
        assert resp.status_code == 200
        assert resp.headers["x-asgi-llm-route"] == "f-503-persistent/503-persistent-fallback"


@pytest.fixture
def flap_gateway(upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle, tmp_path: Path) -> Iterator[str]:
    recipe = tmp_path / "flap.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        providers:
          primary:  {{base_url: "{upstream_a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"], timeout_s: 2, ttft_timeout_s: 1}}
          fallback: {{base_url: "{upstream_b.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-b']}"]}}
        models:
          chat: {{targets: [{{provider: primary, model: flap-primary}}, {{provider: fallback, model: flap-fallback}}]}}
        routing:
          retries_per_target: 0
          health: {{failure_threshold: 2, cooldown_s: 1.5, max_cooldown_s: 3, probe_interval_s: 0.3}}
        """))
    with gateway_process(recipe, name="gateway-flap") as gw:
        yield gw.base_url


class TestFlappingPrimary:
    def test_down_then_back(self, flap_gateway: str, upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle) -> None:
        """Primary down: the fallback serves and the breaker stops calls to the primary; back up: traffic returns."""
        upstream_a.add_faults({"kind": "status", "status": 503, "times": None, "match": {"model": "flap-primary"}})
        client = openai.OpenAI(base_url=flap_gateway, api_key="x", max_retries=0, timeout=20)
        try:
            routes = []
            for _ in range(8):
                raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
                assert raw.parse().choices[0].message.content == FALLBACK_TEXT  # clients see no error
                routes.append(raw.headers["x-asgi-llm-route"])
            assert set(routes) == {"fallback/flap-fallback"}
            # The breaker opened after 2 failures: the primary was not called for every request.
            assert _calls(upstream_a, "flap-primary") <= 3
            upstream_a.clear_faults()  # the primary recovers
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
                if raw.headers["x-asgi-llm-route"] == "primary/flap-primary":
                    break
                time.sleep(0.2)
            else:
                pytest.fail("traffic never returned to the recovered primary")
            # And it stays there.
            for _ in range(3):
                raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
                assert raw.headers["x-asgi-llm-route"] == "primary/flap-primary"
                assert raw.headers["x-asgi-llm-attempts"] == "1"
        finally:
            client.close()


class TestFailoverAccounting:
    def test_caller_sees_fallback_model_and_usage(self, matrix_gateway: str, upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle) -> None:
        """After failover the response's model and usage are the fallback's, streamed usage included."""
        upstream_a.add_faults({"kind": "status", "status": 503, "times": None, "match": {"model": "503-persistent-stream-primary"}})
        client = openai.OpenAI(base_url=matrix_gateway, api_key="x", max_retries=0, timeout=20)
        try:
            chunks = list(client.chat.completions.create(
                model="503-persistent-stream", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
        finally:
            client.close()
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == count_tokens(FALLBACK_TEXT)
        assert {c.model for c in chunks} == {"503-persistent-stream-fallback"}
        billed = upstream_b.stats()["usage"]
        assert billed["completion_tokens"] == chunks[-1].usage.completion_tokens


@pytest.fixture
def keys_gateway(upstream_a: FakeUpstreamHandle, tmp_path: Path) -> Iterator[str]:
    good = UPSTREAM_KEYS["provider-a"]
    recipe = tmp_path / "keys.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        providers:
          pooled:  {{base_url: "{upstream_a.base_url}", api_keys: ["sk-revoked", "{good}"]}}
          allbad:  {{base_url: "{upstream_a.base_url}", api_keys: ["sk-bad-1", "sk-bad-2"]}}
        models:
          pooled: {{targets: [{{provider: pooled, model: pooled-model}}]}}
          allbad: {{targets: [{{provider: allbad, model: allbad-model}}]}}
        routing: {{health: {{probe_interval_s: 0}}}}
        """))
    with gateway_process(recipe, name="gateway-keys") as gw:
        yield gw.base_url


class TestKeyPools:
    def test_refused_key_cools_down_alone(self, keys_gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        """A key the upstream refuses is retired for a while; the pool's other key serves every request."""
        with httpx2.Client(timeout=20) as http:
            for _ in range(6):
                resp = http.post(keys_gateway + "/chat/completions", json={"model": "pooled", "messages": MESSAGES})
                assert resp.status_code == 200
        used = [r["headers"].get("authorization") for r in upstream_a.stats()["recent"]]
        assert used.count("Bearer sk-revoked") == 1  # tried once, then cooled down
        assert used.count(f"Bearer {UPSTREAM_KEYS['provider-a']}") == 6

    def test_all_keys_exhausted_is_503_naming_provider(self, keys_gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        """Every key refused: first a 502 (the upstream's answer), then a 503 naming the provider, without calling it."""
        with httpx2.Client(timeout=20) as http:
            first = http.post(keys_gateway + "/chat/completions", json={"model": "allbad", "messages": MESSAGES})
            assert first.status_code == 502
            second = http.post(keys_gateway + "/chat/completions", json={"model": "allbad", "messages": MESSAGES})
        assert second.status_code == 503
        message = second.json()["error"]["message"]
        assert "allbad" in message and "refused" in message
        assert "sk-bad" not in message
        tried = [r for r in upstream_a.stats()["recent"] if (r.get("body") or {}).get("model") == "allbad-model"]
        assert len(tried) == 2  # one try per key, then none


@pytest.fixture
def auth_gateway(upstream_a: FakeUpstreamHandle, tmp_path: Path) -> Iterator[str]:
    recipe = tmp_path / "auth.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        providers:
          flaky: {{base_url: "{upstream_a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"]}}
          wrong: {{base_url: "{upstream_a.base_url}", api_keys: ["sk-wrong-key"]}}
        models:
          flaky: {{targets: [{{provider: flaky, model: flaky-model}}]}}
          wrong: {{targets: [{{provider: wrong, model: wrong-model}}]}}
        routing: {{health: {{probe_interval_s: 0.2, auth_cooldown_s: 600}}}}
        """))
    with gateway_process(recipe, name="gateway-auth") as gw:
        yield gw.base_url


@pytest.fixture
def short_auth_gateway(upstream_a: FakeUpstreamHandle, tmp_path: Path) -> Iterator[str]:
    recipe = tmp_path / "short-auth.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        providers:
          short: {{base_url: "{upstream_a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"]}}
        models:
          short: {{targets: [{{provider: short, model: short-model}}]}}
        routing: {{health: {{probe_interval_s: 0, auth_cooldown_s: 0.5}}}}
        """))
    with gateway_process(recipe, name="gateway-short-auth") as gw:
        yield gw.base_url


def _poll_until_ok(http: httpx2.Client, url: str, model: str, within_s: float) -> tuple[float, list[int]]:
    """Send the request until it answers 200 (bounded); the seconds it took and the statuses seen."""
    started, seen = time.monotonic(), []
    for _ in range(int(within_s / 0.05)):
        resp = http.post(url + "/chat/completions", json={"model": model, "messages": MESSAGES})
        seen.append(resp.status_code)
        if resp.status_code == 200:
            return time.monotonic() - started, seen
        time.sleep(0.05)  # polling a live endpoint; there is no event to wait on from outside
    raise AssertionError(f"{model} never answered 200 within {within_s} s: {seen[-5:]}")


class TestAuthCooldown:
    """Issue 16 item 7: one upstream 401/403 used to retire a (target, key) for a hard-coded 300 s."""

    def test_probe_with_the_key_brings_it_back(self, auth_gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        upstream_a.add_faults({"kind": "status", "status": 401, "type": "invalid_request_error",
                               "code": "invalid_api_key", "match": {"model": "flaky-model"}})
        with httpx2.Client(timeout=20) as http:
            first = http.post(auth_gateway + "/chat/completions", json={"model": "flaky", "messages": MESSAGES})
            assert first.status_code == 502, first.text  # the upstream's 401, passed on as a gateway error
            took, seen = _poll_until_ok(http, auth_gateway, "flaky", within_s=10)
        assert took < 10  # not auth_cooldown_s (600 s): a free probe with that key succeeded
        probes = [r for r in upstream_a.stats()["recent"] if r["method"] == "GET"]
        assert any(r["headers"].get("authorization") == f"Bearer {UPSTREAM_KEYS['provider-a']}" for r in probes)
        chats = [r for r in upstream_a.stats()["recent"] if (r.get("body") or {}).get("model") == "flaky-model"]
        assert len(chats) == 2  # the refused one and the one that passed: none while retired

    def test_a_key_still_refused_stays_retired(self, auth_gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        with httpx2.Client(timeout=20) as http:
            first = http.post(auth_gateway + "/chat/completions", json={"model": "wrong", "messages": MESSAGES})
            assert first.status_code == 502, first.text
            upstream_a.wait_stats(lambda st: sum(r["method"] == "GET" and r["headers"].get("authorization")
                                                 == "Bearer sk-wrong-key" for r in st["recent"]) >= 2, timeout=10)
            again = http.post(auth_gateway + "/chat/completions", json={"model": "wrong", "messages": MESSAGES})
        assert again.status_code == 503, again.text  # two probes answered 401: still retired
        assert "refused" in again.json()["error"]["message"]
        chats = [r for r in upstream_a.stats()["recent"] if (r.get("body") or {}).get("model") == "wrong-model"]
        assert len(chats) == 1

    def test_cooldown_is_configurable(self, short_auth_gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        upstream_a.add_faults({"kind": "status", "status": 403, "match": {"model": "short-model"}})
        with httpx2.Client(timeout=20) as http:
            refused_at = time.monotonic()
            first = http.post(short_auth_gateway + "/chat/completions", json={"model": "short", "messages": MESSAGES})
            assert first.status_code == 502, first.text
            second = http.post(short_auth_gateway + "/chat/completions", json={"model": "short", "messages": MESSAGES})
            assert second.status_code == 503, second.text  # retired (no probes in this recipe) ...
            _poll_until_ok(http, short_auth_gateway, "short", within_s=10)
        assert time.monotonic() - refused_at >= 0.5  # ... for auth_cooldown_s, then back


@pytest.fixture
def explain_gateway(upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle, tmp_path: Path) -> Iterator[str]:
    recipe = tmp_path / "explain.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        providers:
          cheap:  {{base_url: "{upstream_b.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-b']}"]}}
          pricey: {{base_url: "{upstream_a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"]}}
        models:
          chat:
            strategy: cheapest
            targets:
              - {{provider: pricey, model: big, price: {{input: 5, output: 15}}}}
              - {{provider: cheap, model: small, price: {{input: 0.1, output: 0.2}}}}
        auth:
          admin_keys: ["sk-admin-explain-123"]
          pepper: "test-pepper-0123456789"
          keys: [{{key: "sk-team-explain-123", org: team-a}}]
        routing:
          rules:
            - {{name: batch-only-cheap, match: {{header: {{x-tier: batch}}}}, only: [cheap]}}
        """))
    with gateway_process(recipe, name="gateway-explain") as gw:
        yield gw.url


class TestExplain:
    def test_dry_run_plan_with_reasons(self, explain_gateway: str, upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle) -> None:
        """POST /admin/explain shows strategy, rule, order and skips — and calls no upstream."""
        req = {"model": "chat", "messages": MESSAGES, "max_tokens": 100}
        admin = {"authorization": "Bearer sk-admin-explain-123"}
        with httpx2.Client(timeout=10) as http:
            plain = http.post(explain_gateway + "/admin/explain", json=req, headers=admin).json()
            batch = http.post(explain_gateway + "/admin/explain", json=req, headers={**admin, "x-tier": "batch"}).json()
            refused = http.post(explain_gateway + "/admin/explain", json=req,
                                headers={"authorization": "Bearer sk-team-explain-123"})
        assert plain["strategy"] == "cheapest" and plain["plan"] == ["cheap/small", "pricey/big"]
        assert plain["targets"][0]["health"] == "closed"
        assert float(plain["targets"][0]["estimated_cost_usd"]) < float(plain["targets"][1]["estimated_cost_usd"])
        assert batch["rule"] == "batch-only-cheap" and batch["plan"] == ["cheap/small"]
        assert batch["steps"] == [{"route": "pricey/big", "skipped": "rule batch-only-cheap: not in only"}]
        assert refused.status_code in (401, 403)  # an inference key cannot use the admin API
        assert upstream_a.stats()["requests"].get("/v1/chat/completions") is None
        assert upstream_b.stats()["requests"].get("/v1/chat/completions") is None

    def test_overrides_reach_the_plan(self, explain_gateway: str) -> None:
        """OpenRouter-style provider overrides sent by a client are honoured end to end."""
        import openai

        client = openai.OpenAI(base_url=explain_gateway + "/v1", api_key="sk-team-explain-123", max_retries=0)
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="chat", messages=MESSAGES, extra_body={"provider": {"order": ["pricey"]}})
            assert raw.headers["x-asgi-llm-route"] == "pricey/big"
            raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
            assert raw.headers["x-asgi-llm-route"] == "cheap/small"
        finally:
            client.close()
