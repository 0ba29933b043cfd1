"""AuthMiddleware and the key admin API, in process (asyncio and trio), against a real fake upstream."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from asgi_llm.admin.keys import key_routes
from asgi_llm.auth import KeyRing, MemoryKeyStore
from asgi_llm.config import AuthConfig, StaticKey
from asgi_llm.middleware.auth import AuthMiddleware
from asgi_llm.providers.base import Timeouts
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.routing.router import ModelRoute, Router, Target
from asgi_llm.stack import Gateway, compose, gateway_lifespan
from asgi_llm.stores import StoreError
from asgi_llm.testing.processes import FakeUpstreamHandle
from tests.conftest import UPSTREAM_KEYS
from tests.harness import Recorded, call

pytestmark = pytest.mark.anyio

ADMIN = "adm-super-secret-0001"
TEAM_A = "sk-team-a-static-0001"
NODE = "sk-node-static-00001"
MESSAGES = [{"role": "user", "content": "hi"}]
SECRETS = (ADMIN, TEAM_A, NODE)


def bearer(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key}".encode())]


def assert_error(rec: Recorded, status: int, code: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error that names no secret."""
    assert rec.status == status, rec.body
    err = rec.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    assert rec.headers["x-request-id"]
    for secret in SECRETS:
        assert secret not in rec.body.decode()
    return err  # type: ignore[no-any-return]


def make_gateway(upstream: FakeUpstreamHandle, ring: KeyRing) -> Gateway:
    adapter = OpenAIAdapter("provider-a", base_url=upstream.base_url, api_keys=[UPSTREAM_KEYS["provider-a"]],
                            timeouts=Timeouts(attempt=3, ttft=1, idle=1))
    router = Router([ModelRoute("chat", (Target("provider-a", "gpt-4o-mini"),)),
                     ModelRoute("secret", (Target("provider-a", "gpt-4o-mini"),))])
    return compose(
        providers={"provider-a": adapter}, router=router, resources=[ring],
        layers={"auth": lambda app: AuthMiddleware(app, keys=ring)},
        admin_routes=key_routes(ring, model_names=router.model_names()),
    )


@pytest.fixture
def ring() -> KeyRing:
    cfg = AuthConfig(admin_keys=[ADMIN], keys=[
        StaticKey(key=TEAM_A, org="team-a", name="team-a-key", models=["chat"]),
        StaticKey(key=NODE, org="team-a", name="node-key", scopes=["node"]),
    ])
    return KeyRing.from_config(cfg, store=MemoryKeyStore(), environ={})


@pytest.fixture
async def gateway(upstream_a: FakeUpstreamHandle, ring: KeyRing) -> AsyncIterator[Gateway]:
    gw = make_gateway(upstream_a, ring)
    async with gateway_lifespan(gw):
        yield gw


async def chat(gw: Gateway, headers: list[tuple[bytes, bytes]], model: str = "chat") -> Recorded:
    return await call(gw, body={"model": model, "messages": MESSAGES}, headers=headers)


class TestAuthentication:
    async def test_missing_key_is_401(self, gateway: Gateway, upstream_a: FakeUpstreamHandle) -> None:
        """No key → 401 missing_api_key, the upstream never called."""
        err = assert_error(await chat(gateway, []), 401, "missing_api_key")
        assert err["type"] == "authentication_error" and "Authorization" in err["message"]
        assert upstream_a.stats()["requests"] == {}

    @pytest.mark.parametrize("header", [b"Basic dXNlcjpwYXNz", b"Bearer", b"Bearer  ", b"Token abc", b"Bearer a b",
                                        "Bearer cl\u00e9".encode()])
    async def test_malformed_header_is_401(self, gateway: Gateway, header: bytes) -> None:
        """A non-Bearer, empty, spaced or non-ASCII Authorization header → 401."""
        assert_error(await chat(gateway, [(b"authorization", header)]), 401)

    async def test_unknown_key_is_401_without_echo(self, gateway: Gateway) -> None:
        """An unknown key → 401 invalid_api_key; the key is not in the body."""
        probe = "sk-llm-" + "Z" * 43
        rec = await chat(gateway, bearer(probe))
        assert_error(rec, 401, "invalid_api_key")
        assert probe not in rec.body.decode()

    async def test_expired_and_revoked_keys_are_401(self, gateway: Gateway, ring: KeyRing) -> None:
        """A stored key past expires_at, or revoked, → 401 with its own code."""
        expired, _ = await ring.create_key(org="team-a", expires_at=1.0)
        assert_error(await chat(gateway, bearer(expired)), 401, "api_key_expired")
        revoked, rec = await ring.create_key(org="team-a")
        assert (await chat(gateway, bearer(revoked))).status == 200
        await ring.revoke_key(rec.id)
        assert_error(await chat(gateway, bearer(revoked)), 401, "api_key_revoked")

    async def test_bearer_and_x_api_key(self, gateway: Gateway) -> None:
        """Both Authorization: Bearer and x-api-key authenticate."""
        assert (await chat(gateway, bearer(TEAM_A))).status == 200
        assert (await chat(gateway, [(b"x-api-key", TEAM_A.encode())])).status == 200

    async def test_health_is_open(self, gateway: Gateway) -> None:
        """/healthz and /readyz need no key."""
        assert (await call(gateway, method="GET", path="/healthz")).status == 200
        assert (await call(gateway, method="GET", path="/readyz")).status == 200

    async def test_key_store_outage_is_503_not_500(self, upstream_a: FakeUpstreamHandle) -> None:
        """When the key store is down, stored keys get a 503 while recipe keys keep working."""

        class DownStore(MemoryKeyStore):
            async def get_by_hash(self, key_hash: str) -> Any:
                raise StoreError("SQL store failed during API key lookup: connection refused")

        ring = KeyRing.from_config(AuthConfig(keys=[StaticKey(key=TEAM_A, org="team-a")]), store=DownStore(), environ={})
        gw = make_gateway(upstream_a, ring)
        async with gateway_lifespan(gw):
            assert_error(await chat(gw, bearer("sk-llm-" + "q" * 43)), 503, "store_unavailable")
            assert (await chat(gw, bearer(TEAM_A))).status == 200


