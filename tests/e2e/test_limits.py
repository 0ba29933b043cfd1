"""End to end: keys, scopes, allow-lists, rate limits and the keys CLI on a real gateway
process, with the official openai SDK. Secrets must never show up in logs or error bodies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import httpx2
import openai
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, ManagedProcess, gateway_process
from tests.conftest import UPSTREAM_KEYS

pytestmark = pytest.mark.e2e

ADMIN = "adm-limits-0123456789"
TEAM_A = "sk-team-a-0123456789"
TEAM_B = "sk-team-b-0123456789"
LIMITED = "sk-limited-0123456789"
RESET = "sk-reset-0123456789"
MESSAGES = [{"role": "user", "content": "hello"}]


@dataclass
class Served:
    url: str  # .../v1
    process: ManagedProcess

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=20)


@pytest.fixture(scope="module")
def served(_upstream_a: FakeUpstreamHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("limits")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        providers:
          provider-a: {{base_url: "{_upstream_a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"], timeout_s: 10}}
        models:
          chat:   {{targets: [{{provider: provider-a, model: gpt-4o-mini}}]}}
          b-only: {{targets: [{{provider: provider-a, model: gpt-4o-mini}}]}}
        stores: {{ledger: "sqlite:///{tmp / 'gw.db'}"}}
        auth:
          admin_keys: ["{ADMIN}"]
          keys:
            - {{key: "{TEAM_A}", org: team-a, name: team-a-key, models: [chat]}}
            - {{key: "{TEAM_B}", org: team-b, name: team-b-key, models: [b-only, chat]}}
            - {{key: "{LIMITED}", org: team-a, name: limited, limits: {{rpm: 2, tpm: 100000}}}}
            - {{key: "{RESET}", org: team-a, name: reset, limits: {{rpm: 3}}}}
        limits:
          org: {{rpm: 1000}}
        """))
    env = {"ASGI_LLM_PEPPER": "e2e-limits-pepper-0123456789"}
    with gateway_process(recipe, name="gateway-limits", env=env, log_level="info") as gw:
        yield Served(gw.base_url, gw.process)


def cli(served: Served, *args: str, admin_key: str = ADMIN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ASGI_LLM_GATEWAY": served.root, "ASGI_LLM_ADMIN_KEY": admin_key}
    return subprocess.run([sys.executable, "-m", "asgi_llm.cli", "keys", *args], capture_output=True, text=True, env=env, timeout=30)


class TestAuthWithTheSDK:
    def test_unknown_and_missing_keys(self, served: Served) -> None:
        """The SDK raises AuthenticationError for an unknown key; no key at all is a 401 too."""
        with served.client("sk-llm-" + "x" * 43) as c, pytest.raises(openai.AuthenticationError) as exc:
            c.chat.completions.create(model="chat", messages=MESSAGES)
        assert exc.value.code == "invalid_api_key"
        with httpx2.Client(timeout=10) as http:
            resp = http.post(served.url + "/chat/completions", json={"model": "chat", "messages": MESSAGES})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "missing_api_key"

    def test_allow_list_hides_other_models(self, served: Served) -> None:
        """team-a's key sees only chat; b-only is a 404 for it, exactly like a model that does not exist."""
        with served.client(TEAM_A) as a, served.client(TEAM_B) as b:
            assert [m.id for m in a.models.list()] == ["chat"]
            assert sorted(m.id for m in b.models.list()) == ["b-only", "chat"]
            with pytest.raises(openai.NotFoundError) as hidden:
                a.chat.completions.create(model="b-only", messages=MESSAGES)
            with pytest.raises(openai.NotFoundError) as absent:
                a.chat.completions.create(model="zzzzzz", messages=MESSAGES)
            assert hidden.value.message.replace("b-only", "M") == absent.value.message.replace("zzzzzz", "M")
            with pytest.raises(openai.NotFoundError):
                a.models.retrieve("b-only")

    def test_scopes(self, served: Served) -> None:
        """An inference key cannot use the admin API; the admin key cannot do inference."""
        with served.client(ADMIN) as c, pytest.raises(openai.PermissionDeniedError):
            c.chat.completions.create(model="chat", messages=MESSAGES)
        with httpx2.Client(timeout=10) as http:
            for path in ("/admin/keys", "/admin/usage"):
                resp = http.get(served.root + path, headers={"authorization": f"Bearer {TEAM_A}"})
                assert resp.status_code == 403, path


class TestRateLimit:
    def test_over_the_limit_is_429_with_headers(self, served: Served) -> None:
        """rpm=2: the third call is a 429 with Retry-After and x-ratelimit-* headers, as the SDK sees it."""
        with served.client(LIMITED) as c:
            first = c.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=10)
            assert first.headers["x-ratelimit-limit-requests"] == "2"
            assert first.headers["x-ratelimit-limit-tokens"] == "100000"
            c.chat.completions.create(model="chat", messages=MESSAGES)
            with pytest.raises(openai.RateLimitError) as exc:
                c.chat.completions.create(model="chat", messages=MESSAGES)
        headers = exc.value.response.headers
        assert int(headers["retry-after"]) >= 1
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert {"x-ratelimit-reset-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens"} <= set(headers)
        assert "limited" in exc.value.message and "requests per minute" in exc.value.message

    def test_reset_and_retry_after_agree_with_the_window(self, served: Served) -> None:
        """Issue 16 item 7: reset said "0s" after the first request and later more than 60 s;
        now it counts the request just made, stays within the minute while requests remain,
        and once exhausted says what the 429's Retry-After then says."""
        resets = []
        with served.client(RESET) as c:
            for _ in range(3):
                raw = c.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES, max_tokens=5)
                resets.append((raw.headers["x-ratelimit-remaining-requests"], raw.headers["x-ratelimit-reset-requests"]))
            with pytest.raises(openai.RateLimitError) as exc:
                c.chat.completions.create(model="chat", messages=MESSAGES)
        assert [r for r, _ in resets] == ["2", "1", "0"]
        for _, reset in resets[:2]:
            assert reset != "0s" and _seconds(reset) <= 60, resets
        headers = exc.value.response.headers
        assert abs(_seconds(headers["x-ratelimit-reset-requests"]) - int(headers["retry-after"])) <= 1  # whole seconds
        assert abs(_seconds(resets[2][1]) - int(headers["retry-after"])) < 2


