"""The web console driven in a real headless Chromium (Playwright + Debian's chromium)
against a real gateway process, fake upstreams and a real node agent process.

Elements are found by accessible role and name, as the contract names them. Every test
records the browser's requests (none may leave the gateway's origin) and its page and
console errors (there must be none).
"""

from __future__ import annotations

import csv
import json
import time
import io
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, fake_upstream, free_port, gateway_process, managed_process

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ADMIN = "sk-admin-console-0123456789"
TEAM_A, TEAM_B = "sk-team-a-console-key", "sk-team-b-console-key"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

if not os.environ.get("CI"):  # under CI a missing browser or package fails the run, never skips it
    pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():  # pragma: no cover - .ci/run installs it
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeUpstreamHandle, FakeUpstreamHandle]]:
    with fake_upstream("provider-a", models=["gpt-4o-mini"]) as a, fake_upstream("provider-b", models=["llama-3.1-8b"]) as b:
        yield a, b


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeUpstreamHandle]:
    """A node's chat engine serving a model no recipe names (auto-advertised)."""
    with fake_upstream("node-engine", models=["m-new"]) as h:
        yield h


@pytest.fixture(scope="module")
def gateway(upstreams: tuple[FakeUpstreamHandle, FakeUpstreamHandle], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    a, b = upstreams
    tmp = tmp_path_factory.mktemp("console-gw")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"""\
providers:
  provider-a: {{base_url: "{a.base_url}", timeout_s: 10}}
  provider-b: {{base_url: "{b.base_url}", timeout_s: 10}}
models:
  chat: {{targets: [{{provider: provider-a, model: gpt-4o-mini, price: {{input: 0.15, output: 0.60}}}}]}}
  chat-b: {{targets: [{{provider: provider-b, model: llama-3.1-8b, price: {{input: 0.05, output: 0.08}}}}]}}
auth:
  admin_keys: ["{ADMIN}"]
  pepper: "console-test-pepper-0123456789"
  keys:
    - {{key: "{TEAM_A}", org: team-a}}
    - {{key: "{TEAM_B}", org: team-b}}
stores: {{ledger: "sqlite:///{tmp / 'gw.db'}"}}
usage: {{flush_interval_s: 0.05}}
nodes: {{heartbeat_interval_s: 0.5, heartbeat_window_s: 3, allowed_networks: ["127.0.0.1/32"]}}
routing: {{health: {{probe_interval_s: 0}}}}
console: {{enabled: true, path: /console}}
cache: {{enabled: true}}
""")
    with gateway_process(recipe, name="console-gateway") as gw:
        yield gw.url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


class Watched:
    """A page with its requests and errors recorded."""

    def __init__(self, context: BrowserContext, origin: str) -> None:
        self.context = context
        self.page: Page = context.new_page()
        self.origin = origin
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("dialog", lambda d: d.accept())

    def check(self, *, allowed_errors: tuple[str, ...] = ()) -> None:
        foreign = [u for u in self.requests if not (u.startswith(self.origin + "/") or u.startswith("data:"))]
        assert foreign == [], f"requests left the gateway's origin: {foreign}"
        errors = [e for e in self.errors if not any(a in e for a in allowed_errors)]
        assert errors == [], errors


@pytest.fixture
def watched(browser: Browser, gateway: str) -> Iterator[Watched]:
    context = browser.new_context(accept_downloads=True)
    w = Watched(context, gateway)
    try:
        yield w
    finally:
        context.close()


@pytest.fixture
def sdk(gateway: str) -> Iterator[Callable[[str], openai.OpenAI]]:
    """Official SDK clients for the gateway, closed at teardown (no socket left to GC)."""
    clients: list[openai.OpenAI] = []

    def make(key: str) -> openai.OpenAI:
        clients.append(openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0, timeout=20))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


def admin(gateway: str, method: str, path: str, body: Any = None, key: str = ADMIN) -> httpx2.Response:
    with httpx2.Client(timeout=10, trust_env=False) as http:
        return http.request(method, gateway + path, json=body, headers={"authorization": f"Bearer {key}"})


