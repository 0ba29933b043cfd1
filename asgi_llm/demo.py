"""``asgi-llm demo``: the smoke checklist, offline, against real local processes.

It starts three fake OpenAI-compatible upstreams (provider A, provider B, and a local
"node"), writes a recipe for them, serves it with ``asgi-llm serve`` in a child
process, and runs the checklist with the official ``openai`` SDK — one line per check,
exit status 1 if any fails. Later capabilities add their checks to :data:`CHECKS`.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHECKS", "DemoEnv", "run_demo"]

# The demo gateway's keys (auth is on, as in production). Not secrets: the demo is local.
DEMO_KEY = "sk-demo-client-key"
DEMO_ADMIN_KEY = "sk-demo-admin-key"


@dataclass
class DemoEnv:
    """What a check can use: the gateway's base URL and the fake upstreams by name."""

    base_url: str
    upstreams: dict[str, object]
    ledger_url: str | None = None
    admin_key: str = DEMO_ADMIN_KEY

    def client(self, **kwargs: object):  # type: ignore[no-untyped-def]
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=DEMO_KEY, max_retries=0, timeout=20, **kwargs)  # type: ignore[arg-type]


def _recipe(urls: dict[str, str]) -> str:
    return f"""\
providers:
  provider-a: {{kind: openai, base_url: "{urls['provider-a']}", api_keys: ["sk-demo-a"], timeout_s: 10, ttft_timeout_s: 5}}
  provider-b: {{kind: openai, base_url: "{urls['provider-b']}", api_keys: ["sk-demo-b"], timeout_s: 10, ttft_timeout_s: 5}}
models:
  demo-a:    {{targets: [{{provider: provider-a, model: gpt-4o-mini, price: {{input: 0.15, output: 0.60}}}}]}}
  demo-b:    {{targets: [{{provider: provider-b, model: llama-3.1-8b, price: {{input: 0.05, output: 0.08}}}}]}}
  demo-node: {{targets: [{{nodes: "node-1", model: "llama3.1:8b", price: {{input: 0, output: 0}}}}]}}  # enrolled below
  demo-cached: {{targets: [{{provider: provider-a, model: gpt-4o-mini, price: {{input: 0.15, output: 0.60}}}}]}}
  chat:                      # provider A first, B as the fallback (its own upstream model, so the
    strategy: priority       # breaker the failover check trips never touches the other checks' routes)
    targets:
      - {{provider: provider-a, model: gpt-4o, price: {{input: 2.50, output: 10.00}}}}
      - {{provider: provider-b, model: llama-3.1-8b, price: {{input: 0.05, output: 0.08}}}}
cache: {{enabled: false, models: {{demo-cached: {{enabled: true, ttl_s: 600}}}}}}
auth:
  admin_keys: ["{DEMO_ADMIN_KEY}"]
  pepper: "asgi-llm-demo-pepper-not-a-secret"
  keys:
    - {{key: "{DEMO_KEY}", org: demo, name: demo-client}}
limits:
  org: {{rpm: 600, tpm: 1000000, spend_usd_per_day: 50}}
nodes: {{heartbeat_interval_s: 1, heartbeat_window_s: 5, allowed_networks: ["127.0.0.1/32"]}}  # the demo node is local
"""


def check_every_route(env: DemoEnv) -> str:
    """1. 200 from every route: provider A, provider B, and the local node."""
    client = env.client()
    seen = []
    try:
        for model, upstream, route_prefix in (("demo-a", "provider-a", "provider-a/"), ("demo-b", "provider-b", "provider-b/"),
                                              ("demo-node", "node-1", "node:node-1@demo/")):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "ping"}]
            )
            reply = raw.parse()
            route = raw.headers.get("x-asgi-llm-route", "")
            text = reply.choices[0].message.content or ""
            if raw.status_code != 200 or not route.startswith(route_prefix) or f"Hello from {upstream}" not in text:
                raise AssertionError(f"{model}: status {raw.status_code}, route {route!r}, reply {text!r}")
            # The same route, streamed.
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "ping"}], stream=True
            )
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            if streamed != text:
                raise AssertionError(f"{model}: streamed {streamed!r} != {text!r}")
            seen.append(f"{model}→{route}")
    finally:
        client.close()
    return ", ".join(seen)


