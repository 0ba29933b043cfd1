"""Point-and-enroll in the router: names online nodes advertise become routable for the
orgs that may use those nodes, never shadowing a recipe model, and only when enabled."""

from __future__ import annotations

import json

import pytest

from asgi_llm.context import Principal, RequestContext
from asgi_llm.errors import ModelNotFoundError
from asgi_llm.routing.router import ModelRoute, NodeTargets, Router, Target


def ctx_for(model: str, org: str) -> RequestContext:
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return RequestContext(request_id="r", endpoint="chat", payload=payload, body=json.dumps(payload).encode(),
                          model=model, principal=Principal("k", org))


def make_router() -> tuple[Router, list[tuple[NodeTargets, str]]]:
    seen: list[tuple[NodeTargets, str]] = []
    router = Router([ModelRoute("chat", (Target("provider-a", "gpt"),))])

    def resolve(spec: NodeTargets, ctx: RequestContext) -> list[Target]:
        seen.append((spec, ctx.principal.org))
        return [Target(f"node:box@{ctx.principal.org}", spec.model)]

    router.node_resolver = resolve
    router.auto_models = lambda org: {"m-new", "chat"} if org in (None, "team-a") else set()
    return router, seen


class TestAutoModels:
    def test_advertised_name_is_routable_for_the_nodes_org(self) -> None:
        router, seen = make_router()
        plan = router.plan(ctx_for("m-new", "team-a"))
        assert [(t.provider, t.model) for t in plan] == [("node:box@team-a", "m-new")]
        assert seen[0][0] == NodeTargets("any", model="m-new")
        assert router.auto_model_names("team-a") == ["m-new"]  # "chat" is the recipe's

    def test_another_org_gets_404(self) -> None:
        router, _ = make_router()
        with pytest.raises(ModelNotFoundError):
            router.plan(ctx_for("m-new", "team-b"))
        assert router.auto_model_names("team-b") == []

    def test_recipe_name_is_never_auto_routed(self) -> None:
        router, seen = make_router()
        plan = router.plan(ctx_for("chat", "team-a"))
        assert [t.provider for t in plan] == ["provider-a"] and seen == []

    def test_off_without_the_hook(self) -> None:
        router, _ = make_router()
        router.auto_models = None  # nodes.auto_models: false
        with pytest.raises(ModelNotFoundError):
            router.plan(ctx_for("m-new", "team-a"))
        assert router.get("m-new") is None and router.auto_model_names("team-a") == []

    def test_get_sees_it_so_quota_and_cache_apply(self) -> None:
        router, _ = make_router()
        route = router.get("m-new")
        assert route is not None and route is router.get("m-new")  # one stable object per name


@pytest.mark.parametrize("auto", [True, False])
def test_recipe_switch(tmp_path: object, auto: bool) -> None:
    """``nodes.auto_models`` decides whether the registry feeds the router."""
    from pathlib import Path

    import yaml

    from asgi_llm.config import load_config
    from asgi_llm.stack import build_gateway

    path = Path(str(tmp_path)) / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "providers": {"a": {"base_url": "http://127.0.0.1:1/v1"}},
        "models": {"chat": {"targets": [{"provider": "a", "model": "m"}]}},
        "auth": {"admin_keys": ["sk-admin-auto-models-0123456789"]},
        "stores": {"ledger": f"sqlite:///{Path(str(tmp_path)) / 'gw.db'}"},
        "nodes": {"auto_models": auto},
    }))
    gateway = build_gateway(load_config(str(path)))
    assert (gateway.router.auto_models is not None) is auto


def test_node_selector_has_a_route_name() -> None:
    """Cache keys and price lookups read ``.route`` of a model's targets: a node selector
    (recipe or auto-routed) answers with its own name instead of raising AttributeError."""
    assert NodeTargets("any", model="m-new").route == "nodes:any/m-new"
