"""Multi-replica exactness: three real gateway processes, one real Redis, one PostgreSQL.

Requests go round-robin across the replicas, all at once. A key with rpm = L gets
exactly L answers and 429s (with Retry-After) for the rest; a key with a spend budget
worth exactly L requests the same. Keys created on one replica work on all of them.
Streams and failovers settle to what the upstreams billed.

Redis is asyncio-only; the replicas run uvicorn under asyncio.
"""

from __future__ import annotations

import textwrap
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import httpx2
import openai
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, gateway_process
from tests.conftest import UPSTREAM_KEYS

pytestmark = pytest.mark.e2e

ADMIN = "adm-replicas-0123456789"
BURST, SPEND, METER = "sk-burst-0123456789", "sk-spend-0123456789", "sk-meter-0123456789"
L = 10
MESSAGES = [{"role": "user", "content": "count me"}]
REDIS_DB = 14
RUN = uuid.uuid4().hex[:8]  # key names (and so Redis counters) unique to this run: suites may run side by side


@dataclass
class Cluster:
    urls: list[str]  # each replica's /v1 URL
    redis_url: str

    def client(self, i: int, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.urls[i % len(self.urls)], api_key=key, max_retries=0, timeout=20)

    def root(self, i: int) -> str:
        return self.urls[i % len(self.urls)].removesuffix("/v1")


def _recipe(a: FakeUpstreamHandle, b: FakeUpstreamHandle, redis_url: str, pg_url: str) -> str:
    return textwrap.dedent(f"""\
        providers:
          provider-a: {{base_url: "{a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"], timeout_s: 10, ttft_timeout_s: 5}}
          provider-b: {{base_url: "{b.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-b']}"], timeout_s: 10, ttft_timeout_s: 5}}
        models:
          chat:   {{targets: [{{provider: provider-a, model: gpt-4o-mini}}]}}
          priced: {{targets: [{{provider: provider-a, model: gpt-4o-mini, price: {{input: 0, output: 1000}}}}]}}
          fo:
            targets:
              - {{provider: provider-a, model: gpt-4o-mini, price: {{input: 1, output: 2}}}}
              - {{provider: provider-b, model: llama-3.1-8b, price: {{input: 1, output: 2}}}}
        stores: {{state: "{redis_url}", ledger: "{pg_url}"}}
        # Breakers may be shared through Redis: keep the failover test's faults from opening one for the next tests.
        routing: {{health: {{probe_interval_s: 0, failure_threshold: 100000}}}}
        auth:
          admin_keys: ["{ADMIN}"]
          pepper: "replica-test-pepper-0123456789"
          cache_ttl_s: 1
          keys:
            - {{key: "{BURST}", org: team-a, name: burst-{RUN}, limits: {{rpm: {L}}}}}
            # 3 completion tokens at 1000 USD / 1M = 0.003 USD per request: the budget is L requests.
            - {{key: "{SPEND}", org: team-b, name: spend-{RUN}, models: [priced], limits: {{spend_usd_per_day: {L * 0.003:.3f}}}}}
            - {{key: "{METER}", org: team-c, name: meter-{RUN}, limits: {{tpm: 1000000}}}}
        """)


