"""SIGTERM with Redis as the state store (issue 17, the rolling-restart bug).

With ``stores.state: redis://`` every SIGTERM logged "Application shutdown failed":
closing the node-liveness publish queue under its loop raised ``ClosedResourceError``
into the gateway's task group, which cancelled the rest of the shutdown — the ledger
writer never flushed nor spilled, and the requests answered just before were lost
(measured in a rolling restart: 23 of 1,150). Here a real ``asgi-llm serve`` with Redis
state, breaker sharing and nodes (an agent heartbeating to it) is SIGTERMed while the
ledger rows of the requests it just answered are still queued (a 60 s flush interval):
it exits promptly and cleanly, and every answered request has its ledger row.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import openai
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, fake_upstream, gateway_process
from tests.conftest import UPSTREAM_KEYS
from tests.e2e.test_nodes import ADMIN, TEAM_A, agent, new_token, node_status, wait_for
from tests.services import redis_url

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

N = 12


def test_sigterm_with_redis_state_and_nodes_flushes_the_ledger(tmp_path: Path, upstream_a: FakeUpstreamHandle) -> None:
    """SIGTERM right after N+N answers and N/2 streams: exit 0 / -SIGTERM within 10 s, no "shutdown
    failed" in the log, one ledger row per answered request id, nothing spilled."""
    ledger = tmp_path / "ledger.db"
    spill = tmp_path / "spill"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
providers:
  provider-a: {{base_url: "{upstream_a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"], timeout_s: 10}}
models:
  chat: {{targets: [{{provider: provider-a, model: gpt-4o-mini}}]}}
  node-chat: {{targets: [{{nodes: any, model: tiny-chat}}]}}
auth:
  admin_keys: ["{ADMIN}"]
  pepper: "shutdown-test-pepper-0123456789"
  keys: [{{key: "{TEAM_A}", org: team-a}}]
stores: {{state: "{redis_url(db=11)}", ledger: "sqlite:///{ledger}"}}
limits: {{org: {{rpm: 100000}}}}
usage: {{flush_interval_s: 60, spill_dir: "{spill}"}}
nodes: {{heartbeat_interval_s: 0.5, heartbeat_window_s: 2, allowed_networks: ["127.0.0.1/32"]}}
routing: {{health: {{probe_interval_s: 0}}}}
""")
    answered: list[str] = []
    with fake_upstream("shutdown-engine", models=["tiny-chat"]) as engine, \
            gateway_process(recipe, name="gateway-redis-shutdown") as gw:
        with agent(gw.url, engine.base_url, tmp_path / "agent", token=new_token(gw.url), name="box-s"):
            wait_for(lambda: node_status(gw.url, "box-s") == "online", 10, "the node to come online")
            with openai.OpenAI(base_url=gw.base_url, api_key=TEAM_A, max_retries=0, timeout=20) as c:
                for model in ("chat", "node-chat"):
                    for _ in range(N):
                        raw = c.chat.completions.with_raw_response.create(
                            model=model, messages=[{"role": "user", "content": "remember me"}])
                        assert raw.parse().choices
                        answered.append(raw.headers["x-request-id"])
                for _ in range(N // 2):  # streams too: the row is queued once the stream has ended
                    raw = c.chat.completions.with_raw_response.create(
                        model="chat", messages=[{"role": "user", "content": "stream me"}], stream=True)
                    with raw.parse() as stream:
                        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
                    answered.append(raw.headers["x-request-id"])
            # SIGTERM now, the agent still heartbeating: the rows are queued (60 s flush interval).
            proc = gw.process.proc
            stopping = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pytest.fail("the gateway did not exit within 15 s of SIGTERM:\n" + gw.process.log_text()[-4000:])
            took = time.monotonic() - stopping
            log = gw.process.log_text()
    assert proc.returncode in (0, -signal.SIGTERM), (proc.returncode, log[-4000:])
    assert took < 10, (took, log[-4000:])
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        recorded = {r[0] for r in db.execute("SELECT DISTINCT request_id FROM usage_ledger")}
    missing = [rid for rid in answered if rid not in recorded]
    assert len(answered) == 2 * N + N // 2 and not missing, f"{len(missing)} of {len(answered)} answered requests have no ledger row"
    assert "shutdown failed" not in log.lower(), log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    spilled = [f for f in spill.rglob("*") if f.is_file() and f.stat().st_size] if spill.exists() else []
    assert not spilled, f"rows were spilled instead of written at shutdown: {spilled}"
