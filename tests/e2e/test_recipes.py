"""Recipes and the CLI as users run them: serve, check, the FastAPI mount, the demo."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import openai
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, free_port, gateway_process, managed_process
from tests.conftest import REPO, UPSTREAM_KEYS

pytestmark = pytest.mark.e2e


def _cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asgi_llm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


class TestRecipeErrorsAtStart:
    def test_unknown_key_fails_serve_with_path(self, tmp_path: Path) -> None:
        """`asgi-llm serve` on a recipe with an unknown key exits 2 naming the key's path; nothing listens."""
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(textwrap.dedent("""\
            providers:
              a: {base_url: "http://127.0.0.1:1/v1", timeout_sec: 5}
            models:
              chat: {targets: [{provider: a, model: m}]}
            """))
        port = free_port()
        res = _cli("serve", "--config", str(recipe), "--port", str(port), timeout=30)
        assert res.returncode == 2
        assert "providers.a.timeout_sec" in res.stderr
        assert "Traceback" not in res.stderr

    def test_wrong_type_fails_check_with_path(self, tmp_path: Path) -> None:
        """`asgi-llm check` reports a wrong type at its path."""
        recipe = tmp_path / "bad.yaml"
        recipe.write_text("models:\n  chat:\n    targets:\n      - {provider: a, model: m, price: {input: cheap, output: 1}}\n"
                          "providers:\n  a: {base_url: 'http://x/v1'}\n")
        res = _cli("check", str(recipe))
        assert res.returncode == 2
        assert "models.chat.targets[0].price.input" in res.stderr

    def test_check_reports_schema_and_reference_errors_together(self, tmp_path: Path) -> None:
        """Issue 16 item 7: a schema error used to hide every unknown provider/model reference
        until it was fixed; one `asgi-llm check` now names both kinds."""
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(textwrap.dedent("""\
            providers:
              a: {base_url: "http://127.0.0.1:1/v1", timeout_s: -1}
            models:
              chat: {targets: [{provider: nope, model: m}]}
            cache: {models: {ghost: {enabled: false}}}
            auth:
              keys:
                - {key: "sk-check-0123456789", org: o, models: [phantom]}
            """))
        res = _cli("check", str(recipe))
        assert res.returncode == 2
        assert "providers.a.timeout_s" in res.stderr  # the schema error ...
        assert "models.chat.targets[0].provider: unknown provider 'nope'" in res.stderr  # ... and the references
        assert "cache.models: unknown model 'ghost'" in res.stderr
        assert "auth.keys[0].models[0]: unknown model 'phantom'" in res.stderr
        assert "4 problems" in res.stderr and "Traceback" not in res.stderr
        assert "sk-check-0123456789" not in res.stderr

    def test_unenforceable_settings_refused(self, tmp_path: Path) -> None:
        """Auth settings that cannot be honoured (a pepper too short to protect key hashes) stop the start; no secret is echoed."""
        recipe = tmp_path / "keys.yaml"
        recipe.write_text("providers:\n  a: {base_url: 'http://x/v1'}\nmodels:\n  chat: {targets: [{provider: a, model: m}]}\n"
                          "auth:\n  admin_keys: ['adm-123456789']\n  pepper: 'pep-short'\n")
        res = _cli("check", str(recipe))
        assert res.returncode == 2 and "auth.pepper" in res.stderr
        assert "adm-123456789" not in res.stderr and "pep-short" not in res.stderr

    def test_standalone_recipe_is_valid(self) -> None:
        """The shipped standalone recipe validates."""
        res = _cli("check", "recipes/standalone.yaml")
        assert res.returncode == 0, res.stderr
        assert "chat" in res.stdout


class TestServe:
    def test_env_expansion_and_workers(self, tmp_path: Path, upstream_a: FakeUpstreamHandle) -> None:
        """${VAR} values come from the environment; --workers 2 serves from both processes."""
        recipe = tmp_path / "r.yaml"
        recipe.write_text(textwrap.dedent("""\
            providers:
              a: {base_url: "${A_URL}", api_keys: ["${A_KEY}"]}
            models:
              chat: {targets: [{provider: a, model: gpt-4o-mini}]}
            """))
        env = {"A_URL": upstream_a.base_url, "A_KEY": UPSTREAM_KEYS["provider-a"]}
        with gateway_process(recipe, name="gateway-workers", env=env, extra_args=("--workers", "2")) as gw:
            with openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0) as c:
                for _ in range(6):
                    reply = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
                    assert reply.choices[0].message.content.startswith("Hello from provider-a")


class TestMountInFastAPI:
    def test_host_routes_untouched_and_gateway_under_prefix(self, tmp_path: Path, upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle) -> None:
        """recipes/mount_in_fastapi.py: host routes answer as before; /llm/v1 is the gateway."""
        port = free_port()
        env = {
            "PROVIDER_A_URL": upstream_a.base_url, "PROVIDER_A_KEY": UPSTREAM_KEYS["provider-a"],
            "PROVIDER_B_URL": upstream_b.base_url, "PROVIDER_B_KEY": UPSTREAM_KEYS["provider-b"],
            "ASGI_LLM_CONFIG": str(REPO / "recipes" / "standalone.yaml"), "PYTHONPATH": str(REPO),
        }
        args = [sys.executable, "-m", "uvicorn", "recipes.mount_in_fastapi:app", "--port", str(port), "--log-level", "warning"]
        # cwd: the standalone recipe's default ledger (sqlite:///asgi-llm.db) lands in tmp_path, not the checkout.
        with managed_process(args, ready_url=f"http://127.0.0.1:{port}/", env=env, name="fastapi-host", cwd=tmp_path):
            base = f"http://127.0.0.1:{port}"
            with httpx2.Client(timeout=10) as http:
                assert http.get(base + "/items/7").json() == {"item_id": 7}
                assert http.get(base + "/").json()["llm"] == "/llm/v1"
                assert http.get(base + "/docs").status_code == 200  # FastAPI's own pages still work
                assert http.get(base + "/llm/healthz").json() == {"status": "ok"}
            with openai.OpenAI(base_url=base + "/llm/v1", api_key="x", max_retries=0) as c:
                reply = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
                assert reply.choices[0].message.content.startswith("Hello from provider-a")
                chunks = list(c.chat.completions.create(model="chat-b", messages=[{"role": "user", "content": "hi"}], stream=True))
                assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).startswith("Hello from provider-b")


class TestDemo:
    def test_demo_passes(self) -> None:
        """`asgi-llm demo` runs its checklist offline and exits 0, one line per check."""
        res = _cli("demo", timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "1. 200 from every route" in res.stdout
        assert " 0 failed" in res.stdout
