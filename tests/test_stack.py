"""compose() and the layers it stacks: fixed order, ``exclude=``, the frame that cannot be
dropped, and lifespan / websocket scopes passing through every layer untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_llm.dispatch import DispatchApp
from asgi_llm.endpoints import GatewayEndpoints
from asgi_llm.middleware.context import ContextMiddleware, LoadBody
from asgi_llm.middleware.errors import ErrorMiddleware
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.recipe import build_gateway, config_from_dict
from asgi_llm.routing.router import ModelRoute, Router
from asgi_llm.stack import LAYERS, Gateway, compose
from asgi_llm.targets import Target
from asgi_llm.testing.transport import RecordingTransport

pytestmark = pytest.mark.anyio

ADMIN_KEY = "sk-admin-stack-test"
TEAM_KEY = "sk-team-stack-test"


class Marked:
    """A stand-in layer that only remembers its name and passes everything on."""

    def __init__(self, name: str, app: ASGIApp) -> None:
        self.name = name
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _parts() -> tuple[dict[str, OpenAIAdapter], Router]:
    adapter = OpenAIAdapter("a", base_url="https://a.example/v1", transport=RecordingTransport.answering(200, b"{}"))
    return {"a": adapter}, Router([ModelRoute("chat", (Target("a", "m"),))])


def _marked(names: list[str]) -> dict[str, Any]:
    return {name: (lambda app, name=name: Marked(name, app)) for name in names}


def _chain(gateway: Gateway) -> list[Any]:
    """The composed layers, outermost first, down to the endpoints."""
    out: list[Any] = []
    app: Any = gateway.app
    for _ in range(64):  # bounded: a stack is a dozen layers deep at most
        out.append(app)
        if isinstance(app, GatewayEndpoints):
            return out
        app = app.app
    raise AssertionError("no GatewayEndpoints within 64 layers")


def _names(chain: list[Any]) -> list[str]:
    names = []
    for layer in chain:
        if isinstance(layer, Marked):
            names.append(layer.name)
        else:
            names.append(type(layer).__name__)
    return names


SWAPPABLE = [name for name in LAYERS if name not in ("errors", "context")]


class TestCompose:
    def test_layers_are_stacked_in_the_fixed_order_whatever_the_mapping_order(self) -> None:
        """Factories given in reverse still end up outermost-first as in LAYERS, the body
        read (LoadBody) just inside auth, errors and context framing them."""
        providers, router = _parts()
        gw = compose(providers=providers, router=router, layers=_marked(list(reversed(SWAPPABLE))))
        names = _names(_chain(gw))
        expected = ["ErrorMiddleware", "ContextMiddleware"]
        for name in SWAPPABLE:
            expected.append(name)
            if name == "auth":
                expected.append("LoadBody")
        assert names == [*expected, "GatewayEndpoints"]
        assert isinstance(_chain(gw)[-1].inference, DispatchApp)

    def test_exclude_drops_layers_by_name(self) -> None:
        """``exclude=`` removes exactly the named layers and keeps the order of the rest."""
        providers, router = _parts()
        gw = compose(providers=providers, router=router, layers=_marked(SWAPPABLE), exclude={"cache", "quota"})
        names = _names(_chain(gw))
        assert "cache" not in names and "quota" not in names
        kept = [n for n in names if n in SWAPPABLE]
        assert kept == [n for n in SWAPPABLE if n not in ("cache", "quota")]

    def test_without_auth_the_body_is_not_held(self) -> None:
        """No auth layer: no LoadBody, and the context layer reads the body itself."""
        providers, router = _parts()
        gw = compose(providers=providers, router=router, layers=_marked(["usage"]))
        chain = _chain(gw)
        assert not any(isinstance(layer, LoadBody) for layer in chain)
        context = next(layer for layer in chain if isinstance(layer, ContextMiddleware))
        assert context.hold_body_for_auth is False

    @pytest.mark.parametrize("frame", ["errors", "context"])
    def test_errors_and_context_cannot_be_dropped_or_replaced(self, frame: str) -> None:
        """Excluding or replacing the frame is refused with a message that says why."""
        providers, router = _parts()
        with pytest.raises(ValueError, match="frame"):
            compose(providers=providers, router=router, exclude={frame})
        with pytest.raises(ValueError, match="frame"):
            compose(providers=providers, router=router, layers=_marked([frame]))

    def test_unknown_layer_names_are_refused(self) -> None:
        """A typo in a layer name is an error listing the real names, not a silent no-op."""
        providers, router = _parts()
        with pytest.raises(ValueError, match="unknown layer"):
            compose(providers=providers, router=router, exclude={"qouta"})
        with pytest.raises(ValueError, match="unknown layer"):
            compose(providers=providers, router=router, layers=_marked(["firewall"]))
        with pytest.raises(ValueError, match="unknown layer"):
            build_gateway(config_from_dict(_recipe(None), environ={}), exclude=["qouta"])


def _recipe(tmp_path: Path | None) -> dict[str, Any]:
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}" if tmp_path is not None else "sqlite:///unused.db"
    return {
        "providers": {"a": {"base_url": "https://a.example/v1", "api_keys": ["sk-upstream-a"]}},
        "models": {"chat": {"targets": [{"provider": "a", "model": "m", "price": {"input": 1, "output": 2}}]}},
        "stores": {"ledger": ledger},
        "auth": {"admin_keys": [ADMIN_KEY], "keys": [{"key": TEAM_KEY, "org": "team", "limits": {"rpm": 100}}]},
        "cache": {"enabled": True},
        "usage": {"enabled": True, "audit": True, "spill_dir": str(tmp_path / "spill") if tmp_path else None},
        "observability": {"metrics": True},
    }


class TestBuildGatewayExclude:
    def test_every_layer_is_built_and_exclude_removes_one(self, tmp_path: Path) -> None:
        """A recipe with everything on gets every layer, in order (the console in front of the
        stack); ``exclude=`` drops one."""
        full = _names(_chain(build_gateway(config_from_dict(_recipe(tmp_path), environ={}))))
        assert full == ["ConsoleApp", "ErrorMiddleware", "ContextMiddleware", "ObservabilityMiddleware", "AuditMiddleware",
                        "AuthMiddleware", "LoadBody", "QuotaMiddleware", "UsageMiddleware", "CacheMiddleware",
                        "FailoverMiddleware", "GatewayEndpoints"]
        without = _names(_chain(build_gateway(config_from_dict(_recipe(tmp_path), environ={}), exclude=["quota"])))
        assert without == [n for n in full if n != "QuotaMiddleware"]


class _Recorder:
    """The innermost app: keeps the scope, receive and send it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[Scope, Receive, Send]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls.append((scope, receive, send))


