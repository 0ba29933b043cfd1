"""A planned node target without an adapter (a node gone, or refused by the network
policy, between planning and dispatch) is skipped: the plan's next target serves.

Before: the dispatcher raised a 503 "No adapter is configured for provider 'node:…'"
that failover did not handle, so the rest of the plan was never tried.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from asgi_llm.middleware.failover import FailoverMiddleware
from asgi_llm.nodes.registry import NodeTarget
from asgi_llm.nodes.selector import NodeSelector
from asgi_llm.providers.base import Timeouts
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.routing.router import ModelRoute, Router, Target
from asgi_llm.stack import Gateway, compose, gateway_lifespan
from asgi_llm.testing.processes import FakeUpstreamHandle
from tests.conftest import UPSTREAM_KEYS
from tests.harness import call

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "hi"}]


def _gone_node(spec: NodeSelector, ctx: object) -> list[Target]:
    return [NodeTarget(provider="node:gone@team-a", model=spec.model, kind="node", node="node_gone")]


@pytest.fixture
async def gateway(upstream_a: FakeUpstreamHandle) -> AsyncIterator[Gateway]:
    adapter = OpenAIAdapter("provider-a", base_url=upstream_a.base_url, api_keys=[UPSTREAM_KEYS["provider-a"]],
                            timeouts=Timeouts(attempt=3, ttft=1, idle=1))
    router = Router([
        ModelRoute("chat", (NodeSelector("any", "gpt-4o-mini"), Target("provider-a", "gpt-4o-mini"))),
        ModelRoute("node-only", (NodeSelector("any", "gpt-4o-mini"),)),
    ], node_resolver=_gone_node)
    gw = compose(providers={"provider-a": adapter}, router=router,
                 layers={"failover": lambda app: FailoverMiddleware(app, router=router)})
    async with gateway_lifespan(gw):
        yield gw


class TestAdapterlessNodeTarget:
    async def test_next_target_serves(self, gateway: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """Plan [gone node, provider-a]: provider-a answers, streamed or not."""
        for stream in (False, True):
            rec = await call(gateway, body={"model": "chat", "messages": MESSAGES, "stream": stream})
            assert rec.status == 200 and rec.complete
            assert rec.headers["x-asgi-llm-route"] == "provider-a/gpt-4o-mini"

    async def test_only_target_is_a_clean_503(self, gateway: Gateway) -> None:
        """With nothing else in the plan: a 503 in the API's error shape, not a 500."""
        rec = await call(gateway, body={"model": "node-only", "messages": MESSAGES})
        assert rec.status == 503
        err = rec.json()["error"]
        assert err["code"] == "target_unavailable" and "node:gone@team-a" in err["message"]