def sign_in(w: Watched, gateway: str, key: str = ADMIN) -> Page:
    page = w.page
    page.goto(gateway + "/console")
    page.get_by_label("Admin key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    return page


def pick_org(page: Page, org: str) -> None:
    page.get_by_label("Viewing org").select_option(org)
    expect(page.get_by_label("Viewing org")).to_have_value(org)


class TestSignIn:
    def test_wrong_key_is_refused_with_an_alert(self, watched: Watched, gateway: str) -> None:
        page = watched.page
        page.goto(gateway + "/console")
        page.get_by_label("Admin key").fill("sk-not-a-key")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_contain_text("not accepted")
        assert not [c for c in watched.context.cookies() if c["name"] == "asgi_llm_console"]
        # An inference key is not an admin key.
        page.get_by_label("Admin key").fill(TEAM_A)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_contain_text("not an admin key")
        watched.check(allowed_errors=("401",))  # the browser logs the refused sign-in's status

    def test_every_page_renders_and_the_cookie_is_httponly(self, watched: Watched, gateway: str) -> None:
        page = sign_in(watched, gateway)
        cookie = next(c for c in watched.context.cookies() if c["name"] == "asgi_llm_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        for name in ("Overview", "Playground", "Keys", "Nodes", "Usage", "Routing", "Audit"):
            page.get_by_role("navigation").get_by_role("link", name=name, exact=True).click()
            expect(page.get_by_role("heading", name=name, level=1)).to_be_visible()
        response = page.request.get(gateway + "/console/overview")
        csp = response.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_label("Admin key")).to_be_visible()
        assert page.request.get(gateway + "/console/api/admin/keys").status == 401
        watched.check()

    def test_post_without_csrf_token_is_refused(self, watched: Watched, gateway: str) -> None:
        page = sign_in(watched, gateway)
        resp = page.request.post(gateway + "/console/api/admin/keys", data={"name": "no-csrf", "org": "team-a"})
        assert resp.status == 403
        assert resp.json()["error"]["code"] == "csrf_failed"
        names = [k["name"] for k in admin(gateway, "GET", "/admin/keys").json()["data"]]
        assert "no-csrf" not in names
        # A forged cookie is no session.
        resp = page.request.get(gateway + "/console/api/admin/keys",
                                headers={"cookie": "asgi_llm_console=e30.AAAA"})
        assert resp.status == 401
        watched.check()


class TestPlayground:
    def test_answer_streams_and_a_second_column_compares(self, watched: Watched, gateway: str) -> None:
        page = sign_in(watched, gateway)
        pick_org(page, "team-a")
        page.get_by_role("link", name="Playground", exact=True).click()
        page.get_by_label("Model", exact=True).select_option("chat")
        page.get_by_role("button", name="Add model").click()
        page.get_by_label("Model 2", exact=True).select_option("chat-b")
        page.get_by_label("Message").fill("Compare these routes please")
        page.get_by_role("button", name="Send").click()
        columns = page.locator(".column")
        expect(columns).to_have_count(2)
        for i, route in ((0, "provider-a"), (1, "provider-b")):
            col = columns.nth(i)
            expect(col.locator(".m-cost")).to_contain_text("$", timeout=15000)
            assert col.locator(".answer").inner_text().strip()
            assert "ms" in col.locator(".m-ttft").inner_text()
            assert "ms" in col.locator(".m-latency").inner_text()
            assert "in," in col.locator(".m-tokens").inner_text()
            assert route in col.locator(".m-route").inner_text()
            assert float(col.locator(".m-cost").inner_text().lstrip("$")) > 0
        for label in ("TTFT", "Latency", "Tokens", "Cost"):
            expect(columns.nth(0).get_by_text(label, exact=True)).to_be_visible()
        # Metered as the org: the ledger has the console's calls under team-a.
        admin(gateway, "POST", "/admin/usage/flush")
        rows = admin(gateway, "GET", "/admin/usage?group_by=org,key&since=1d&org=team-a").json()["data"]
        assert any(r["key"].startswith("console:") and r["requests"] >= 1 for r in rows), rows
        watched.check()


class TestKeys:
    def test_create_use_revoke(self, watched: Watched, gateway: str, sdk: Callable[[str], openai.OpenAI]) -> None:
        page = sign_in(watched, gateway)
        page.get_by_role("link", name="Keys", exact=True).click()
        page.get_by_role("button", name="Create key").click()
        page.get_by_label("Name").fill("browser-made")
        page.get_by_label("Org", exact=True).fill("team-a")
        page.get_by_role("button", name="Create", exact=True).click()
        secret_box = page.locator("#key-secret-value")
        expect(secret_box).to_contain_text("sk-llm-")
        secret = secret_box.inner_text().strip()
        client = sdk(secret)
        answer = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        row = page.get_by_role("row").filter(has_text="browser-made")
        row.get_by_role("button", name="Revoke").click()
        expect(row).to_contain_text("revoked")
        page.reload()  # the secret is shown once, never again
        assert secret not in page.content()
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
        # The revoke went through the admin API as the signed-in admin: it is in the audit log.
        events = admin(gateway, "GET", "/admin/audit?kind=admin&limit=1000").json()["data"]
        assert any(e["action"].startswith("DELETE /admin/keys/") and e["actor"] == "admin:0" for e in events)
        watched.check()


class TestNodes:
    def test_a_real_agent_enrolled_from_the_page_shows_online_without_reload(
            self, watched: Watched, gateway: str, sdk: Callable[[str], openai.OpenAI], engine: FakeUpstreamHandle,
            tmp_path: Path) -> None:
        page = sign_in(watched, gateway)
        page.get_by_role("link", name="Nodes", exact=True).click()
        page.get_by_label("Org", exact=True).fill("team-a")
        page.get_by_role("button", name="Add node").click()
        expect(page.locator("#node-token")).to_contain_text("ent-llm-")
        token = page.locator("#node-token").inner_text().strip()
        command = page.locator("#node-command").inner_text()
        assert command.startswith(f"asgi-llm node join --gateway {gateway} --token {token}")
        assert "asgi-llm node install-service" in page.locator("#node-unit").inner_text()
        port = free_port()
        args = [sys.executable, "-m", "asgi_llm.cli", "node", "join", "--gateway", gateway, "--token", token,
                "--engine", engine.base_url, "--name", "console-node", "--port", str(port),
                "--state-dir", str(tmp_path / "agent"), "--drain-timeout", "2"]
        with managed_process(args, ready_url=f"http://127.0.0.1:{port}/healthz", name="agent-console", timeout=30):
            row = page.get_by_role("row").filter(has_text="console-node")
            expect(row).to_contain_text("online", timeout=15000)
            expect(row).to_contain_text("m-new")
            # Point-and-enroll: the advertised model is routable for the node's org only.
            a = sdk(TEAM_A)
            b = sdk(TEAM_B)
            assert "m-new" in [m.id for m in a.models.list()]
            ok = a.chat.completions.create(model="m-new", messages=[{"role": "user", "content": "hi"}])
            assert ok.choices[0].message.content
            # Deterministic requests go through the cache, which names the model's targets.
            for expected in ("MISS", "HIT"):
                raw = a.chat.completions.with_raw_response.create(
                    model="m-new", temperature=0, messages=[{"role": "user", "content": "cache me"}])
                assert raw.headers["x-asgi-llm-cache"] == expected
            assert "m-new" not in [m.id for m in b.models.list()]
            with pytest.raises(openai.NotFoundError):
                b.chat.completions.create(model="m-new", messages=[{"role": "user", "content": "hi"}])
        watched.check()


class TestUsageAndAudit:
    def test_charts_tables_csv_and_verified_chain(self, watched: Watched, gateway: str, sdk: Callable[[str], openai.OpenAI]) -> None:
        c = sdk(TEAM_A)
        for model in ("chat", "chat-b"):  # the same prompt over two routes
            c.chat.completions.create(model=model, messages=[{"role": "user", "content": "usage please"}])
        admin(gateway, "POST", "/admin/usage/flush")
        page = sign_in(watched, gateway)
        page.get_by_role("link", name="Usage", exact=True).click()
        expect(page.locator("#chart-requests svg rect").first).to_be_attached()
        expect(page.locator("#usage-table tbody tr").first).to_contain_text("chat")
        expect(page.locator("#usage-compare tbody")).to_contain_text("provider-a")
        expect(page.locator("#usage-compare tbody")).to_contain_text("provider-b")
        page.get_by_label("Group by").select_option("route")
        expect(page.locator("#usage-table tbody")).to_contain_text("provider-a")
        with page.expect_download() as info:
            page.get_by_role("link", name="Download CSV").click()
        text = Path(info.value.path()).read_text()
        rows = list(csv.DictReader(io.StringIO(text)))
        assert rows and "route" in rows[0] and any(r["route"].startswith("provider-a") for r in rows)
        page.get_by_role("link", name="Audit", exact=True).click()
        expect(page.locator("#audit-table tbody tr").first).to_be_visible()
        page.get_by_role("button", name="Verify chain").click()
        expect(page.locator("#audit-result")).to_contain_text("intact")
        watched.check()


class TestOrgAdmin:
    def test_an_org_admin_sees_only_its_org(self, watched: Watched, gateway: str, sdk: Callable[[str], openai.OpenAI]) -> None:
        made = admin(gateway, "POST", "/admin/keys", {"org": "team-b", "name": "b-admin", "scopes": ["admin"]})
        assert made.status_code == 201, made.text
        admin(gateway, "POST", "/admin/keys", {"org": "team-a", "name": "a-secret-key"})
        b = sdk(TEAM_B)
        b.chat.completions.create(model="chat-b", messages=[{"role": "user", "content": "from b"}])
        a = sdk(TEAM_A)
        a.chat.completions.create(model="chat", messages=[{"role": "user", "content": "from a"}])
        admin(gateway, "POST", "/admin/usage/flush")
        page = sign_in(watched, gateway, made.json()["key"])
        assert page.get_by_label("Viewing org").count() == 0
        page.get_by_role("link", name="Keys", exact=True).click()
        expect(page.locator("#key-table tbody")).to_contain_text("b-admin")
        assert "a-secret-key" not in page.locator("#key-table tbody").inner_text()
        assert "team-a" not in page.locator("#key-table tbody").inner_text()
        assert page.get_by_label("Org", exact=True).count() == 0
        page.get_by_role("link", name="Nodes", exact=True).click()
        expect(page.locator("#node-table[data-loaded=true]")).to_be_attached()
        assert "team-a" not in page.locator("#node-table tbody").inner_text()
        page.get_by_role("link", name="Usage", exact=True).click()
        page.get_by_label("Group by").select_option("org")
        expect(page.locator("#usage-table tbody")).to_contain_text("team-b")
        assert "team-a" not in page.locator("#usage-table tbody").inner_text()
        page.get_by_role("link", name="Audit", exact=True).click()
        expect(page.locator("#audit-table tbody tr").first).to_be_visible()
        orgs = set(page.locator("#audit-table tbody tr td:nth-child(4)").all_inner_texts())
        assert orgs == {"team-b"}, orgs
        # The replayed API refuses another org outright, whatever the browser asks.
        resp = page.request.get(gateway + "/console/api/admin/keys?org=team-a")
        assert "team-a" not in resp.text()
        watched.check()


def node_rows(gateway: str) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in admin(gateway, "GET", "/admin/nodes").json()["data"]}