def check_failover(env: DemoEnv) -> str:
    """2. Failover: provider A goes down → requests fail over automatically, clients see no error."""
    a = env.upstreams["provider-a"]
    a.add_faults({"kind": "status", "status": 503, "times": None, "match": {"model": "gpt-4o"}})  # type: ignore[attr-defined]
    client = env.client()
    routes = []
    try:
        for stream in (False, True, False, True, False):
            if stream:
                raw = client.chat.completions.with_raw_response.create(
                    model="chat", messages=[{"role": "user", "content": "are you there?"}], stream=True)
                text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
            else:
                raw = client.chat.completions.with_raw_response.create(
                    model="chat", messages=[{"role": "user", "content": "are you there?"}])
                text = raw.parse().choices[0].message.content or ""
            if not text.startswith("Hello from provider-b"):
                raise AssertionError(f"answer {text!r} did not come from the fallback")
            routes.append(raw.headers["x-asgi-llm-route"])
    finally:
        client.close()
        a.clear_faults()  # type: ignore[attr-defined]
    if set(routes) != {"provider-b/llama-3.1-8b"}:
        raise AssertionError(f"routes {routes}")
    tried = a.stats()["by_model"].get("gpt-4o", 0)  # type: ignore[attr-defined]
    return f"5/5 answered by provider-b (streamed and not); provider A was tried {tried}× before its breaker opened"


def check_cache(env: DemoEnv) -> str:
    """4. Cache: a cache policy for a hot prompt → the second call is a hit, served without an upstream call."""
    import os

    upstream = env.upstreams["provider-a"]

    def upstream_calls() -> int:
        return int(upstream.stats()["requests"].get("/v1/chat/completions", 0))  # type: ignore[attr-defined]

    client = env.client()
    messages = [{"role": "user", "content": "hot prompt " + os.urandom(4).hex()}]
    try:
        before = upstream_calls()
        first = client.chat.completions.with_raw_response.create(model="demo-cached", messages=messages, temperature=0)
        after_first = upstream_calls()
        second = client.chat.completions.with_raw_response.create(model="demo-cached", messages=messages, temperature=0)
        after_second = upstream_calls()
    finally:
        client.close()
    statuses = (first.headers.get("x-asgi-llm-cache"), second.headers.get("x-asgi-llm-cache"))
    if statuses != ("MISS", "HIT"):
        raise AssertionError(f"x-asgi-llm-cache was {statuses}, expected ('MISS', 'HIT')")
    if after_first - before != 1 or after_second != after_first:
        raise AssertionError(f"upstream calls: {after_first - before} for the miss, {after_second - after_first} for the hit")
    if second.parse().choices[0].message.content != first.parse().choices[0].message.content:
        raise AssertionError("the hit's answer differs from the miss's")
    return f"MISS → HIT (key {second.headers.get('x-asgi-llm-cache-key')}), 1 upstream call for 2 requests"


def check_cost_comparison(env: DemoEnv) -> str:
    """3. Costs: the same prompt over different routes → costs compared in the usage report."""
    import os
    from decimal import Decimal

    from asgi_llm.usage.cost_check import compare_demo_routes

    client = env.client()
    messages = [{"role": "user", "content": "compare my cost " + os.urandom(4).hex()}]
    request_ids = []
    try:
        for model in ("demo-a", "demo-b", "demo-node"):
            raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
            request_ids.append(raw.headers["x-request-id"])
    finally:
        client.close()
    if env.ledger_url is None:
        raise AssertionError("the demo gateway has no ledger")
    rows = compare_demo_routes(env.ledger_url, request_ids, expect_routes=3)
    costs = {r["route"]: Decimal(r["cost_per_request_usd"]) for r in rows}
    a, b, node = costs["provider-a/gpt-4o-mini"], costs["provider-b/llama-3.1-8b"], costs["node:node-1@demo/llama3.1:8b"]
    if not a > b > node == 0:
        raise AssertionError(f"expected provider-a > provider-b > node (free), got {costs}")
    return "  <  ".join(f"{r['route']} ${r['cost_per_request_usd']} ({r['avg_latency_ms']:.0f} ms)"
                        for r in sorted(rows, key=lambda r: Decimal(r["cost_per_request_usd"])))


