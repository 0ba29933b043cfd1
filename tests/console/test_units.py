"""The console in-process: sessions, CSRF, cookies, revocation, disabled page, assets."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml

from asgi_llm.config import ConfigError, load_config
from asgi_llm.console.session import SessionSigner
from asgi_llm.stack import Gateway, build_gateway

pytestmark = pytest.mark.anyio
ADMIN = "sk-admin-console-units-0123456789"


class TestSessionSigner:
    def test_round_trip_forgery_and_expiry(self) -> None:
        now = [1000.0]
        signer = SessionSigner(b"0123456789abcdef0123", ttl_s=60, clock=lambda: now[0])
        cookie, session = signer.issue("key_1", "team-a")
        assert signer.read(cookie) == session
        body, mac = cookie.split(".")
        assert signer.read(body + "." + mac[:-2] + "AA") is None
        assert signer.read("x" * 5000) is None and signer.read("") is None and signer.read("a.b.c") is None
        other = SessionSigner(b"another-secret-0123456789", ttl_s=60, clock=lambda: now[0])
        assert other.read(cookie) is None  # a replica with another secret refuses it
        assert signer.check_csrf(session, signer.csrf_token(session))
        assert not signer.check_csrf(session, None) and not signer.check_csrf(session, "nope")
        now[0] += 61
        assert signer.read(cookie) is None

    def test_short_secret_refused(self) -> None:
        with pytest.raises(ValueError):
            SessionSigner(b"short", ttl_s=60)


def recipe(tmp_path: Path, *, auth: bool = True, console: str = "{enabled: true}", admin_key: str = ADMIN) -> Any:
    data: dict[str, Any] = {
        "providers": {"a": {"base_url": "http://127.0.0.1:1/v1"}},
        "models": {"chat": {"targets": [{"provider": "a", "model": "m"}]},
                   "chat-2": {"targets": [{"provider": "a", "model": "m2"}]}},
        "stores": {"ledger": f"sqlite:///{tmp_path / 'gw.db'}"},
    }
    if auth:
        data["auth"] = {"admin_keys": [admin_key], "pepper": "console-units-pepper-0123456789"}
    data["console"] = yaml.safe_load(console)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(str(path))


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    gw = build_gateway(recipe(tmp_path))
    await gw.startup()
    try:
        yield gw
    finally:
        await gw.shutdown()


def client(gw: Gateway, **kw: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=gw), base_url="http://testserver", **kw)


async def sign_in(cl: httpx2.AsyncClient, key: str = ADMIN, **headers: str) -> str:
    r = await cl.post("/console/signin", data={"admin_key": key}, headers=headers)
    assert r.status_code == 303, r.text
    page = await cl.get("/console/keys")
    match = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert match is not None
    return match.group(1)


class TestConsoleApp:
    async def test_secure_cookie_behind_https_and_not_on_http(self, gateway: Gateway) -> None:
        async with client(gateway) as cl:
            r = await cl.post("/console/signin", data={"admin_key": ADMIN})
            assert "Secure" not in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
            r = await cl.post("/console/signin", data={"admin_key": ADMIN}, headers={"x-forwarded-proto": "https"})
            assert "; Secure" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]

    async def test_cross_site_sign_in_refused(self, gateway: Gateway) -> None:
        async with client(gateway) as cl:
            r = await cl.post("/console/signin", data={"admin_key": ADMIN}, headers={"origin": "http://evil.example"})
            assert r.status_code == 403 and "set-cookie" not in r.headers

    async def test_csrf_needed_for_every_change(self, gateway: Gateway) -> None:
        async with client(gateway) as cl:
            csrf = await sign_in(cl)
            for method in ("POST", "DELETE", "PUT", "PATCH"):
                r = await cl.request(method, "/console/api/admin/keys", json={"name": "x", "org": "o"})
                assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
            r = await cl.post("/console/api/admin/keys", json={"name": "x", "org": "o"}, headers={"x-csrf-token": csrf})
            assert r.status_code == 201 and r.json()["key"].startswith("sk-llm-")

    async def test_revoking_an_org_admin_key_ends_its_session(self, gateway: Gateway) -> None:
        async with client(gateway) as admin_cl, client(gateway) as org_cl:
            csrf = await sign_in(admin_cl)
            made = (await admin_cl.post("/console/api/admin/keys", json={"name": "oa", "org": "o", "scopes": ["admin"]},
                                        headers={"x-csrf-token": csrf})).json()
            await sign_in(org_cl, made["key"])
            assert (await org_cl.get("/console/api/admin/keys")).status_code == 200
            r = await admin_cl.delete(f"/console/api/admin/keys/{made['id']}", headers={"x-csrf-token": csrf})
            assert r.status_code == 200
            assert (await org_cl.get("/console/api/admin/keys")).status_code == 401
            assert (await org_cl.get("/console/overview")).status_code == 303

    async def test_only_admin_and_playground_paths_are_forwarded(self, gateway: Gateway) -> None:
        async with client(gateway) as cl:
            await sign_in(cl)
            assert (await cl.get("/console/api/nodes/heartbeat")).status_code == 404
            assert (await cl.get("/console/api/metrics")).status_code == 404
            r = await cl.get("/console/api/v1/models")  # a recipe admin must name the org
            assert r.status_code == 400 and r.json()["error"]["param"] == "org"
            assert {m["id"] for m in (await cl.get("/console/api/v1/models?org=team-a")).json()["data"]} == {"chat", "chat-2"}

    async def test_assets_are_confined_to_the_package(self, gateway: Gateway) -> None:
        async with client(gateway) as cl:
            assert (await cl.get("/console/static/console.js")).status_code == 200
            for bad in ("/console/static/../__init__.py", "/console/static/%2e%2e/session.py", "/console/static/nope.js"):
                r = await cl.get(bad)  # the client may normalise "..": then it is a page path (sign-in first)
                assert r.status_code in (303, 404) and "import" not in r.text
            page = await cl.get("/console/signin")
            assert "http://" not in page.text and "https://" not in page.text  # no CDN, no remote font


async def test_without_auth_the_console_says_how_to_enable_it(tmp_path: Path) -> None:
    gw = build_gateway(recipe(tmp_path, auth=False))
    await gw.startup()
    try:
        async with client(gw) as cl:
            r = await cl.get("/console")
            assert r.status_code == 200 and "admin_keys" in r.text
            assert (await cl.post("/console/signin", data={"admin_key": "x"})).status_code == 200
    finally:
        await gw.shutdown()


async def test_disabled_console_is_not_served(tmp_path: Path) -> None:
    gw = build_gateway(recipe(tmp_path, console="{enabled: false}"))
    await gw.startup()
    try:
        async with client(gw) as cl:
            assert (await cl.get("/console")).status_code == 404
    finally:
        await gw.shutdown()


def test_console_path_may_not_shadow_the_gateway(tmp_path: Path) -> None:
    for path in ("/admin", "/v1/ui", "/"):
        with pytest.raises(ConfigError):
            recipe(tmp_path, console=f"{{path: '{path}'}}")


async def test_sign_ins_land_in_the_audit_log(gateway: Gateway) -> None:
    async with client(gateway) as cl:
        assert (await cl.post("/console/signin", data={"admin_key": "sk-wrong-key"})).status_code == 401
        await sign_in(cl)
        assert (await cl.get("/console/api/admin/audit/verify")).json()["ok"]  # flushes the writer first
        r = await cl.get("/console/api/admin/audit?limit=100")
        events = [(e["action"], e["actor"], e["verdict"]) for e in r.json()["data"]]
        assert ("POST /console/signin", "anonymous", "denied") in events
        assert ("POST /console/signin", "admin:0", "allowed") in events
        assert "sk-wrong-key" not in r.text


async def test_a_session_ends_when_the_recipe_puts_another_key_at_its_position(tmp_path: Path) -> None:
    """Recipe key ids are positional (admin:0): a new key there is not the signed-in one.
    Both gateways share the SQL store, so the generated session secret too (as replicas do)."""
    gw = build_gateway(recipe(tmp_path))
    await gw.startup()
    try:
        async with client(gw) as cl:
            await sign_in(cl)
            cookie = cl.cookies.get("asgi_llm_console")
    finally:
        await gw.shutdown()
    for key, status in ((ADMIN, 200), ("sk-admin-rotated-key-0123456789", 401)):
        gw2 = build_gateway(recipe(tmp_path, admin_key=key))
        await gw2.startup()
        try:
            async with client(gw2) as cl:
                r = await cl.get("/console/api/admin/keys", headers={"cookie": f"asgi_llm_console={cookie}"})
                assert r.status_code == status, key
        finally:
            await gw2.shutdown()


async def test_mounted_in_a_host_app_under_a_prefix(gateway: Gateway) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    host = Starlette(routes=[Mount("/llm", app=gateway)])
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=host), base_url="http://testserver") as cl:
        page = await cl.get("/llm/console/signin")
        assert 'action="/llm/console/signin"' in page.text and "/llm/console/static/console.css" in page.text
        r = await cl.post("/llm/console/signin", data={"admin_key": ADMIN})
        assert r.status_code == 303 and r.headers["location"] == "/llm/console/overview"
        assert "Path=/llm/console;" in r.headers["set-cookie"]
        keys = await cl.get("/llm/console/api/admin/keys")
        assert keys.status_code == 200 and keys.json()["object"] == "list"


async def test_playground_runs_as_the_org_admins_org_and_model_list(gateway: Gateway) -> None:
    async with client(gateway) as admin_cl, client(gateway) as org_cl:
        csrf = await sign_in(admin_cl)
        made = (await admin_cl.post("/console/api/admin/keys", headers={"x-csrf-token": csrf}, json={
            "name": "oa", "org": "team-x", "scopes": ["admin"], "models": ["chat"]})).json()
        await sign_in(org_cl, made["key"])
        r = await org_cl.get("/console/api/v1/models?org=someone-else")  # the org parameter is ignored
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["chat"]
        assert (await admin_cl.get("/console/api/v1/models?org=team-x")).json()["data"][0]["id"] in ("chat", "chat-2")


async def test_repeated_wrong_keys_are_throttled(gateway: Gateway) -> None:
    async with client(gateway) as cl:
        statuses = [(await cl.post("/console/signin", data={"admin_key": f"sk-guess-{i}"})).status_code for i in range(11)]
        assert statuses == [401] * 10 + [429]
        r = await cl.post("/console/signin", data={"admin_key": ADMIN})  # even the right key waits
        assert r.status_code == 429 and 'role="alert"' in r.text and "wait" in r.text
