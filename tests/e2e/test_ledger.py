"""End to end: the ledger equals what the upstreams billed, to the token; reports and
CLI; the audit chain; a load test with SQLite and PostgreSQL (restarted mid-run)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import openai
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, gateway_process
from tests.conftest import REPO, UPSTREAM_KEYS

pytestmark = pytest.mark.e2e

ADMIN = "adm-e2e-0123456789"
CLIENT = "sk-e2e-client-0123456789"
MESSAGES = [{"role": "user", "content": "meter this call exactly"}]


def recipe(a: FakeUpstreamHandle, b: FakeUpstreamHandle, ledger: str, spill: Path) -> str:
    return textwrap.dedent(f"""\
        providers:
          provider-a: {{base_url: "{a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"], timeout_s: 10, ttft_timeout_s: 5}}
          provider-b: {{base_url: "{b.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-b']}"], timeout_s: 10, ttft_timeout_s: 5}}
        models:
          chat:   {{targets: [{{provider: provider-a, model: gpt-4o-mini, price: {{input: 0.15, output: 0.60}}}}]}}
          chat-b: {{targets: [{{provider: provider-b, model: llama-3.1-8b, price: {{input: 0.05, output: 0.08}}}}]}}
          fo:
            targets:
              - {{provider: provider-a, model: gpt-4o-mini, price: {{input: 0.15, output: 0.60}}}}
              - {{provider: provider-b, model: llama-3.1-8b, price: {{input: 0.05, output: 0.08}}}}
        stores: {{ledger: "{ledger}"}}
        auth:
          admin_keys: ["{ADMIN}"]
          keys: [{{key: "{CLIENT}", org: team-a, name: e2e}}]
        cache: {{enabled: true}}
        routing: {{retries_per_target: 0, health: {{probe_interval_s: 0, failure_threshold: 100000}}}}
        usage: {{flush_interval_s: 0.05, prompt_estimate: words, spill_dir: "{spill}"}}
        """)


@pytest.fixture
def gateway(upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A real `asgi-llm serve` with its own SQLite ledger."""
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe(upstream_a, upstream_b, ledger, tmp_path / "spill"))
    with gateway_process(path, name="gateway-ledger") as gw:
        yield {"url": gw.url, "ledger": ledger}


