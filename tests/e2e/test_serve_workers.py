"""`asgi-llm serve --workers N` on a fresh directory: every worker starts, every time.

The workers used to race to create the SQLite ledger's schema (one of them died with
"table ... already exists" or "database is locked" about 3 times in 17). The schema is
now migrated once, before the workers fork, and migrations run under a lock.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, gateway_process
from tests.conftest import UPSTREAM_KEYS

pytestmark = pytest.mark.e2e

STARTS = 5
WORKERS = 2


def _wait_for_workers(gw_log: Callable[[], str], count: int, timeout: float) -> str:
    """Poll the gateway's log until ``count`` workers finished their startup; return the log."""
    deadline = time.monotonic() + timeout
    while True:
        text = gw_log()
        if text.count("Application startup complete") >= count or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


class TestServeWorkers:
    def test_fresh_directory_starts_every_time(self, tmp_path: Path, upstream_a: FakeUpstreamHandle) -> None:
        """5 starts of --workers 2, each in an empty directory with the default ledger
        (sqlite:///asgi-llm.db, relative): each time both workers start, nothing fails,
        the gateway answers, and the schema was made once."""
        for i in range(STARTS):
            here = tmp_path / f"start-{i}"
            here.mkdir()
            recipe = here / "recipe.yaml"
            recipe.write_text(textwrap.dedent(f"""\
                providers:
                  a: {{base_url: "{upstream_a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"]}}
                models:
                  chat: {{targets: [{{provider: a, model: gpt-4o-mini}}]}}
                auth:
                  admin_keys: ["sk-admin-workers-0123456789"]
                  pepper: "workers-test-pepper-0123456789"
                  keys: [{{key: "sk-team-workers", org: team}}]
                """))
            with gateway_process(recipe, name=f"gateway-workers-{i}", cwd=here, log_level="info",
                                 extra_args=("--workers", str(WORKERS)), timeout=30) as gw:
                log = _wait_for_workers(gw.process.log_text, WORKERS, timeout=20)
                assert log.count("Application startup complete") == WORKERS, f"start {i}: a worker did not start:\n{log}"
                assert "Traceback" not in log and "ERROR" not in log, f"start {i}:\n{log}"
                with httpx2.Client(timeout=10, trust_env=False) as http:
                    for _ in range(4):
                        r = http.post(gw.base_url + "/chat/completions", headers={"authorization": "Bearer sk-team-workers"},
                                      json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
                        assert r.status_code == 200, f"start {i}: {r.status_code} {r.text}"
            assert (here / "asgi-llm.db").is_file(), f"start {i}: the ledger is not in the gateway's directory"