def check_rate_limits(env: DemoEnv) -> str:
    """5. Limits: org-wide rate limits and quotas → the call over the limit gets 429 with Retry-After and x-ratelimit-* headers."""
    import httpx2
    import openai

    root = env.base_url.removesuffix("/v1")
    admin = {"authorization": f"Bearer {env.admin_key}"}
    with httpx2.Client(timeout=10) as http:
        # A team key with its own limits, made through the admin API (as `asgi-llm keys create` does).
        resp = http.post(root + "/admin/keys", headers=admin,
                         json={"org": "team-a", "name": "demo-limited", "limits": {"rpm": 3, "tpm": 20000}})
        if resp.status_code != 201:
            raise AssertionError(f"POST /admin/keys: {resp.status_code} {resp.text}")
        key, key_id = resp.json()["key"], resp.json()["id"]
        client = openai.OpenAI(base_url=env.base_url, api_key=key, max_retries=0, timeout=20)
        messages = [{"role": "user", "content": "ping"}]
        try:
            remaining = []
            for _ in range(3):
                raw = client.chat.completions.with_raw_response.create(model="demo-b", messages=messages, max_tokens=16)
                remaining.append(raw.headers.get("x-ratelimit-remaining-requests"))
            if remaining != ["2", "1", "0"]:
                raise AssertionError(f"x-ratelimit-remaining-requests went {remaining}, expected 2, 1, 0")
            try:
                client.chat.completions.create(model="demo-b", messages=messages, max_tokens=16)
            except openai.RateLimitError as exc:
                refused = exc
            else:
                raise AssertionError("the 4th call within a minute was admitted (rpm 3)")
        finally:
            client.close()
        headers = refused.response.headers
        missing = [h for h in ("retry-after", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                               "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                               "x-ratelimit-reset-tokens") if h not in headers]
        if missing:
            raise AssertionError(f"the 429 lacks {missing}")
        ledger = ""
        if http.post(root + "/admin/usage/flush", headers=admin).status_code == 200:
            rows = http.get(root + "/admin/usage", params={"group_by": "key", "org": "team-a"}, headers=admin).json()["data"]
            served = sum(r["requests"] for r in rows if r.get("key") == key_id)
            if served != 3:
                raise AssertionError(f"the ledger shows {served} requests for {key_id}, expected the 3 admitted")
            ledger = "; the ledger shows the 3 admitted calls"
    return f"3 × 200 (remaining 2→1→0), then 429 Retry-After {headers['retry-after']} s: {refused.message}{ledger}"


CHECKS: list[Callable[[DemoEnv], str]] = [
    check_every_route,
    check_failover,
    check_cost_comparison,
    check_cache,
    check_rate_limits,
]
"""The smoke checklist, in order. Each returns a short detail line or raises."""


def _enroll_node(stack: ExitStack, env: DemoEnv, *, engine: str, state_dir: Path, say: Callable[[str], None]) -> None:
    """node-1 joins through the real flow: admin token → `asgi-llm node join` → heartbeat."""
    import httpx2

    from asgi_llm.testing.processes import free_port, managed_process

    root = env.base_url.removesuffix("/v1")
    resp = httpx2.post(root + "/admin/enrollment-tokens", json={"org": "demo", "ttl_s": 120},
                       headers={"authorization": f"Bearer {env.admin_key}"}, timeout=10)
    if resp.status_code != 201:
        raise RuntimeError(f"POST /admin/enrollment-tokens: {resp.status_code} {resp.text}")
    port = free_port()
    stack.enter_context(managed_process(
        [sys.executable, "-m", "asgi_llm.cli", "node", "join", "--gateway", root, "--token", resp.json()["token"],
         "--engine", engine, "--name", "node-1", "--port", str(port), "--state-dir", str(state_dir)],
        ready_url=f"http://127.0.0.1:{port}/healthz", name="node-agent", timeout=30,
    ))
    say(f"node-1: enrolled with a one-time token (asgi-llm node join), agent at 127.0.0.1:{port}, heartbeating")


def run_demo(*, keep_running: bool = False, out=sys.stdout) -> int:  # type: ignore[no-untyped-def]
    """Run the checklist; return the process exit status (0 = every check passed)."""
    from asgi_llm.testing.processes import fake_upstream, gateway_process

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="asgi-llm-demo-") as tmp:
        say("asgi-llm demo: starting fake upstreams (provider-a, provider-b, node-1) and a gateway …")
        upstreams = {
            name: stack.enter_context(fake_upstream(name, api_key=key, models=models))
            for name, key, models in (("provider-a", "sk-demo-a", None), ("provider-b", "sk-demo-b", None),
                                      ("node-1", None, ["llama3.1:8b"]))
        }
        recipe = Path(tmp) / "demo.yaml"
        ledger_url = f"sqlite:///{Path(tmp) / 'ledger.db'}"
        recipe.write_text(_recipe({n: h.base_url for n, h in upstreams.items()})  # type: ignore[attr-defined]
                          + f'stores: {{ledger: "{ledger_url}"}}\n')
        gateway = stack.enter_context(gateway_process(recipe, name="gateway"))
        env = DemoEnv(base_url=gateway.base_url, upstreams=upstreams, ledger_url=ledger_url)
        say(f"gateway: {env.base_url}")
        _enroll_node(stack, env, engine=upstreams["node-1"].base_url, state_dir=Path(tmp) / "node-1", say=say)  # type: ignore[attr-defined]
        failed = 0
        for check in CHECKS:
            title = (check.__doc__ or check.__name__).strip().splitlines()[0]
            t0 = time.perf_counter()
            try:
                detail = check(env)
            except Exception as exc:  # noqa: BLE001 - a failed check is reported, not raised
                failed += 1
                say(f"FAIL  {title} — {type(exc).__name__}: {exc}")
                traceback.print_exc(file=sys.stderr)
            else:
                say(f"ok    {title} ({(time.perf_counter() - t0) * 1000:.0f} ms) — {detail}")
        say(f"{len(CHECKS) - failed} passed, {failed} failed")
        if keep_running:
            say(f"gateway left running at {env.base_url}; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 1 if failed else 0