class TestAuthorization:
    async def test_model_outside_allow_list_looks_unconfigured(self, gateway: Gateway) -> None:
        """A configured model the key may not use is a 404 identical to a model that does not exist."""
        hidden = assert_error(await chat(gateway, bearer(TEAM_A), model="secret"), 404, "model_not_found")
        absent = assert_error(await chat(gateway, bearer(TEAM_A), model="nosuch"), 404, "model_not_found")
        assert hidden["message"].replace("secret", "X") == absent["message"].replace("nosuch", "X")
        assert hidden["param"] == absent["param"] == "model"

    async def test_models_list_shows_only_allowed(self, gateway: Gateway, ring: KeyRing) -> None:
        """GET /v1/models lists what the key may use; retrieving a hidden one is a 404."""
        rec = await call(gateway, method="GET", path="/v1/models", headers=bearer(TEAM_A))
        assert [m["id"] for m in rec.json()["data"]] == ["chat"]
        assert_error(await call(gateway, method="GET", path="/v1/models/secret", headers=bearer(TEAM_A)), 404)
        all_key, _ = await ring.create_key(org="team-b")
        rec = await call(gateway, method="GET", path="/v1/models", headers=bearer(all_key))
        assert [m["id"] for m in rec.json()["data"]] == ["chat", "secret"]
        assert_error(await call(gateway, method="GET", path="/v1/models"), 401)

    async def test_scopes_separate_inference_admin_and_node(self, gateway: Gateway) -> None:
        """Admin endpoints refuse inference keys; inference refuses admin and node keys; node routes refuse inference keys."""
        assert_error(await call(gateway, method="GET", path="/admin/keys", headers=bearer(TEAM_A)), 403, "permission_denied")
        assert_error(await call(gateway, method="GET", path="/admin/keys"), 401)
        assert_error(await chat(gateway, bearer(ADMIN)), 403)
        assert_error(await chat(gateway, bearer(NODE)), 403)
        assert_error(await call(gateway, method="POST", path="/nodes/heartbeat", headers=bearer(TEAM_A)), 403)
        # A token we do not know is left to the node routes' own checks (none registered here: 404).
        assert (await call(gateway, method="POST", path="/nodes/heartbeat", headers=bearer("enroll-token-xyz"))).status == 404
        assert (await call(gateway, method="POST", path="/nodes/heartbeat", headers=bearer(NODE))).status == 404


async def admin(gw: Gateway, key: str, method: str, path: str = "/admin/keys", body: Any = b"") -> Recorded:
    return await call(gw, method=method, path=path, body=body, headers=[*bearer(key), (b"content-type", b"application/json")])