@pytest.fixture(scope="module")
def cluster(_upstream_a: FakeUpstreamHandle, _upstream_b: FakeUpstreamHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from tests.services import REDIS_HOST, REDIS_PORT, postgres_database, require_service

    require_service("Redis", REDIS_HOST, REDIS_PORT)
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"  # not flushed: counters are per RUN and expire
    pg = postgres_database()
    pg_url = next(pg)
    recipe = tmp_path_factory.mktemp("replicas") / "recipe.yaml"
    recipe.write_text(_recipe(_upstream_a, _upstream_b, url, pg_url))
    try:
        with ExitStack() as stack:
            urls = []
            for i in range(3):  # one after the other: the first migrates the database
                gw = stack.enter_context(gateway_process(recipe, name=f"replica-{i}"))
                urls.append(gw.base_url)
            yield Cluster(urls, url)
    finally:
        pg.close()


def _away_from_window_edges() -> None:
    """Rate windows are aligned to the minute: don't start a burst in the last seconds of one."""
    if time.time() % 60 > 55:
        time.sleep(60.5 - time.time() % 60)


def _burst(cluster: Cluster, key: str, n: int, **kwargs: object) -> list[object]:
    """n concurrent chat calls, round-robin over the replicas; each result is the raw response or the error."""

    def one(i: int) -> object:
        client = cluster.client(i, key)
        try:
            return client.chat.completions.with_raw_response.create(messages=MESSAGES, **kwargs)  # type: ignore[arg-type]
        except openai.APIStatusError as exc:
            return exc
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


class TestExactAcrossReplicas:
    def test_rpm_is_exact(self, cluster: Cluster, upstream_a: FakeUpstreamHandle) -> None:
        """3·L concurrent requests over 3 replicas with rpm = L: exactly L admitted, the rest 429 with Retry-After."""
        _away_from_window_edges()
        results = _burst(cluster, BURST, 3 * L, model="chat")
        ok = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(ok) == L and len(refused) == 2 * L, [type(r).__name__ for r in results]
        for r in refused:
            headers = r.response.headers
            assert int(headers["retry-after"]) >= 1
            assert headers["x-ratelimit-limit-requests"] == str(L) and headers["x-ratelimit-remaining-requests"] == "0"
            assert f"key 'burst-{RUN}'" in r.message and "requests per minute" in r.message
        assert upstream_a.stats()["requests"].get("/v1/chat/completions") == L

    def test_spend_budget_is_exact(self, cluster: Cluster, upstream_a: FakeUpstreamHandle) -> None:
        """A daily budget worth exactly L requests admits exactly L of 3·L concurrent ones across replicas."""
        if time.time() % 86_400 > 86_390:
            time.sleep(86_400.5 - time.time() % 86_400)
        results = _burst(cluster, SPEND, 3 * L, model="priced", max_tokens=3)
        ok = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(ok) == L and len(refused) == 2 * L, [type(r).__name__ for r in results]
        for r in refused:
            assert r.code == "insufficient_quota" and int(r.response.headers["retry-after"]) >= 1
        assert all(r.parse().usage.completion_tokens == 3 for r in ok)  # type: ignore[attr-defined]


class TestSettlementAcrossReplicas:
    def test_streams_and_failovers_settle_to_upstream_usage(self, cluster: Cluster, upstream_a: FakeUpstreamHandle,
                                                            upstream_b: FakeUpstreamHandle) -> None:
        """The tokens charged in Redis equal what the upstreams billed: plain, streamed and failed-over calls."""
        import redis

        upstream_a.add_faults({"kind": "status", "status": 500, "times": None, "match": {"model": "gpt-4o-mini", "stream": True}})
        with ExitStack() as stack:
            clients = [stack.enter_context(cluster.client(i, METER)) for i in range(3)]
            clients[0].chat.completions.create(model="chat", messages=MESSAGES, max_tokens=20)
            list(clients[1].chat.completions.create(model="fo", messages=MESSAGES, stream=True))  # a fails → b
            list(clients[2].chat.completions.create(model="fo", messages=MESSAGES, stream=True,
                                                    stream_options={"include_usage": True}))
            clients[0].chat.completions.create(model="fo", messages=MESSAGES)  # non-stream: a serves it
        billed = sum(u["usage"]["prompt_tokens"] + u["usage"]["completion_tokens"]
                     for u in (upstream_a.stats(), upstream_b.stats()))
        assert upstream_b.stats()["usage"]["billed_requests"] == 2
        r = redis.Redis.from_url(cluster.redis_url)
        try:
            deadline = time.monotonic() + 3
            while True:  # settlement runs right after the response is sent
                charged = sum(int(r.get(k) or 0) for k in r.scan_iter(f"asgi-llm:rl:tokens:key:static:meter-{RUN}:*"))
                if charged == billed or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            r.close()
        assert charged == billed


class TestKeysAcrossReplicas:
    def test_key_created_on_one_replica_works_everywhere(self, cluster: Cluster, upstream_a: FakeUpstreamHandle) -> None:
        """A key created through replica 0 authenticates on 1 and 2; revoked on 2, it is refused everywhere within cache_ttl_s."""
        with httpx2.Client(timeout=10) as http:
            resp = http.post(cluster.root(0) + "/admin/keys", json={"org": "team-z"}, headers={"authorization": f"Bearer {ADMIN}"})
            assert resp.status_code == 201, resp.text
            key, key_id = resp.json()["key"], resp.json()["id"]
            for i in range(3):
                with cluster.client(i, key) as c:
                    assert c.chat.completions.create(model="chat", messages=MESSAGES).choices
            resp = http.delete(cluster.root(2) + f"/admin/keys/{key_id}", headers={"authorization": f"Bearer {ADMIN}"})
            assert resp.status_code == 200
        with cluster.client(2, key) as c, pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(model="chat", messages=MESSAGES)
        time.sleep(1.2)  # auth.cache_ttl_s: 1
        for i in range(3):
            with cluster.client(i, key) as c, pytest.raises(openai.AuthenticationError):
                c.chat.completions.create(model="chat", messages=MESSAGES)