def admin(gw: dict[str, Any], method: str, path: str, **params: Any) -> Any:
    with httpx2.Client(timeout=20) as http:
        r = http.request(method, gw["url"] + path, params=params, headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return r.json() if "json" in r.headers.get("content-type", "") else r.text


def disconnect_mid_stream(gw: dict[str, Any]) -> None:
    body = json.dumps({"model": "chat", "messages": MESSAGES, "stream": True}).encode()
    host, port = gw["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     + f"authorization: Bearer {CLIENT}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"meter" not in received:
            received += sock.recv(65536)


class TestLedgerEqualsBilling:
    def test_totals_match_across_every_path(self, gateway: dict[str, Any], upstream_a: FakeUpstreamHandle,
                                            upstream_b: FakeUpstreamHandle) -> None:
        """Streams, non-streams, failovers, cut streams, cache hits and disconnects: ledger == billed, to the token."""
        client = openai.OpenAI(base_url=gateway["url"] + "/v1", api_key=CLIENT, max_retries=0, timeout=20)
        try:
            client.chat.completions.create(model="chat", messages=MESSAGES)
            list(client.chat.completions.create(model="chat", messages=MESSAGES, stream=True))
            list(client.chat.completions.create(model="chat-b", messages=MESSAGES, stream=True,
                                                stream_options={"include_usage": True}))
            upstream_a.add_faults({"kind": "status", "status": 503})
            client.chat.completions.create(model="fo", messages=MESSAGES)  # failover a → b
            upstream_a.add_faults({"kind": "cut", "after_chunks": 0})
            list(client.chat.completions.create(model="fo", messages=MESSAGES, stream=True))  # cut before content
            upstream_a.add_faults({"kind": "cut", "after_chunks": 3})
            with pytest.raises(openai.APIError):
                list(client.chat.completions.create(model="chat", messages=MESSAGES, stream=True))  # cut mid-answer
            for _ in range(2):
                client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "cache me"}], temperature=0)
            client.embeddings.create(model="chat", input="embed me too")
        finally:
            client.close()
        upstream_a.add_faults({"kind": "chunk_delay", "delay_s": 0.3})
        disconnect_mid_stream(gateway)
        upstream_a.wait_stats(lambda s: s["disconnects"] >= 1 and s["in_flight"] == 0, timeout=5)

        admin(gateway, "POST", "/admin/usage/flush")
        rows = admin(gateway, "GET", "/admin/usage", group_by="outcome")["data"]
        by = {r["outcome"]: r for r in rows}
        billed = [u.stats()["usage"] for u in (upstream_a, upstream_b)]
        prompt = sum(r["prompt_tokens"] for r in rows)
        completion = sum(r["completion_tokens"] for r in rows)
        assert (prompt, completion) == (sum(b["prompt_tokens"] for b in billed), sum(b["completion_tokens"] for b in billed))
        assert by["cache_hit"]["cache_hits"] == 1 and float(by["cache_hit"]["saved_usd"]) > 0
        assert by["error"]["attempts"] == 3  # 503, cut before content, cut mid-answer
        # chat, stream, chat-b, 2 failovers' 2nd attempts, cache miss, embeddings + the disconnect. (Dispatch
        # may label a finished stream 'aborted' when the client hangs up right after [DONE]: its usage is exact.)
        assert by["ok"]["attempts"] + by["aborted"]["attempts"] == 8 and by["aborted"]["attempts"] >= 1

    def test_reports_cli_and_audit(self, gateway: dict[str, Any], upstream_a: FakeUpstreamHandle,
                                   upstream_b: FakeUpstreamHandle) -> None:
        """`asgi-llm usage report` prints the table; the audit log has every call; `audit verify` passes."""
        client = openai.OpenAI(base_url=gateway["url"] + "/v1", api_key=CLIENT, max_retries=0, timeout=20)
        try:
            client.chat.completions.create(model="chat", messages=MESSAGES)
            client.chat.completions.create(model="chat-b", messages=MESSAGES)
        finally:
            client.close()
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gateway["url"] + "/v1", api_key="sk-nope-0000000000", max_retries=0).models.list()
        admin(gateway, "POST", "/admin/usage/flush")
        env = {"PATH": "", "ASGI_LLM_GATEWAY": gateway["url"], "ASGI_LLM_ADMIN_KEY": ADMIN}
        res = subprocess.run([sys.executable, "-m", "asgi_llm.cli", "usage", "report", "--group-by", "route"],
                             capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "provider-a/gpt-4o-mini" in res.stdout and "provider-b/llama-3.1-8b" in res.stdout
        res = subprocess.run([sys.executable, "-m", "asgi_llm.cli", "usage", "compare", "--format", "json"],
                             capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
        assert res.returncode == 0 and len(json.loads(res.stdout)) == 2

        events = admin(gateway, "GET", "/admin/audit", kind="inference")["data"]
        assert [(e["model"], e["verdict"], e["actor"]) for e in events] == [("chat", "allowed", "static:e2e"),
                                                                            ("chat-b", "allowed", "static:e2e")]
        assert all("meter" not in json.dumps(e) for e in events)  # no prompt content
        assert admin(gateway, "GET", "/admin/audit/verify")["ok"] is True
        res = subprocess.run([sys.executable, "-m", "asgi_llm.cli", "audit", "verify", "--ledger", gateway["ledger"]],
                             capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
        assert res.returncode == 0 and "intact" in res.stdout, res.stdout + res.stderr
        import sqlite3

        con = sqlite3.connect(gateway["ledger"].removeprefix("sqlite:///"))
        con.execute("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2")
        con.commit()
        con.close()
        res = subprocess.run([sys.executable, "-m", "asgi_llm.cli", "audit", "verify", "--ledger", gateway["ledger"]],
                             capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
        assert res.returncode == 1 and "BROKEN" in res.stdout

    def test_metrics_endpoint(self, gateway: dict[str, Any], upstream_a: FakeUpstreamHandle) -> None:
        """GET /metrics answers Prometheus text with requests, tokens and cost per model and target."""
        client = openai.OpenAI(base_url=gateway["url"] + "/v1", api_key=CLIENT, max_retries=0, timeout=20)
        try:
            client.chat.completions.create(model="chat", messages=MESSAGES)
        finally:
            client.close()
        with httpx2.Client(timeout=10) as http:
            r = http.get(gateway["url"] + "/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        assert 'asgi_llm_requests_total{endpoint="chat",model="chat",status="200"} 1.0' in text
        assert 'asgi_llm_tokens_total{model="chat",target="provider-a/gpt-4o-mini",type="prompt"}' in text
        assert "asgi_llm_cost_usd_total" in text and "asgi_llm_ttft_seconds_bucket" in text or "asgi_llm_attempt_duration_seconds_bucket" in text


# ---------------------------------------------------------------------- load


def _pg_restart_available() -> bool:
    return shutil.which("pg_ctlcluster") is not None and shutil.which("pg_lsclusters") is not None


def _pg_cluster() -> tuple[str, str] | None:
    out = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True).stdout.split()
    return (out[0], out[1]) if len(out) >= 2 else None


def _pg(action: str) -> None:
    cluster = _pg_cluster()
    assert cluster is not None
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster[0], cluster[1], action],
                   check=True, capture_output=True, timeout=60)


@pytest.fixture
def load_ledger(sql_url: str) -> str:
    """The load test's ledger: SQLite and real PostgreSQL (a clean schema each; see conftest)."""
    return sql_url


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
class TestLoad:
    N = 2000

    async def test_one_row_per_attempt_under_load(self, anyio_backend: str, load_ledger: str, tmp_path: Path,
                                                  upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle) -> None:
        """Thousands of concurrent requests (some failing over) → exactly one row per attempt, billed == ledger;
        with PostgreSQL the server is restarted mid-run and still nothing is lost."""
        from asgi_llm.config import parse_config
        from asgi_llm.stack import build_gateway, gateway_lifespan
        from tests.harness import call

        restart = load_ledger.startswith("postgresql") and _pg_restart_available()
        cfg = parse_config(recipe(upstream_a, upstream_b, load_ledger, tmp_path / "spill"), environ={})
        gw = build_gateway(cfg)
        upstream_a.add_faults({"kind": "status", "status": 503, "times": 100, "match": {"model": "gpt-4o-mini"}})
        headers = [(b"authorization", f"Bearer {CLIENT}".encode())]
        done = 0
        try:
            async with gateway_lifespan(gw):
                writer = gw.services.ledger_writer

                async def worker(i: int) -> None:
                    nonlocal done
                    for j in range(i, self.N, 50):
                        model = "fo" if j % 2 else "chat-b"
                        rec = await call(gw, body={"model": model, "messages": [{"role": "user", "content": f"load {j}"}],
                                                   "stream": j % 3 == 0}, headers=headers)
                        assert rec.status == 200
                        done += 1

                async def restarter() -> None:
                    while done < self.N // 3:
                        await anyio.sleep(0.05)
                    # Stop, and start again only once the writer has met the outage (it flushes
                    # every 0.05 s): a plain restart can fall between two flushes and go unseen.
                    failures = writer.stats["failures"]
                    await anyio.to_thread.run_sync(_pg, "stop")
                    try:
                        with anyio.move_on_after(15):
                            while writer.stats["failures"] == failures:
                                await anyio.sleep(0.02)
                    finally:
                        await anyio.to_thread.run_sync(_pg, "start")

                async with anyio.create_task_group() as tg:
                    for i in range(50):
                        tg.start_soon(worker, i)
                    if restart:
                        tg.start_soon(restarter)
                with anyio.fail_after(60):
                    await writer.flush()
                store = gw.services.ledger_store
                attempts = await store.report(group_by=[])
                if restart:
                    assert writer.stats["failures"] > 0  # the restart was felt …
        finally:
            if restart:
                subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *(_pg_cluster() or ("15", "main")), "start"],
                               capture_output=True, timeout=60)  # … and PostgreSQL is up whatever happened
        (total,) = attempts
        a, b = upstream_a.stats(), upstream_b.stats()
        upstream_attempts = sum(a["requests"].values()) + sum(b["requests"].values())
        assert total["requests"] == self.N
        assert total["attempts"] == upstream_attempts == self.N + 100  # … but not one row lost or doubled
        assert total["prompt_tokens"] == a["usage"]["prompt_tokens"] + b["usage"]["prompt_tokens"]
        assert total["completion_tokens"] == a["usage"]["completion_tokens"] + b["usage"]["completion_tokens"]
