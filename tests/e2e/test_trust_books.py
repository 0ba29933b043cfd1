"""End to end (issue 12, items 1 and 2): the books cannot be poisoned.

A real ``asgi-llm serve`` on SQLite and on real PostgreSQL, the fake upstream as a lying
provider. One oversized audit event (an unauthenticated ``GET /admin/<450 chars>``, a
300-character model) used to stop the audit log for good; one absurd ledger row (a
300-character upstream model, 2**70 prompt tokens, a price that overflows the cost) used
to stop the ledger for every org, across restarts, and made ``POST /admin/usage/flush``
hang and SIGTERM wait out its timeouts. Here every later request is still recorded,
the chain verifies, the flush answers promptly, SIGTERM exits promptly, and a spilled
poisoned row replayed at the next start does not stick.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, GatewayHandle, gateway_process
from asgi_llm.usage.records import MAX_COST_USD, MAX_TOKENS, LedgerRow
from tests.conftest import REPO, UPSTREAM_KEYS

pytestmark = pytest.mark.e2e

ADMIN = "adm-books-0123456789"
CLIENT = "sk-books-client-0123456789"
MESSAGES = [{"role": "user", "content": "count me"}]
LONG_MODEL = "u" * 300
N = 10


@dataclass
class Books:
    """A recipe and its ledger; :meth:`serve` starts (and SIGTERMs) a gateway on it."""

    recipe: Path
    ledger: str
    spill: Path

    @contextlib.contextmanager
    def serve(self) -> Iterator[GatewayHandle]:
        with gateway_process(self.recipe, name="gateway-books", env={"ASGI_LLM_PEPPER": "books-pepper-0123456789"}) as gw:
            yield gw


@pytest.fixture
def books(sql_url: str, tmp_path: Path, upstream_a: FakeUpstreamHandle) -> Books:
    spill = tmp_path / "spill"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        providers:
          provider-a: {{base_url: "{upstream_a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"], timeout_s: 10}}
        models:
          chat:   {{targets: [{{provider: provider-a, model: gpt-4o-mini, price: {{input: 0.15, output: 0.60}}}}]}}
          long:   {{targets: [{{provider: provider-a, model: "{LONG_MODEL}"}}]}}
          pricey: {{targets: [{{provider: provider-a, model: gpt-4o-mini, price: {{input: 1e30, output: 1e30}}}}]}}
        stores: {{ledger: "{sql_url}"}}
        auth:
          admin_keys: ["{ADMIN}"]
          keys: [{{key: "{CLIENT}", org: team-a, name: books}}]
        routing: {{retries_per_target: 0, health: {{probe_interval_s: 0, failure_threshold: 100000}}}}
        usage: {{flush_interval_s: 0.05, spill_dir: "{spill}"}}
        """))
    return Books(recipe, sql_url, spill)


def admin(gw: GatewayHandle, method: str, path: str, key: str = ADMIN, json_body: Any = None,
          **params: Any) -> httpx2.Response:
    with httpx2.Client(timeout=30) as http:
        return http.request(method, gw.url + path, params=params, json=json_body,
                            headers={"authorization": f"Bearer {key}"})


def ok(resp: httpx2.Response) -> Any:
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


def chat(gw: GatewayHandle, model: str = "chat", n: int = 1) -> None:
    with openai.OpenAI(base_url=gw.base_url, api_key=CLIENT, max_retries=0, timeout=20) as c:
        for _ in range(n):
            assert c.chat.completions.create(model=model, messages=MESSAGES).choices


def audit_events(gw: GatewayHandle, **filters: str) -> list[dict[str, Any]]:
    assert ok(admin(gw, "GET", "/admin/audit/verify"))["ok"] is True  # flushes the audit writer first
    return list(ok(admin(gw, "GET", "/admin/audit", limit=10_000, **filters))["data"])


def ledger_rows(gw: GatewayHandle) -> dict[str, dict[str, Any]]:
    """Flush (timed: it must answer promptly) and report per model."""
    started = time.monotonic()
    ok(admin(gw, "POST", "/admin/usage/flush"))
    assert time.monotonic() - started < 5, "the flush took too long"
    return {r["model"]: r for r in ok(admin(gw, "GET", "/admin/usage", group_by="model"))["data"]}


def attempts(rows: dict[str, dict[str, Any]]) -> int:
    return sum(r["attempts"] for r in rows.values())