class TestKeyAdminAPI:
    async def test_create_shows_the_key_once(self, gateway: Gateway) -> None:
        """POST returns the key once; GET lists prefixes only; the key works for inference."""
        rec = await admin(gateway, ADMIN, "POST", body={"org": "team-b", "name": "ci", "models": ["chat"],
                                                        "limits": {"rpm": 5}, "expires_in_s": 3600})
        assert rec.status == 201, rec.body
        created = rec.json()
        key = created["key"]
        assert key.startswith("sk-llm-") and created["prefix"] == key[:11] and created["org"] == "team-b"
        assert created["limits"] == {"rpm": 5} and created["expires_at"] > 0
        listing = (await admin(gateway, ADMIN, "GET")).json()["data"]
        assert key not in json.dumps(listing)
        assert {k["id"] for k in listing} >= {created["id"], "static:team-a-key", "admin:0"}
        assert (await chat(gateway, bearer(key))).status == 200

    async def test_org_admins_see_only_their_org(self, gateway: Gateway) -> None:
        """An org admin lists, reads and revokes only its org's keys; another org's key is a 404."""
        a_admin = (await admin(gateway, ADMIN, "POST", body={"org": "team-a", "scopes": ["admin"]})).json()["key"]
        b_key = (await admin(gateway, ADMIN, "POST", body={"org": "team-b"})).json()
        a_key = (await admin(gateway, a_admin, "POST", body={"name": "mine"})).json()
        assert a_key["org"] == "team-a"
        listing = (await admin(gateway, a_admin, "GET")).json()["data"]
        assert {k["org"] for k in listing} == {"team-a"} and b_key["id"] not in json.dumps(listing)
        assert_error(await admin(gateway, a_admin, "GET", f"/admin/keys/{b_key['id']}"), 404)
        assert_error(await admin(gateway, a_admin, "DELETE", f"/admin/keys/{b_key['id']}"), 404)
        assert_error(await admin(gateway, a_admin, "POST", body={"org": "team-b"}), 403)
        assert (await chat(gateway, bearer(b_key["key"]))).status == 200  # untouched
        assert (await admin(gateway, a_admin, "DELETE", f"/admin/keys/{a_key['id']}")).json()["revoked"] is True
        assert_error(await chat(gateway, bearer(a_key["key"])), 401, "api_key_revoked")

    async def test_super_admin_must_name_the_org(self, gateway: Gateway) -> None:
        """A recipe admin key creating a key must say for which org."""
        assert_error(await admin(gateway, ADMIN, "POST", body={"name": "x"}), 400)

    @pytest.mark.parametrize(
        "body",
        [{"org": "o", "models": ["gpt-17"]}, {"org": "o", "scopes": ["root"]}, {"org": "o", "limits": {"rpm": -1}},
         {"org": "o", "bogus": 1}, {"org": "*"}, b"{not json", {"org": "o", "model_limits": {"nope": {"rpm": 1}}}],
        ids=["unknown-model", "bad-scope", "bad-limit", "unknown-field", "star-org", "bad-json", "bad-model-limit"],
    )
    async def test_bad_create_bodies_are_400(self, gateway: Gateway, body: Any) -> None:
        """Unknown models or scopes, bad limits, unknown fields and malformed JSON are 400s."""
        assert_error(await admin(gateway, ADMIN, "POST", body=body), 400)

    async def test_recipe_keys_are_not_revocable_here(self, gateway: Gateway) -> None:
        """Revoking a recipe key through the API says to remove it from the recipe."""
        err = assert_error(await admin(gateway, ADMIN, "DELETE", "/admin/keys/static:team-a-key"), 400)
        assert "recipe" in err["message"]


class TestAuthenticateBeforeReading:
    """No byte of a body is received before the key is accepted."""

    @staticmethod
    async def call_counting(gw: Gateway, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[Recorded, list[str]]:
        """Like ``call``, recording every ``receive`` the app makes."""
        received: list[str] = []
        rec = Recorded()
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            received.append("http.request" if not sent else "http.disconnect")
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            rec.messages.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
                 "headers": [(b"host", b"t"), (b"content-length", str(len(body)).encode()), *headers],
                 "client": ("127.0.0.1", 1), "server": ("t", 80)}
        await gw(scope, receive, send)
        return rec, received

    @pytest.mark.parametrize("headers", [[], bearer("sk-unknown-0000000000"), bearer(NODE)])
    async def test_refused_keys_never_read_the_body(self, gateway: Gateway, headers: list[tuple[bytes, bytes]]) -> None:
        """Missing, unknown or wrong-scope key: 401/403 with the body unread, even invalid JSON."""
        rec, received = await self.call_counting(gateway, headers, b"[" * 10_000)
        assert rec.status in (401, 403)
        assert received == []

    async def test_accepted_key_reads_and_validates(self, gateway: Gateway) -> None:
        """A good key: the body is read once, and only then validated (400) or allow-listed (404)."""
        rec, received = await self.call_counting(gateway, bearer(TEAM_A), b'{"model":"chat","messages":[], "x": NaN}')
        assert_error(rec, 400, "invalid_json")
        assert received == ["http.request"]
        rec, _ = await self.call_counting(gateway, bearer(TEAM_A), json.dumps({"model": "secret", "messages": MESSAGES}).encode())
        assert_error(rec, 404, "model_not_found")

    async def test_standalone_auth_reads_after_the_key(self, upstream_a: FakeUpstreamHandle, ring: KeyRing) -> None:
        """AuthMiddleware without ContextMiddleware in front: same order, key first."""
        seen: dict[str, Any] = {}

        async def inner(scope: Any, receive: Any, send: Any) -> None:
            ctx = scope["asgi_llm"]
            seen["model"], seen["principal"] = ctx.model, ctx.principal.org
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        from asgi_llm.middleware.errors import ErrorMiddleware

        app = ErrorMiddleware(AuthMiddleware(inner, keys=ring))
        async with contextlib.AsyncExitStack() as stack:
            await ring.start(await stack.enter_async_context(anyio.create_task_group()))
            rec, received = await self.call_counting(app, [], b"[" * 10_000)
            assert rec.status == 401 and received == []
            rec, received = await self.call_counting(app, bearer(TEAM_A), json.dumps({"model": "chat", "messages": MESSAGES}).encode())
            assert rec.status == 204 and received == ["http.request"]
            assert seen == {"model": "chat", "principal": "team-a"}
            await ring.aclose()
