"""End to end: the response cache in a real `asgi-llm serve` process, with the openai SDK.

Upstream calls are counted at the fake upstream process. Every test uses its own prompt,
so the gateway (shared by the module) never answers one test from another's entry.
"""

from __future__ import annotations

import contextlib
import textwrap
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, gateway_process
from tests.conftest import UPSTREAM_KEYS
from tests.services import redis_url

pytestmark = pytest.mark.e2e


def _recipe(a: FakeUpstreamHandle, cache_url: str = "memory://") -> str:
    return textwrap.dedent(
        f"""\
        providers:
          provider-a: {{base_url: "{a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"], timeout_s: 10, ttft_timeout_s: 5}}
        models:
          chat:  {{targets: [{{provider: provider-a, model: gpt-4o-mini}}]}}
          fresh: {{targets: [{{provider: provider-a, model: gpt-4o-mini}}]}}
        stores: {{cache: "{cache_url}"}}
        cache: {{enabled: true, ttl_s: 300, wait_s: 10, models: {{fresh: {{enabled: false}}}}}}
        """
    )


@contextlib.contextmanager
def _serve(recipe: Path) -> Iterator[str]:
    with gateway_process(recipe, name="cache-gateway") as gw:
        yield gw.base_url


@pytest.fixture(scope="module")
def cache_gateway(_upstream_a: FakeUpstreamHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    recipe = tmp_path_factory.mktemp("cache") / "recipe.yaml"
    recipe.write_text(_recipe(_upstream_a))
    with _serve(recipe) as url:
        yield url


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="sk-client", max_retries=0, timeout=20)


def calls(upstream: FakeUpstreamHandle) -> int:
    return int(upstream.stats()["requests"].get("/v1/chat/completions", 0))


def prompt() -> list[dict[str, str]]:
    return [{"role": "user", "content": "q-" + uuid.uuid4().hex[:8]}]


class TestCacheE2E:
    def test_hit_costs_no_upstream_call(self, cache_gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        """The second identical call is a HIT with the same answer, and the upstream is called once."""
        with sdk(cache_gateway) as client:
            messages = prompt()
            first = client.chat.completions.with_raw_response.create(model="chat", messages=messages, temperature=0)
            second = client.chat.completions.with_raw_response.create(model="chat", messages=messages, temperature=0)
        assert (first.headers["x-asgi-llm-cache"], second.headers["x-asgi-llm-cache"]) == ("MISS", "HIT")
        assert first.headers["x-asgi-llm-cache-key"] == second.headers["x-asgi-llm-cache-key"]
        assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
        assert second.parse().usage.completion_tokens == first.parse().usage.completion_tokens
        assert calls(upstream_a) == 1

    def test_stream_replay_and_cross_form(self, cache_gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        """A streamed miss is replayed as a stream with the same text, and serves a non-streamed call."""
        with sdk(cache_gateway) as client:
            messages = prompt()

            def streamed() -> str:
                chunks = list(client.chat.completions.create(model="chat", messages=messages, temperature=0, stream=True,
                                                             stream_options={"include_usage": True}))
                assert chunks[-1].usage is not None and not chunks[-1].choices
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

            original, replayed = streamed(), streamed()
            plain = client.chat.completions.create(model="chat", messages=messages, temperature=0)
        assert replayed == original == plain.choices[0].message.content
        assert original.startswith("Hello from provider-a.")
        assert calls(upstream_a) == 1

    def test_policy_and_controls(self, cache_gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        """A model with the cache off, a sampled request and Cache-Control: no-cache all reach the upstream."""
        with sdk(cache_gateway) as client:
            messages = prompt()
            for _ in range(2):
                raw = client.chat.completions.with_raw_response.create(model="fresh", messages=messages, temperature=0)
                assert raw.headers["x-asgi-llm-cache"] == "BYPASS"
                raw = client.chat.completions.with_raw_response.create(model="chat", messages=messages, temperature=0.8)
                assert raw.headers["x-asgi-llm-cache"] == "BYPASS"
            client.chat.completions.create(model="chat", messages=messages, temperature=0)
            raw = client.chat.completions.with_raw_response.create(
                model="chat", messages=messages, temperature=0, extra_headers={"Cache-Control": "no-cache"})
            assert raw.headers["x-asgi-llm-cache"] == "MISS"
            raw = client.chat.completions.with_raw_response.create(
                model="chat", messages=messages, temperature=0, extra_body={"cache": {"no-cache": True}})
            assert raw.headers["x-asgi-llm-cache"] == "MISS"
        assert calls(upstream_a) == 7
        assert "cache" not in upstream_a.stats()["recent"][-1]["body"]

    def test_single_flight(self, cache_gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        """Eight concurrent identical calls make one upstream call; every caller gets the answer."""
        upstream_a.add_faults({"kind": "slow_first_token", "delay_s": 0.5})
        messages = prompt()
        with sdk(cache_gateway) as client, ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(
                lambda _: client.chat.completions.with_raw_response.create(model="chat", messages=messages, temperature=0),
                range(8)))
        assert calls(upstream_a) == 1
        assert sorted(r.headers["x-asgi-llm-cache"] for r in replies) == ["HIT"] * 7 + ["MISS"]
        assert len({r.parse().choices[0].message.content for r in replies}) == 1

    def test_cut_stream_is_not_cached(self, cache_gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        """A cut stream raises in the SDK and is not stored: the next call goes upstream and completes."""
        upstream_a.add_faults({"kind": "cut", "after_chunks": 2})
        messages = prompt()
        with sdk(cache_gateway) as client:
            with pytest.raises(openai.APIError):
                list(client.chat.completions.create(model="chat", messages=messages, temperature=0, stream=True))
            raw = client.chat.completions.with_raw_response.create(model="chat", messages=messages, temperature=0)
        assert raw.headers["x-asgi-llm-cache"] == "MISS"
        assert raw.parse().choices[0].finish_reason == "stop"
        assert calls(upstream_a) == 2


class TestRedisReplicas:
    def test_replicas_share_the_cache(self, upstream_a: FakeUpstreamHandle, tmp_path: Path) -> None:
        """Two gateway processes on one Redis: a miss on one is a hit on the other."""
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(_recipe(upstream_a, cache_url=redis_url(13)))
        with _serve(recipe) as url1, _serve(recipe) as url2:
            messages = prompt()
            with sdk(url1) as c1, sdk(url2) as c2:
                first = c1.chat.completions.with_raw_response.create(model="chat", messages=messages, temperature=0)
                second = c2.chat.completions.with_raw_response.create(model="chat", messages=messages, temperature=0)
        assert (first.headers["x-asgi-llm-cache"], second.headers["x-asgi-llm-cache"]) == ("MISS", "HIT")
        assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
        assert calls(upstream_a) == 1