def new_token(gateway: str, org: str = "team-a") -> str:
    resp = admin(gateway, "POST", "/admin/enrollment-tokens", {"org": org})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["token"])


def agent_args(gateway: str, engine: str, state: Path, name: str, port: int, token: str | None) -> list[str]:
    args = [sys.executable, "-m", "asgi_llm.cli", "node", "join", "--gateway", gateway, "--engine", engine,
            "--name", name, "--port", str(port), "--state-dir", str(state), "--drain-timeout", "2"]
    return args + (["--token", token] if token else [])


class TestAgentIdentity:
    """Issue 15 item 5: a new token and name where another node is saved is a new node, two
    agents share one state directory, and shutdown leaves no unretrieved task exception."""

    def test_new_token_and_name_enroll_a_new_node_and_two_agents_run_side_by_side(
            self, gateway: str, engine: FakeUpstreamHandle, tmp_path: Path) -> None:
        import signal
        import subprocess

        state = tmp_path / "state"
        pa, pb = free_port(), free_port()
        with managed_process(agent_args(gateway, engine.base_url, state, "ident-a", pa, new_token(gateway)),
                             ready_url=f"http://127.0.0.1:{pa}/healthz", name="agent-ident-a", timeout=30) as a:
            a.proc.send_signal(signal.SIGTERM)
            assert a.proc.wait(20) == 0
            log_a = a.log_text()
        assert "never retrieved" not in log_a and "Traceback" not in log_a, log_a
        # Measured before: this second agent silently served as ident-a.
        with managed_process(agent_args(gateway, engine.base_url, state, "ident-b", pb, new_token(gateway)),
                             ready_url=f"http://127.0.0.1:{pb}/healthz", name="agent-ident-b", timeout=30):
            rows = node_rows(gateway)
            assert {"ident-a", "ident-b"} <= set(rows) and rows["ident-a"]["id"] != rows["ident-b"]["id"]
        assert json.loads((state / "node.json").read_text())["name"] == "ident-a"
        assert json.loads((state / "node-ident-b.json").read_text())["name"] == "ident-b"
        # Both restart from their own saved credentials (no token), side by side.
        with managed_process(agent_args(gateway, engine.base_url, state, "ident-a", pa, None),
                             ready_url=f"http://127.0.0.1:{pa}/healthz", name="agent-ident-a2", timeout=30), \
             managed_process(agent_args(gateway, engine.base_url, state, "ident-b", pb, None),
                             ready_url=f"http://127.0.0.1:{pb}/healthz", name="agent-ident-b2", timeout=30):
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                rows = node_rows(gateway)
                if rows["ident-a"]["status"] == rows["ident-b"]["status"] == "online":
                    break
                time.sleep(0.2)
            assert rows["ident-a"]["status"] == rows["ident-b"]["status"] == "online", rows
            assert len([n for n in node_rows(gateway) if n.startswith("ident-")]) == 2
        # A name with nothing saved and no token: refused, naming what is saved and the flag.
        out = subprocess.run(agent_args(gateway, engine.base_url, state, "ident-c", free_port(), None),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "node-ident-b.json" in out.stderr + out.stdout and "--name" in out.stderr + out.stdout
