"""Breaker state shared across replicas through real Redis."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx2
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, gateway_process
from tests.conftest import UPSTREAM_KEYS
from tests.services import redis_url

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "shared"}]


@pytest.fixture
def two_replicas(upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle, tmp_path: Path) -> Iterator[list[str]]:
    url = redis_url(db=12)
    recipe = tmp_path / "replicas.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        providers:
          primary:  {{base_url: "{upstream_a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"]}}
          fallback: {{base_url: "{upstream_b.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-b']}"]}}
        models:
          chat: {{targets: [{{provider: primary, model: shared-primary}}, {{provider: fallback, model: shared-fallback}}]}}
        stores: {{state: "{url}"}}
        routing:
          retries_per_target: 0
          health: {{failure_threshold: 2, cooldown_s: 60, probe_interval_s: 0}}
        """))
    urls = []
    with ExitStack() as stack:
        for i in range(2):
            gw = stack.enter_context(gateway_process(recipe, name=f"replica-{i}"))
            urls.append(gw.base_url)
        yield urls


class TestSharedBreakers:
    def test_breaker_opened_on_one_replica_protects_the_other(self, two_replicas: list[str], upstream_a: FakeUpstreamHandle) -> None:
        """Replica 1 sees the primary fail and opens its breaker; replica 2 stops calling the primary too."""
        one, two = two_replicas
        upstream_a.add_faults({"kind": "status", "status": 503, "times": None, "match": {"model": "shared-primary"}})
        with httpx2.Client(timeout=10) as http:
            for _ in range(2):  # two failures on replica 1 open the breaker there
                r = http.post(one + "/chat/completions", json={"model": "chat", "messages": MESSAGES})
                assert r.status_code == 200 and r.headers["x-asgi-llm-route"] == "fallback/shared-fallback"
            primary_calls = upstream_a.stats()["by_model"].get("shared-primary", 0)
            assert primary_calls == 2
            # Replica 2 never saw a failure itself, but learned of the open breaker.
            for _ in range(50):
                r = http.post(two + "/chat/completions", json={"model": "chat", "messages": MESSAGES})
                assert r.status_code == 200
                if r.headers["x-asgi-llm-attempts"] == "1":
                    break
            else:
                pytest.fail("replica 2 kept trying the primary: breaker state was not shared")
            assert r.headers["x-asgi-llm-route"] == "fallback/shared-fallback"
            calls_after = upstream_a.stats()["by_model"].get("shared-primary", 0)
        assert calls_after - primary_calls <= 1  # at most one call raced the propagation
