"""What the gateway sends upstream besides the body, and what a client learns when an
upstream refuses it without a word.

* The request id travels under ``x-asgi-llm-request-id`` by default, under a header the
  recipe names (``providers.<name>.request_id_header``), or not at all (``none``):
  llama-cpp-python's server answers an empty 400 to an ``x-request-id`` that is not a UUID.
* An upstream 4xx with an empty body reaches the client with the status, the route and
  the shape of what was sent (real gateway process, fake upstream's ``empty`` fault).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from asgi_llm.config import ConfigError, config_from_dict
from asgi_llm.testing.processes import FakeUpstreamHandle, gateway_process
from tests.conftest import UPSTREAM_KEYS

pytestmark = pytest.mark.e2e

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def gateway(_upstream_a: FakeUpstreamHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One upstream behind three providers that differ only in request_id_header."""
    tmp = tmp_path_factory.mktemp("upstream-request")
    key = UPSTREAM_KEYS["provider-a"]
    recipe = tmp / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        providers:
          plain:  {{base_url: "{_upstream_a.base_url}", api_keys: ["{key}"]}}
          traced: {{base_url: "{_upstream_a.base_url}", api_keys: ["{key}"], request_id_header: X-Trace-Id}}
          quiet:  {{base_url: "{_upstream_a.base_url}", api_keys: ["{key}"], request_id_header: none}}
        models:
          plain:  {{targets: [{{provider: plain, model: gpt-4o-mini}}]}}
          traced: {{targets: [{{provider: traced, model: gpt-4o-mini}}]}}
          quiet:  {{targets: [{{provider: quiet, model: gpt-4o-mini}}]}}
        stores: {{ledger: "sqlite:///{tmp / 'ledger.db'}"}}
        routing: {{health: {{failure_threshold: 1000000, probe_interval_s: 0}}}}
        """))
    with gateway_process(recipe, name="gateway-upstream-request") as gw:
        yield gw.base_url


def _chat(gateway: str, model: str, **extra: object) -> httpx2.Response:
    with httpx2.Client(timeout=20, trust_env=False) as http:
        return http.post(gateway + "/chat/completions", json={"model": model, "messages": MESSAGES, **extra},
                         headers={"x-request-id": "trace-42"})


class TestRequestIdHeader:
    @pytest.mark.parametrize(("model", "header"), [("plain", "x-asgi-llm-request-id"), ("traced", "x-trace-id"),
                                                    ("quiet", None)])
    def test_request_id_travels_under_the_configured_header(self, gateway: str, upstream_a: FakeUpstreamHandle,
                                                            model: str, header: str | None) -> None:
        """Default x-asgi-llm-request-id; a recipe-named header; none at all. Never x-request-id."""
        r = _chat(gateway, model)
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "trace-42"  # the client still gets its id back
        sent = upstream_a.stats()["recent"][-1]["headers"]
        assert "x-request-id" not in sent
        if header is None:
            assert not any(v == "trace-42" for v in sent.values()), sent
        else:
            assert sent[header] == "trace-42"

    @pytest.mark.parametrize("value", ["authorization", "Content-Length", "x-asgi-llm-node-secret", "two words",
                                       "x" * 65])
    def test_a_header_the_gateway_owns_is_refused(self, value: str) -> None:
        """A request id may not overwrite credentials, framing or the node secret, nor be a non-header."""
        base = {"providers": {"a": {"base_url": "http://127.0.0.1:9/v1", "request_id_header": value}},
                "models": {"m": {"targets": [{"provider": "a", "model": "m"}]}}}
        with pytest.raises(ConfigError, match=r"providers\.a\.request_id_header"):
            config_from_dict(base, environ={})
        with pytest.raises(ConfigError, match=r"nodes\.request_id_header"):
            config_from_dict({**base, "providers": {"a": {"base_url": "http://127.0.0.1:9/v1"}},
                              "nodes": {"request_id_header": value}}, environ={})

    def test_nodes_get_the_configured_header(self, tmp_path: Path) -> None:
        """nodes.request_id_header reaches the adapters the node registry builds."""
        from asgi_llm.stack import build_gateway

        cfg = config_from_dict({
            "models": {"m": {"targets": [{"nodes": "any", "model": "m"}]}},
            "auth": {"admin_keys": ["sk-admin-0123456789"], "pepper": "pepper-0123456789abcdef"},
            "stores": {"ledger": f"sqlite:///{tmp_path / 'ledger.db'}"},
            "nodes": {"request_id_header": "X-Node-Trace"},
        }, environ={})
        assert build_gateway(cfg).services.nodes.registry.request_id_header == "x-node-trace"


class TestEmptyUpstreamError:
    def test_empty_400_names_status_route_and_what_was_sent(self, gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        """A bare 400 (no body) to a streamed, forced tool call in JSON mode: the client gets
        400 and a message naming the route, the path and the request's shape."""
        upstream_a.add_faults({"kind": "empty", "status": 400})
        r = _chat(gateway, "plain", stream=True, tools=[TOOL],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  response_format={"type": "json_object"})
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert message.startswith("plain/gpt-4o-mini answered HTTP 400 with an empty body to POST /v1/chat/completions ")
        assert ("(model 'gpt-4o-mini', stream, 1 message, tools: 1, tool_choice: a named function, "
                "response_format: json_object, request id in header x-asgi-llm-request-id)") in message
        assert "log" in message  # where to look for the reason
        assert "127.0.0.1" not in message and UPSTREAM_KEYS["provider-a"] not in message

    def test_an_upstream_reason_is_still_relayed_as_is(self, gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        """An error body with a message keeps that message (the shape is only for silent upstreams)."""
        upstream_a.add_faults({"kind": "status", "status": 400, "message": "tools are not supported"})
        r = _chat(gateway, "plain")
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "plain/gpt-4o-mini: tools are not supported"

    def test_empty_503_is_not_blamed_on_the_request(self, gateway: str, upstream_a: FakeUpstreamHandle) -> None:
        """A bare 503 is an outage, not a refused field: the message says what was sent but
        does not send the person looking for a rejected header."""
        upstream_a.add_faults({"kind": "empty", "status": 503, "times": None})  # retries too; cleared after the test
        r = _chat(gateway, "plain")
        assert r.status_code >= 500
        message = r.json()["error"]["message"]
        assert "answered HTTP 503 with an empty body to POST /v1/chat/completions (model 'gpt-4o-mini', 1 message" in message
        assert "field or header" not in message