def metric(gw: GatewayHandle, name: str) -> float | None:
    with httpx2.Client(timeout=10) as http:
        text = http.get(gw.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


class TestAuditLog:
    def test_oversized_events_do_not_stop_the_audit_log(self, books: Books) -> None:
        """An unauthenticated GET /admin/<450 chars> and a chat for a 300-char model are
        recorded (cut to their columns, marked '…'); N more requests add N events; the
        chain verifies intact (API and CLI)."""
        with books.serve() as gw:
            chat(gw)
            before = len(audit_events(gw, kind="inference"))
            with httpx2.Client(timeout=10) as http:
                assert http.get(gw.url + "/admin/" + "a" * 450).status_code in (401, 403)
            with openai.OpenAI(base_url=gw.base_url, api_key=CLIENT, max_retries=0, timeout=20) as c, \
                    pytest.raises(openai.NotFoundError):
                c.chat.completions.create(model="x" * 300, messages=MESSAGES)
            chat(gw, n=N)
            inference = audit_events(gw, kind="inference")
            assert len(inference) == before + 1 + N
            long_model = [e for e in inference if (e["model"] or "").startswith("xxx")]
            assert len(long_model) == 1 and len(long_model[0]["model"]) == 200 and long_model[0]["model"].endswith("…")
            denied = [e for e in audit_events(gw, kind="admin") if e["action"].startswith("GET /admin/aaa")]
            assert len(denied) == 1 and len(denied[0]["action"]) == 400 and denied[0]["action"].endswith("…")
            assert denied[0]["verdict"] == "denied"
            res = subprocess.run([sys.executable, "-m", "asgi_llm.cli", "audit", "verify", "--ledger", books.ledger],
                                 capture_output=True, text=True, cwd=REPO, timeout=60)
            assert res.returncode == 0 and "intact" in res.stdout, res.stdout + res.stderr


class TestLedger:
    def test_poisoned_rows_are_kept_flagged_and_the_ledger_keeps_rising(self, books: Books,
                                                                        upstream_a: FakeUpstreamHandle) -> None:
        """A 300-char upstream model, an upstream reporting 2**70 prompt tokens and a 300-char
        response model, a price whose cost overflows BIGINT: each row is written (flagged,
        never dropped), N more requests add N rows, the flush answers promptly, SIGTERM is
        prompt; after a restart that replays a poisoned spill file, the ledger still rises."""
        with books.serve() as gw:
            chat(gw, n=2)
            chat(gw, "long")
            chat(gw, "pricey")
            upstream_a.add_faults({"kind": "misreport", "usage": {"prompt_tokens": 2**70}})
            chat(gw)
            upstream_a.add_faults({"kind": "misreport", "model": "r" * 300})
            chat(gw)
            rows = ledger_rows(gw)
            assert attempts(rows) == 6
            chat(gw, n=N)
            rows = ledger_rows(gw)
            assert attempts(rows) == 6 + N
            assert rows["long"]["flagged_rows"] == 1 and rows["pricey"]["flagged_rows"] == 1
            # The 300-char response model is cut and flagged. The 2**70 prompt tokens never reach
            # the writer: the accounting's plausibility check (usage/accounting.py) clamps them
            # to what the request body can hold and marks the row estimated, so the writer's own
            # clamp (MAX_TOKENS, exercised by the spilled row below) has nothing left to do.
            assert rows["chat"]["flagged_rows"] == 1
            assert 0 < rows["chat"]["prompt_tokens"] < MAX_TOKENS
            assert rows["pricey"]["cost_usd"] == str(MAX_COST_USD)  # kept at the cap, not dropped, not free
            assert metric(gw, 'asgi_llm_quarantined_rows_total{writer="ledger"}') == 0
            chat(gw, n=3)  # still queued when SIGTERM arrives: written at shutdown, promptly
            stopping = time.monotonic()
        sigterm_s = time.monotonic() - stopping
        # Exited on the SIGTERM itself (uvicorn re-raises it after a graceful shutdown), not SIGKILLed after 5 s.
        assert gw.process.proc.returncode in (0, -signal.SIGTERM) and sigterm_s < 4, (gw.process.proc.returncode, sigterm_s)

        # What a version without bounds spilled at shutdown: the next start replays it.
        books.spill.mkdir(parents=True, exist_ok=True)
        poisoned = LedgerRow(request_id="spilled", org="team-a", key_id="k", model="m" * 300, route="a/m", provider="a",
                             upstream_model="m", prompt_tokens=2**70).to_json()
        unforeseen = json.loads(LedgerRow(request_id="ancient", org="team-a", key_id="k", model="chat", route="a/m",
                                          provider="a", upstream_model="m").to_json())
        unforeseen["ts"] = "0001-01-01T00:00:00+05:00"  # refused at insert (before year 1 in UTC)
        (books.spill / "ledger-1-seeded.jsonl").write_text(
            "\n".join([poisoned, json.dumps(unforeseen), '{"request_id": "torn']) + "\n")
        with books.serve() as gw:
            chat(gw, n=N)
            rows = ledger_rows(gw)
            assert attempts(rows) == 6 + N + 3 + 1 + N  # the 3 written at shutdown, the replayed poisoned row, N more
            assert not list(books.spill.glob("ledger-*"))
            everything = ok(admin(gw, "GET", "/admin/quarantine"))
            assert len(everything["data"]) == 2 and everything["writers"]["ledger"]["quarantined"] == 2
            assert {e["org"] for e in everything["data"]} == {"team-a", None}
            assert metric(gw, 'asgi_llm_quarantined_rows_total{writer="ledger"}') == 2
            team_b = ok(admin(gw, "POST", "/admin/keys", json_body={"org": "team-b", "name": "b-admin",
                                                                    "scopes": ["admin"]}))["key"]
            team_a = ok(admin(gw, "POST", "/admin/keys", json_body={"org": "team-a", "name": "a-admin",
                                                                    "scopes": ["admin"]}))["key"]
            assert ok(admin(gw, "GET", "/admin/quarantine", key=team_b))["data"] == []
            mine = ok(admin(gw, "GET", "/admin/quarantine", key=team_a))
            (own,) = mine["data"]
            assert json.loads(own["payload"])["request_id"] == "ancient" and "writers" not in mine
            assert admin(gw, "GET", "/admin/quarantine", key=team_b, org="team-a").status_code == 403
            assert admin(gw, "GET", "/admin/quarantine", limit="0").status_code == 400