def _seconds(reset: str) -> float:
    """OpenAI's reset format (``20ms``, ``1.5s``, ``6m0s``) in seconds."""
    if reset.endswith("ms"):
        return int(reset[:-2]) / 1000
    minutes, _, secs = reset.rstrip("s").rpartition("m")
    return int(minutes or 0) * 60 + float(secs)


class TestKeysCLI:
    def test_create_list_revoke(self, served: Served) -> None:
        """asgi-llm keys create prints the key once; list shows prefixes; revoke makes the key a 401."""
        made = cli(served, "create", "--org", "team-c", "--name", "cli-key", "--model", "chat", "--rpm", "5", "--json")
        assert made.returncode == 0, made.stderr
        created = json.loads(made.stdout)
        key = created["key"]
        with served.client(key) as c:
            assert c.chat.completions.create(model="chat", messages=MESSAGES).choices
        listing = cli(served, "list", "--org", "team-c")
        assert listing.returncode == 0 and created["id"] in listing.stdout and created["prefix"] in listing.stdout
        assert key not in listing.stdout
        revoked = cli(served, "revoke", created["id"])
        assert revoked.returncode == 0 and "Revoked" in revoked.stdout
        with served.client(key) as c, pytest.raises(openai.AuthenticationError) as exc:
            c.chat.completions.create(model="chat", messages=MESSAGES)
        assert exc.value.code == "api_key_revoked"

    def test_plain_create_prints_only_the_key_on_stdout(self, served: Served) -> None:
        """Without --json, stdout is the key alone (scriptable); the explanation goes to stderr."""
        made = cli(served, "create", "--org", "team-c")
        assert made.returncode == 0 and made.stdout.strip().startswith("sk-llm-") and "shown this once" in made.stderr

    def test_cli_errors_are_readable(self, served: Served) -> None:
        """A wrong admin key or an inference key: non-zero exit and the gateway's message, no traceback."""
        bad = cli(served, "list", admin_key=TEAM_A)
        assert bad.returncode == 1 and "403" in bad.stderr and "Traceback" not in bad.stderr


class TestOrgIsolation:
    def test_org_admin_cannot_reach_another_orgs_keys(self, served: Served) -> None:
        """An org admin of team-a never sees, reads or revokes team-b's keys."""
        a_admin = json.loads(cli(served, "create", "--org", "team-a", "--scope", "admin", "--json").stdout)["key"]
        b_key = json.loads(cli(served, "create", "--org", "team-b", "--json").stdout)
        listing = cli(served, "list", "--json", admin_key=a_admin)
        assert listing.returncode == 0
        orgs = {k["org"] for k in json.loads(listing.stdout)}
        assert orgs == {"team-a"}
        assert cli(served, "revoke", b_key["id"], admin_key=a_admin).returncode == 1
        with httpx2.Client(timeout=10) as http:
            resp = http.get(served.root + f"/admin/keys/{b_key['id']}", headers={"authorization": f"Bearer {a_admin}"})
        assert resp.status_code == 404
        with served.client(b_key["key"]) as c:
            assert c.chat.completions.create(model="chat", messages=MESSAGES).choices

    def test_org_admin_cannot_read_another_orgs_usage(self, served: Served) -> None:
        """team-a's admin gets only team-a's usage rows; asking for team-b's is a 403."""
        a_admin = json.loads(cli(served, "create", "--org", "team-a", "--scope", "admin", "--json").stdout)["key"]
        with served.client(TEAM_B) as c:
            c.chat.completions.create(model="b-only", messages=MESSAGES)
        auth = {"authorization": f"Bearer {a_admin}"}
        with httpx2.Client(timeout=10) as http:
            http.post(served.root + "/admin/usage/flush", headers={"authorization": f"Bearer {ADMIN}"})
            rows = http.get(served.root + "/admin/usage", params={"group_by": "org,model"}, headers=auth).json()["data"]
            assert rows and {r["org"] for r in rows} == {"team-a"} and "b-only" not in {r["model"] for r in rows}
            assert http.get(served.root + "/admin/usage", params={"org": "team-b"}, headers=auth).status_code == 403


class TestSecrets:
    def test_keys_never_in_logs(self, served: Served) -> None:
        """After all of the above, the gateway's log contains none of the keys in use (runs last in this module)."""
        with served.client(TEAM_A) as c:
            c.chat.completions.create(model="chat", messages=MESSAGES)
        with served.client("sk-llm-" + "L" * 43) as c, pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(model="chat", messages=MESSAGES)
        log = served.process.log_text()
        for secret in (ADMIN, TEAM_A, TEAM_B, LIMITED, "sk-llm-" + "L" * 43, "e2e-limits-pepper"):
            assert secret not in log