class TestNonHttpScopesPassThrough:
    @pytest.mark.parametrize("scope_type", ["lifespan", "websocket"])
    async def test_every_layer_passes_the_scope_on_untouched(self, tmp_path: Path, scope_type: str) -> None:
        """Each built layer hands a lifespan/websocket scope to the next app as is: the same
        scope object (nothing added), the same receive and send, no message sent."""
        gw = build_gateway(config_from_dict(_recipe(tmp_path), environ={}))
        layers = _chain(gw)[:-1]  # every layer above the endpoints
        assert len(layers) == 11  # the console in front, then the ten of compose()
        for layer in layers:
            inner, recorder = layer.app, _Recorder()
            layer.app = recorder
            try:
                scope: Scope = {"type": scope_type, "asgi": {"version": "3.0"}, "path": "/v1/chat/completions",
                                "headers": [(b"authorization", f"Bearer {TEAM_KEY}".encode())]}
                before = dict(scope)
                sent: list[Message] = []

                async def receive() -> Message:
                    raise AssertionError(f"{type(layer).__name__} read a message from a {scope_type} scope")

                async def send(message: Message) -> None:
                    sent.append(message)

                await layer(scope, receive, send)
            finally:
                layer.app = inner
            assert len(recorder.calls) == 1, type(layer).__name__
            got_scope, got_receive, got_send = recorder.calls[0]
            assert got_scope is scope and scope == before, type(layer).__name__
            assert got_receive is receive and got_send is send, type(layer).__name__
            assert sent == [], type(layer).__name__

    async def test_the_gateway_passes_websocket_to_its_handler_or_down_the_stack(self, tmp_path: Path) -> None:
        """Gateway hands websocket scopes to ``Gateway.websocket`` when it has one, and
        otherwise down the composed stack untouched."""
        gw = build_gateway(config_from_dict(_recipe(tmp_path), environ={}))
        assert gw.websocket is not None  # nodes are on with auth: the /nodes/tunnel handler
        gw.websocket = None
        handler, below = _Recorder(), _Recorder()
        endpoints = _chain(gw)[-1]
        last_layer = _chain(gw)[-2]
        last_layer.app = below
        try:
            scope: Scope = {"type": "websocket", "path": "/somewhere", "headers": []}

            async def receive() -> Message:
                raise AssertionError("nothing may read")

            async def send(message: Message) -> None:
                raise AssertionError(f"nothing may answer: {message}")

            await gw(scope, receive, send)
            assert [c[0] for c in below.calls] == [scope]
            gw.websocket = handler
            await gw(scope, receive, send)
            assert [c[0] for c in handler.calls] == [scope] and len(below.calls) == 1
        finally:
            last_layer.app = endpoints
