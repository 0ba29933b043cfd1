"""``GET /openapi.json``: the document is well formed, lists exactly the routes a fully
configured gateway registers, its request schemas agree with what the gateway validates,
and a real gateway process serves it without a key."""

from __future__ import annotations

import copy
import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from asgi_llm import build_gateway, parse_config
from asgi_llm.endpoints import GatewayEndpoints
from asgi_llm.errors import InvalidRequestError
from asgi_llm.middleware.context import classify
from asgi_llm.openapi import PATHS, openapi_document
from asgi_llm.schemas import validate_payload
from asgi_llm.testing.processes import FakeUpstreamHandle, fake_upstream, gateway_process

ADMIN = "adm-openapi-0123456789abcdef"
DOC = json.loads(openapi_document())


def _recipe(tmp: Path, base_url: str) -> str:
    return textwrap.dedent(f"""\
        providers:
          up: {{base_url: "{base_url}", timeout_s: 10}}
        models:
          chat: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
          embed: {{targets: [{{provider: up, model: text-embedding-3-small}}]}}
        auth:
          admin_keys: ["{ADMIN}"]
          pepper: "openapi-pepper-0123456789abcdef"
        stores: {{ledger: "sqlite:///{tmp / 'gw.db'}"}}
        cache: {{enabled: true}}
        nodes: {{allowed_networks: ["127.0.0.1/32"]}}
        routing: {{health: {{probe_interval_s: 0}}}}
        """)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


class TestDocument:
    def test_shape(self) -> None:
        assert DOC["openapi"].startswith("3.1")
        assert DOC["info"]["title"] and DOC["info"]["version"]
        assert set(DOC["paths"]) == set(PATHS)
        assert all(p.startswith(("/v1/", "/admin/")) for p in DOC["paths"])

    def test_every_ref_resolves(self) -> None:
        schemas = DOC["components"]["schemas"]
        refs = set(_refs(DOC))
        assert refs
        for ref in refs:
            assert ref.startswith("#/components/schemas/"), ref
            assert ref.removeprefix("#/components/schemas/") in schemas, ref

    def test_path_parameters_are_declared(self) -> None:
        for path, ops in DOC["paths"].items():
            names = set(re.findall(r"\{(\w+)\}", path))
            for method, op in ops.items():
                declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
                assert declared == names, (path, method)
                assert "4XX" in op["responses"] and op["summary"], (path, method)

    def test_request_models_come_from_the_validators(self) -> None:
        chat = DOC["components"]["schemas"]["ChatCompletionRequest"]
        assert set(chat["required"]) == {"model", "messages"}
        assert DOC["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"] \
            == {"$ref": "#/components/schemas/ChatCompletionRequest"}


class TestAgainstTheGateway:
    def test_admin_paths_are_exactly_the_registered_routes(self, tmp_path: Path) -> None:
        gw = build_gateway(parse_config(_recipe(tmp_path, "http://127.0.0.1:9/v1"), environ={}))
        app: Any = gw.app
        for _ in range(50):
            if isinstance(app, GatewayEndpoints):
                break
            app = app.app
        assert isinstance(app, GatewayEndpoints)
        registered = {(r.path, m.lower()) for r in app.admin.admin.routes for m in r.methods if m != "HEAD"}
        documented = {(p, m) for p, ops in PATHS.items() if p.startswith("/admin/") for m in ops}
        assert documented == registered

    def test_v1_paths_are_the_classified_endpoints(self) -> None:
        for path, ops in PATHS.items():
            if path.startswith("/v1/"):
                endpoint, method = classify(path.replace("{model}", "chat"))
                assert endpoint != "other" and method is not None and ops.keys() == {method.lower()}, path

    @pytest.mark.parametrize("endpoint", ["chat", "completions", "embeddings"])
    def test_required_fields_are_what_the_gateway_requires(self, endpoint: str) -> None:
        name = {"chat": "ChatCompletionRequest", "completions": "CompletionRequest",
                "embeddings": "EmbeddingRequest"}[endpoint]
        schema = DOC["components"]["schemas"][name]
        valid = {"chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                 "completions": {"model": "m", "prompt": "hi"},
                 "embeddings": {"model": "m", "input": "hi"}}[endpoint]
        validate_payload(endpoint, valid)
        assert set(schema["required"]) == set(valid)
        for field in schema["required"]:
            body = copy.deepcopy(valid)
            del body[field]
            with pytest.raises(InvalidRequestError) as exc:
                validate_payload(endpoint, body)
            assert exc.value.param == field
        # Unknown fields pass through (the document must not forbid them).
        assert schema.get("additionalProperties", True) is not False
        validate_payload(endpoint, {**valid, "some_new_openai_field": 1})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("openapi")
    with fake_upstream("openapi-up", models=["gpt-4o-mini", "text-embedding-3-small"]) as up:
        recipe = tmp / "recipe.yaml"
        recipe.write_text(_recipe(tmp, up.base_url))
        with gateway_process(recipe, name="gateway-openapi") as gw:
            yield gw.url


@pytest.mark.e2e
class TestServed:
    def test_served_without_a_key(self, served: str) -> None:
        with httpx2.Client(timeout=10, trust_env=False) as http:
            resp = http.get(served + "/openapi.json")
            head = http.head(served + "/openapi.json")
            post = http.post(served + "/openapi.json", content=b"{}")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
        assert resp.json() == DOC
        assert head.status_code == 200
        assert post.status_code == 404 and post.json()["error"]["message"]

    def test_every_documented_operation_is_routed(self, served: str) -> None:
        """With the admin key, no documented (path, method) is a 404 "no such endpoint" or a 405."""
        fills = {"node_id": "node_missing", "key_id": "key_missing", "model": "chat", "action": "cordon"}
        with httpx2.Client(timeout=10, trust_env=False, headers={"authorization": f"Bearer {ADMIN}"}) as http:
            for path, ops in PATHS.items():
                url = re.sub(r"\{(\w+)\}", lambda m: fills[m.group(1)], path)
                for method in ops:
                    resp = http.request(method.upper(), served + url, content=b"{}" if method != "get" else None)
                    assert resp.status_code != 405, (method, path, resp.text)
                    assert resp.status_code < 500, (method, path, resp.text)
                    if resp.status_code == 404:
                        assert "No such endpoint" not in resp.text, (method, path, resp.text)

    def test_documented_query_bounds_are_the_gateways(self, served: str) -> None:
        """Every documented enum and integer bound holds: inside is accepted, outside is a 400 naming it."""
        checked = 0
        with httpx2.Client(timeout=10, trust_env=False, headers={"authorization": f"Bearer {ADMIN}"}) as http:
            for path, ops in PATHS.items():
                for method, op in ops.items():
                    if "{" in path or method != "get":
                        continue
                    for p in op.get("parameters", []):
                        schema = p["schema"]
                        if "enum" in schema:
                            inside, outside = [str(schema["enum"][0])], ["not-one-of-them"]
                        elif schema.get("type") == "integer":
                            inside = [str(schema["minimum"])]
                            outside = [str(schema["minimum"] - 1), str(schema.get("maximum", 2**63 - 1) + 1)]
                        else:
                            continue
                        for value in inside:
                            resp = http.get(served + path, params={p["name"]: value})
                            assert resp.status_code == 200, (path, p["name"], value, resp.text)
                        for value in outside:
                            resp = http.get(served + path, params={p["name"]: value})
                            assert resp.status_code == 400, (path, p["name"], value, resp.text)
                            assert resp.json()["error"]["param"] in (p["name"], None), resp.text
                        checked += 1
        assert checked >= 10
