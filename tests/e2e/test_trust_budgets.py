"""Spend budgets that hold, end to end: a real gateway process (Redis state, SQLite
ledger), the fake upstream, real node agents (`asgi-llm node join`) and a lying engine.

* fallbacks + provider.ignore cannot route around a budget: the reservation prices the
  dearest target the request may reach, so requests over budget get a 429 (OpenAI
  shape, Retry-After) and the budget's counter in Redis == the ledger's sum;
* recipe and ``usage.prices`` override prices: the counter == the ledger, to the pico-USD;
* a node-served attempt is charged to spend at its owner's price;
* a node reporting 3·10¹² tokens is clamped and flagged, not billed as such.
"""

from __future__ import annotations

import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import redis

from asgi_llm.testing.processes import FakeUpstreamHandle, fake_upstream, free_port, gateway_process, managed_process
from asgi_llm.usage.records import PICO
from tests.conftest import UPSTREAM_KEYS

pytestmark = pytest.mark.e2e

ADMIN = "sk-admin-budgets-0123456789"
REDIS_URL = "redis://127.0.0.1:6379/0"
MESSAGES = [{"role": "user", "content": "hello"}]
BUDGET = Decimal("0.05")

# An OpenAI-compatible engine that bills absurdly: 3·10¹² prompt and completion tokens.
LIAR_ENGINE = '''
import json, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

N = 3 * 10**12
USAGE = {"prompt_tokens": N, "completion_tokens": N, "total_tokens": 2 * N}

async def models(request):
    return JSONResponse({"object": "list", "data": [{"id": "liar-chat", "object": "model"}]})

async def chat(request):
    body = await request.json()
    if body.get("stream"):
        async def events():
            base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "liar-chat"}
            yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}}]}) + "\\n\\n"
            yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + "\\n\\n"
            yield "data: " + json.dumps({**base, "choices": [], "usage": USAGE}) + "\\n\\n"
            yield "data: [DONE]\\n\\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    return JSONResponse({"id": "c1", "object": "chat.completion", "created": 1, "model": "liar-chat",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                         "usage": USAGE})

app = Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


@dataclass
class Served:
    root: str
    suffix: str  # makes this run's key names (and so its Redis counters) unique

    def key(self, who: str) -> str:
        return f"sk-{who}-{self.suffix}"

    def client(self, who: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.root + "/v1", api_key=self.key(who), max_retries=0, timeout=20)

    def admin(self, method: str, path: str, body: Any = None) -> httpx2.Response:
        with httpx2.Client(timeout=10, trust_env=False) as http:
            return http.request(method, self.root + path, json=body, headers={"authorization": f"Bearer {ADMIN}"})

    def spent_pico(self, who: str) -> int:
        """The key's spend_day counter(s) in Redis, pico-USD."""
        r = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(r.scan_iter(match=f"asgi-llm:rl:spend_day:key:static:{who}-{self.suffix}:*", count=1000))
            return sum(int(r.get(k) or 0) for k in keys)
        finally:
            r.close()

    def _ledger_row(self, who: str) -> dict[str, Any] | None:
        assert self.admin("POST", "/admin/usage/flush").status_code == 200
        resp = self.admin("GET", "/admin/usage?group_by=key")
        assert resp.status_code == 200, resp.text
        row = next((r for r in resp.json()["data"] if r["key"] == f"static:{who}-{self.suffix}"), None)
        return None if row is None else {**row, "cost_pico": int(Decimal(row["cost_usd"]) * PICO)}

    def attempts(self, who: str) -> int:
        """The key's ledger rows so far."""
        row = self._ledger_row(who)
        return 0 if row is None else int(row["attempts"])

    def ledger(self, who: str, expect_rows: int) -> dict[str, Any]:
        """The key's ledger totals (cost in pico-USD), once the ledger has ``expect_rows`` rows."""
        deadline = time.monotonic() + 10
        while True:
            row = self._ledger_row(who)
            if row is not None and row["attempts"] >= expect_rows:
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"{expect_rows} ledger rows for {who} did not arrive: {row}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def chat_engine() -> Iterator[FakeUpstreamHandle]:
    with fake_upstream("budget-node-engine", models=["tiny-chat"]) as h:
        yield h


@pytest.fixture(scope="module")
def liar_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    script = tmp_path_factory.mktemp("liar") / "liar.py"
    script.write_text(LIAR_ENGINE)
    port = free_port()
    with managed_process([sys.executable, str(script), str(port)], ready_url=f"http://127.0.0.1:{port}/v1/models",
                         name="liar-engine", timeout=30):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def served(_upstream_a: FakeUpstreamHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("budgets")
    sfx = uuid.uuid4().hex[:10]
    up, key = _upstream_a.base_url, UPSTREAM_KEYS["provider-a"]
    recipe = tmp / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        providers:
          cheap-p:  {{base_url: "{up}", api_keys: ["{key}"], timeout_s: 10}}
          pricey-p: {{base_url: "{up}", api_keys: ["{key}"], timeout_s: 10}}
          ovr-p:    {{base_url: "{up}", api_keys: ["{key}"], timeout_s: 10}}
        models:
          cheap:  {{targets: [{{provider: cheap-p, model: gpt-4o-mini, price: {{input: 0.01, output: 0.01}}}}]}}
          pricey: {{targets: [{{provider: pricey-p, model: gpt-4o-mini, price: {{input: 300, output: 600}}}}]}}
          ovr:    {{targets: [{{provider: ovr-p, model: gpt-4o-mini}}]}}
          local:  {{targets: [{{nodes: "name:honest-{sfx}", model: tiny-chat}}]}}
          dear:   {{targets: [{{nodes: "name:dear-{sfx}", model: tiny-chat}}]}}
          liar:   {{targets: [{{nodes: any, model: liar-chat}}]}}
        stores: {{ledger: "sqlite:///{tmp / 'gw.db'}", state: "{REDIS_URL}"}}
        auth:
          admin_keys: ["{ADMIN}"]
          pepper: "budgets-test-pepper-0123456789"
          keys:
            - {{key: "sk-bypass-{sfx}", org: team-a, name: "bypass-{sfx}", limits: {{spend_usd_per_day: {BUDGET}}}}}
            - {{key: "sk-recipe-{sfx}", org: team-a, name: "recipe-{sfx}", limits: {{spend_usd_per_day: 10}}}}
            - {{key: "sk-ovr-{sfx}", org: team-a, name: "ovr-{sfx}", limits: {{spend_usd_per_day: 10}}}}
            - {{key: "sk-node-{sfx}", org: team-a, name: "node-{sfx}", limits: {{spend_usd_per_day: 10}}}}
            - {{key: "sk-liar-{sfx}", org: team-a, name: "liar-{sfx}", limits: {{spend_usd_per_day: 10}}}}
            - {{key: "sk-dear-{sfx}", org: team-a, name: "dear-{sfx}", limits: {{spend_usd_per_day: 0.01}}}}
        usage:
          flush_interval_s: 0.05
          prices: {{"ovr-p/gpt-4o-mini": {{input: 2, output: 4}}}}
        nodes: {{heartbeat_interval_s: 0.5, heartbeat_window_s: 2.0, allowed_networks: ["127.0.0.1/32"]}}
        routing: {{health: {{failure_threshold: 1000, probe_interval_s: 0}}}}
        """))
    try:
        with gateway_process(recipe, name="gateway-budgets") as gw:
            yield Served(gw.url, sfx)
    finally:  # this run's counters (they would expire with their day anyway)
        r = redis.Redis.from_url(REDIS_URL)
        try:
            for k in list(r.scan_iter(match=f"asgi-llm:rl:*-{sfx}*", count=1000)):
                r.delete(k)
        finally:
            r.close()


@pytest.fixture(scope="module")
def nodes(served: Served, chat_engine: FakeUpstreamHandle, liar_engine: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Three enrolled node agents of team-a, priced by their owners: a cheap one, a dear
    one, and a liar."""
    tmp = tmp_path_factory.mktemp("agents")
    procs = []
    from contextlib import ExitStack

    with ExitStack() as stack:
        for name, engine, price in ((f"honest-{served.suffix}", chat_engine.base_url, ("5", "10")),
                                    (f"dear-{served.suffix}", chat_engine.base_url, ("100", "200")),
                                    (f"liar-{served.suffix}", liar_engine, ("1", "1"))):
            token = served.admin("POST", "/admin/enrollment-tokens", {"org": "team-a"})
            assert token.status_code == 201, token.text
            port = free_port()
            args = [sys.executable, "-m", "asgi_llm.cli", "node", "join", "--gateway", served.root, "--engine", engine,
                    "--name", name, "--port", str(port), "--state-dir", str(tmp / name), "--drain-timeout", "2",
                    "--token", token.json()["token"], "--price-input", price[0], "--price-output", price[1]]
            procs.append(stack.enter_context(managed_process(args, ready_url=f"http://127.0.0.1:{port}/healthz",
                                                             name=f"agent-{name}", timeout=30)))
        names = {f"{n}-{served.suffix}" for n in ("honest", "dear", "liar")}
        wait_for(lambda: _online(served) >= names, 20, "the three nodes to be online")
        yield


def _online(served: Served) -> set[str]:
    return {n["name"] for n in served.admin("GET", "/admin/nodes").json()["data"] if n["status"] == "online"}


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class TestBypass:
    def test_fallbacks_and_provider_ignore_hit_the_budget(self, served: Served) -> None:
        """model cheap + fallbacks [pricey] + provider.ignore [cheap-p], 30 times against a $0.05/day
        budget: a few are admitted, then 429 insufficient_quota with Retry-After; the counter
        in Redis == the ledger's sum and stays within the budget."""
        admitted, refused = 0, 0
        with served.client("bypass") as c:
            for _ in range(30):
                try:
                    raw = c.chat.completions.with_raw_response.create(
                        model="cheap", messages=MESSAGES, max_tokens=20,  # type: ignore[arg-type]
                        extra_body={"fallbacks": ["pricey"], "provider": {"ignore": ["cheap-p"]}})
                    assert raw.headers["x-asgi-llm-route"] == "pricey-p/gpt-4o-mini"
                    admitted += 1
                except openai.RateLimitError as exc:
                    refused += 1
                    err = exc.body if isinstance(exc.body, dict) else {}
                    assert exc.code == "insufficient_quota" and "USD per day" in err.get("message", "")
                    assert set(err) >= {"message", "type", "param", "code"}
                    assert int(exc.response.headers["retry-after"]) >= 1
        assert admitted + refused == 30
        assert 0 < admitted < 30 and refused > 0, f"admitted {admitted}/30"
        ledger = served.ledger("bypass", expect_rows=admitted)
        assert ledger["requests"] == admitted
        assert served.spent_pico("bypass") == ledger["cost_pico"] <= int(BUDGET * PICO)


class TestPriceSources:
    @pytest.mark.parametrize(("who", "model", "source_cost"), [
        ("recipe", "pricey", (Decimal(300), Decimal(600))),
        ("ovr", "ovr", (Decimal(2), Decimal(4))),
    ])
    def test_counter_equals_ledger(self, served: Served, who: str, model: str, source_cost: tuple[Decimal, Decimal]) -> None:
        """A recipe price and a usage.prices override: Redis spend == ledger cost, to the pico-USD."""
        usage = []
        with served.client(who) as c:
            for stream in (False, True):
                if stream:
                    chunks = list(c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=15, stream=True,
                                                            stream_options={"include_usage": True}))
                    usage.append(chunks[-1].usage)
                else:
                    usage.append(c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=15).usage)
        expected = sum((u.prompt_tokens * source_cost[0] + u.completion_tokens * source_cost[1]) for u in usage) / 10**6
        ledger = served.ledger(who, expect_rows=2)
        assert ledger["cost_pico"] == int(expected * PICO) > 0
        assert served.spent_pico(who) == ledger["cost_pico"]


@pytest.mark.usefixtures("nodes")
class TestNodes:
    def test_node_attempts_are_charged_at_the_owner_price(self, served: Served) -> None:
        """A node-served request costs its owner's price, in the ledger and in the budget alike."""
        with served.client("node") as c:
            raw = c.chat.completions.with_raw_response.create(model="local", messages=MESSAGES, max_tokens=10)
            assert raw.headers["x-asgi-llm-route"].startswith("node:honest-")
            u = raw.parse().usage
        ledger = served.ledger("node", expect_rows=1)
        assert ledger["cost_pico"] == int((u.prompt_tokens * 5 + u.completion_tokens * 10) * PICO / 10**6) > 0
        assert served.spent_pico("node") == ledger["cost_pico"]

    def test_node_spend_hits_the_budget(self, served: Served) -> None:
        """A node at $100/$200 per 1M against a $0.01/day budget: a few admitted, then 429
        insufficient_quota — node traffic is spend like any other — and counter == ledger."""
        admitted, refused = 0, 0
        with served.client("dear") as c:
            for _ in range(20):
                try:
                    c.chat.completions.create(model="dear", messages=MESSAGES, max_tokens=10)
                    admitted += 1
                except openai.RateLimitError as exc:
                    assert exc.code == "insufficient_quota" and int(exc.response.headers["retry-after"]) >= 1
                    refused += 1
        assert 0 < admitted < 20 and admitted + refused == 20, f"admitted {admitted}/20"
        ledger = served.ledger("dear", expect_rows=admitted)
        assert served.spent_pico("dear") == ledger["cost_pico"] <= int(Decimal("0.01") * PICO)

    @pytest.mark.parametrize("stream", [False, True])
    def test_absurd_usage_is_clamped_and_flagged(self, served: Served, stream: bool) -> None:
        """A node reporting 3·10¹² tokens is billed for what the request and answer make possible."""
        before, rows_before = served.spent_pico("liar"), served.attempts("liar")
        with served.client("liar") as c:
            if stream:
                list(c.chat.completions.create(model="liar", messages=MESSAGES, stream=True))
            else:
                c.chat.completions.create(model="liar", messages=MESSAGES)
        ledger = served.ledger("liar", expect_rows=rows_before + 1)
        assert ledger["estimated_rows"] == ledger["attempts"]
        assert ledger["prompt_tokens"] < 2_000 * ledger["attempts"] and ledger["completion_tokens"] < 200 * ledger["attempts"]
        assert served.spent_pico("liar") == ledger["cost_pico"] < int(Decimal("0.01") * PICO)
        assert served.spent_pico("liar") > before
