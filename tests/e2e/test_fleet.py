"""A fleet for real: three ``asgi-llm serve`` replicas behind HAProxy, shared Redis and PostgreSQL.

HAProxy runs ``recipes/fleet/haproxy.cfg`` and the replicas ``recipes/fleet/fleet.yaml`` (the
walk-through's own files, addresses from the environment), HAProxy health-checking
``/readyz``. Many concurrent ``openai`` SDK clients (streams and non-streams) load the
balancer while a scenario happens; every scenario ends by checking the ledger: every
request a client saw completed has its row in PostgreSQL (fresh database per test).

* a replica SIGKILLed under load: only the requests in flight on it fail, and none of the
  rows of the answers it gave is lost (its journal is replayed when it restarts);
* a rolling restart (SIGTERM one replica at a time, start it again): zero failed
  requests, zero lost rows;
* Redis (a private ``redis-server`` on its own port, never the machine's) stopped for a
  few seconds: the gateway's own OpenAI-shaped 503 ``store_unavailable``
  (``stores.state_failure: closed``), no 500, no HAProxy page, recovery without a restart;
* PostgreSQL connections all terminated (``pg_terminate_backend`` on the test database:
  the same reconnect path as a server restart, without restarting the machine's server):
  no lost rows;
* HAProxy with no replica up answers OpenAI-shaped JSON (its ``errorfile``s).

Run alone: ``pytest -m fleet``. Counts per scenario are printed (``-s``) and asserted.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, ManagedProcess, fake_upstream, free_port, managed_process

pytestmark = [pytest.mark.e2e, pytest.mark.fleet]

REPO = Path(__file__).resolve().parents[2]
FLEET_DIR = REPO / "recipes" / "fleet"
KEY = "sk-fleet-0123456789abcdef"
CLIENTS = 12
MESSAGES = [{"role": "user", "content": "one two three four five six"}]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _need(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
    if path is None:
        message = f"{binary} is not installed (apt-get install -y {binary}; .ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; under CI=true a missing tool is a failure, not a skip")
        pytest.skip(message)
    return path


# --------------------------------------------------------------------------- processes


@dataclass
class Replica:
    """One ``asgi-llm serve`` on a fixed port, so the balancer's config holds across restarts."""

    name: str
    port: int
    recipe: Path
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    _stack: contextlib.ExitStack | None = None
    process: ManagedProcess | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "asgi_llm.cli", "serve", "--config", str(self.recipe), "--port", str(self.port),
                "--log-level", "warning"]
        self._stack = contextlib.ExitStack()
        self.process = self._stack.enter_context(managed_process(
            args, ready_url=f"http://127.0.0.1:{self.port}/healthz", name=self.name, timeout=30, cwd=self.cwd,
            env={"PYTHONPATH": str(REPO), **self.env}))

    def signal_and_wait(self, sig: signal.Signals, timeout: float) -> None:
        assert self.process is not None and self._stack is not None
        self.process.proc.send_signal(sig)
        self.process.proc.wait(timeout)  # bounded: TimeoutExpired fails the test
        log = self.process.log_text()
        self._stack.close()
        self._stack = self.process = None
        if sig == signal.SIGTERM:
            assert "Traceback" not in log and "shutdown failed" not in log.lower(), log[-3000:]

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = self.process = None


@dataclass
class Fleet:
    replicas: list[Replica]
    lb_url: str
    stats_url: str
    pg_url: str
    redis_port: int
    redis_dir: Path
    spill: Path
    redis: list[subprocess.Popen[bytes]] = field(default_factory=list)  # the current one last

    def server_states(self) -> dict[str, str]:
        with _OPENER.open(self.stats_url + ";csv", timeout=5) as r:
            rows = csv.reader(io.StringIO(r.read().decode().lstrip("# ")))
            header = next(rows)
            px, sv, st = header.index("pxname"), header.index("svname"), header.index("status")
            return {row[sv]: row[st] for row in rows if row and row[px] == "gateways" and row[sv].startswith("r")}

    def wait_state(self, server: str, want: str, timeout: float = 15) -> float:
        """Poll HAProxy until ``server`` is ``want`` (UP/DOWN); return how long it took."""
        start = time.monotonic()
        while True:
            state = self.server_states().get(server, "")
            if state.startswith(want):
                return time.monotonic() - start
            assert time.monotonic() - start < timeout, f"{server} still {state!r} after {timeout}s"
            time.sleep(0.05)

    def ledger_request_ids(self) -> set[str]:
        import psycopg

        with psycopg.connect(self.pg_url.replace("postgresql://", "postgresql://", 1), connect_timeout=5) as conn:
            return {r[0] for r in conn.execute("SELECT DISTINCT request_id FROM usage_ledger")}

    def wait_ledger(self, want: set[str], timeout: float = 30) -> set[str]:
        """Poll the ledger until it holds every id in ``want``; return the ids it holds."""
        deadline = time.monotonic() + timeout
        while True:
            have = self.ledger_request_ids()
            if want <= have or time.monotonic() > deadline:
                return have
            time.sleep(0.2)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstreamHandle]:
    """A fake upstream of its own: every stream is slow (~0.4 s), so some are always in flight."""
    with fake_upstream("fleet", models=["gpt-4o-mini"]) as up:
        yield up


def _start_redis(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([_need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            try:
                if client.ping():
                    return proc
            finally:
                client.close()
        except redis.RedisError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"redis-server on port {port} did not start")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture
def fleet(upstream: FakeUpstreamHandle, tmp_path: Path) -> Iterator[Fleet]:
    from tests.services import postgres_database

    haproxy = _need("haproxy")
    redis_port = free_port()
    redis_proc = _start_redis(tmp_path, redis_port)
    pg = postgres_database()
    pg_url = next(pg)
    recipe = FLEET_DIR / "fleet.yaml"  # the walk-through's recipe, addresses from the environment
    lb_port, stats_port = free_port(), free_port()
    ports = [free_port() for _ in range(3)]
    env = {"FLEET_UPSTREAM": upstream.base_url, "FLEET_REDIS": f"redis://127.0.0.1:{redis_port}/0",
           "FLEET_DATABASE": pg_url, "FLEET_SPILL": str(tmp_path / "spill"), "FLEET_KEY": KEY,
           "FLEET_LB_PORT": str(lb_port), "FLEET_STATS_PORT": str(stats_port), "FLEET_ERRORS": str(FLEET_DIR / "errors"),
           **{f"FLEET_R{i}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}}
    replicas = [Replica(f"replica-{i}", p, recipe, tmp_path, env) for i, p in enumerate(ports)]
    f: Fleet | None = None
    upstream.clear_faults()
    upstream.add_faults({"kind": "chunk_delay", "delay_s": 0.06, "times": None, "match": {"stream": True}},
                        {"kind": "delay", "delay_s": 0.15, "times": None, "match": {"stream": False}})
    try:
        with contextlib.ExitStack() as stack:
            for r in replicas:  # one after the other: the first migrates the database
                r.start()
                stack.callback(r.stop)
            stack.enter_context(managed_process([haproxy, "-db", "-f", str(FLEET_DIR / "haproxy.cfg")],
                                                ready_url=f"http://127.0.0.1:{lb_port}/healthz", env=env, name="haproxy"))
            f = Fleet(replicas, f"http://127.0.0.1:{lb_port}/v1", f"http://127.0.0.1:{stats_port}/stats", pg_url,
                      redis_port, tmp_path, tmp_path / "spill", [redis_proc])
            for i in range(3):
                f.wait_state(f"r{i}", "UP")
            yield f
    finally:
        upstream.clear_faults()
        for proc in (f.redis if f is not None else [redis_proc]):
            _stop(proc)
        pg.close()


# --------------------------------------------------------------------------- load


@dataclass
class Outcome:
    started: float
    ended: float
    stream: bool
    ok: bool
    request_id: str | None = None
    status: int | None = None
    body: str = ""
    error: str = ""


@dataclass
class Load:
    """CLIENTS threads, each its own SDK client, alternating streams and non-streams."""

    url: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    max_seconds: float = 60
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        for i in range(CLIENTS):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)
        assert not any(t.is_alive() for t in self._threads), "a client hung"

    def completed(self) -> int:
        with self._lock:
            return sum(o.ok for o in self.outcomes)

    def wait_completed(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.completed() < n:
            assert time.monotonic() < deadline, f"only {self.completed()} of {n} requests completed in {timeout}s"
            time.sleep(0.05)

    def _run(self, i: int) -> None:
        client = openai.OpenAI(base_url=self.url, api_key=KEY, max_retries=0, timeout=30)
        end = time.monotonic() + self.max_seconds
        n = 0
        try:
            while not self.stop.is_set() and time.monotonic() < end:
                stream = (i + n) % 2 == 0
                n += 1
                outcome = self._one(client, stream)
                with self._lock:
                    self.outcomes.append(outcome)
        finally:
            client.close()

    @staticmethod
    def _one(client: openai.OpenAI, stream: bool) -> Outcome:
        o = Outcome(started=time.monotonic(), ended=0.0, stream=stream, ok=False)
        try:
            if stream:
                with client.chat.completions.with_streaming_response.create(
                        model="chat", messages=MESSAGES, stream=True) as resp:  # type: ignore[arg-type]
                    o.request_id, o.status = resp.headers.get("x-request-id"), resp.status_code
                    finished = False
                    for chunk in resp.parse():
                        finished = finished or any(c.finish_reason for c in chunk.choices)
                    o.ok = finished  # a stream that ended without a finish reason is a failure
                    o.error = "" if finished else "stream ended without a finish_reason"
            else:
                raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
                o.request_id, o.status = raw.headers.get("x-request-id"), raw.status_code
                o.ok = bool(raw.parse().choices[0].message.content)
        except openai.APIStatusError as exc:
            o.status, o.body, o.error = exc.status_code, exc.response.text, type(exc).__name__
        except (openai.APIError, OSError) as exc:
            o.error = f"{type(exc).__name__}: {exc}"[:300]
        o.ended = time.monotonic()
        return o


def _report(name: str, load: Load, ledger: set[str], **extra: object) -> dict[str, Any]:
    done = {o.request_id for o in load.outcomes if o.ok}
    failed = [o for o in load.outcomes if not o.ok]
    figures = {"scenario": name, "sent": len(load.outcomes), "failed": len(failed), "completed": len(done),
               "completed_with_ledger_row": len(done & ledger), "ledger_requests": len(ledger), **extra}
    print("\nFLEET " + json.dumps(figures))
    return figures


def _openai_shaped(o: Outcome) -> bool:
    try:
        err = json.loads(o.body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(err, dict) and {"message", "type", "param", "code"} <= err.keys()


# --------------------------------------------------------------------------- scenarios


class TestFleet:
    def test_sigkill_under_load_fails_only_in_flight_and_loses_no_row(self, fleet: Fleet) -> None:
        """SIGKILL replica 0 under load: only requests in flight on it fail, the balancer
        routes around it, and its answered requests' rows are replayed from its journal."""
        with Load(fleet.lb_url) as load:
            load.wait_completed(40)
            killed_at = time.monotonic()
            pid = fleet.replicas[0].process.proc.pid  # type: ignore[union-attr]
            fleet.replicas[0].signal_and_wait(signal.SIGKILL, 10)
            dead_at = time.monotonic()  # reaped: its sockets are closed, later requests cannot reach it
            # Rows it had answered but not yet written: in its journal, replayed by a live replica or its restart.
            orphaned = sum(len(p.read_text().splitlines()) for p in fleet.spill.glob(f"journal-ledger-{pid}-*.jsonl"))
            down_after = fleet.wait_state("r0", "DOWN")
            load.wait_completed(load.completed() + 40)
            fleet.replicas[0].start()  # replays the journal it left
            fleet.wait_state("r0", "UP")
            load.wait_completed(load.completed() + 20)
        failed = [o for o in load.outcomes if not o.ok]
        done = {o.request_id for o in load.outcomes if o.ok}
        ledger = fleet.wait_ledger(done)
        _report("sigkill", load, ledger, lb_marked_down_after_s=round(down_after, 2), journal_rows_at_kill=orphaned)
        assert down_after < 2.0, "HAProxy (inter 300ms, fall 2) did not mark the dead replica down in time"
        assert not list(fleet.spill.glob(f"journal-ledger-{pid}-*")), "the dead replica's journal was not replayed"
        assert all(o.started <= dead_at for o in failed), [(round(o.started - killed_at, 3), o.status, o.error, o.body[:200])
                                                           for o in failed]
        assert len(failed) <= CLIENTS  # at most what was in flight
        # Cut mid-stream (200 then a dropped connection), or no answer at all (a dropped connection, a 502).
        assert all(o.status in (None, 200, 502) and o.ended >= killed_at for o in failed), [(o.status, o.error) for o in failed]
        assert done <= ledger, f"{len(done - ledger)} answered requests have no ledger row"
        assert None not in done

    def test_rolling_restart_fails_nothing_and_loses_no_row(self, fleet: Fleet) -> None:
        """SIGTERM each replica in turn, start it again: zero failed requests, zero lost rows."""
        with Load(fleet.lb_url) as load:
            load.wait_completed(30)
            for i, replica in enumerate(fleet.replicas):
                replica.signal_and_wait(signal.SIGTERM, 30)
                replica.start()
                fleet.wait_state(f"r{i}", "UP")
                load.wait_completed(load.completed() + 20)
        failed = [o for o in load.outcomes if not o.ok]
        done = {o.request_id for o in load.outcomes if o.ok}
        ledger = fleet.wait_ledger(done)
        _report("rolling_restart", load, ledger)
        assert not failed, [(o.status, o.error, o.body[:200]) for o in failed[:5]]
        assert done <= ledger, f"{len(done - ledger)} answered requests have no ledger row"

    def test_redis_blip_answers_openai_shaped_503s_and_recovers(self, fleet: Fleet) -> None:
        """Redis down ~3 s: our 503 store_unavailable (never a 500 nor HAProxy's page), /readyz
        stays 200 (degraded) so the pool is not emptied, and requests succeed again after."""
        with Load(fleet.lb_url) as load:
            load.wait_completed(30)
            _stop(fleet.redis[-1])  # the test's own redis-server, SIGKILLed
            blip_start = time.monotonic()
            deadline = blip_start + 10
            while not any(o.status == 503 for o in load.outcomes[-50:]):  # the blip is seen
                assert time.monotonic() < deadline, "no 503 while Redis is down"
                time.sleep(0.05)
            with _OPENER.open(f"http://127.0.0.1:{fleet.replicas[1].port}/readyz", timeout=5) as r:
                ready = json.loads(r.read())
            states = fleet.server_states()
            while time.monotonic() < blip_start + 3:
                time.sleep(0.05)
            fleet.redis.append(_start_redis(fleet.redis_dir, fleet.redis_port))
            recovered_at = time.monotonic()
            n = load.completed()
            load.wait_completed(n + 40, timeout=30)
        failed = [o for o in load.outcomes if not o.ok]
        done = {o.request_id for o in load.outcomes if o.ok}
        ledger = fleet.wait_ledger(done)
        ok_after = [o for o in load.outcomes if o.ok and o.started > recovered_at + 1]
        _report("redis_blip", load, ledger, blip_s=round(recovered_at - blip_start, 2))
        assert ready["status"] == "degraded" and any("state store" in p for p in ready["problems"]), ready
        assert all(s.startswith("UP") for s in states.values()), states
        assert failed and all(o.status == 503 and _openai_shaped(o) for o in failed), \
            [(o.status, o.error, o.body[:200]) for o in failed if not (o.status == 503 and _openai_shaped(o))][:5]
        assert {json.loads(o.body)["error"]["code"] for o in failed} == {"store_unavailable"}
        assert ok_after, "no request succeeded after Redis came back"
        assert done <= ledger

    def test_postgres_connections_terminated_lose_no_row(self, fleet: Fleet) -> None:
        """pg_terminate_backend on every connection of the test database, twice, under load
        (the reconnect path of a PostgreSQL restart): no answered request loses its row."""
        import psycopg

        dbname = fleet.pg_url.rsplit("/", 1)[1]
        terminated = 0
        with Load(fleet.lb_url) as load:
            load.wait_completed(30)
            for _ in range(2):
                with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
                    terminated += len(conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                        (dbname,)).fetchall())
                load.wait_completed(load.completed() + 30)
        failed = [o for o in load.outcomes if not o.ok]
        done = {o.request_id for o in load.outcomes if o.ok}
        ledger = fleet.wait_ledger(done)
        _report("postgres_terminate", load, ledger, backends_terminated=terminated)
        assert terminated > 0
        assert not failed, [(o.status, o.error, o.body[:200]) for o in failed[:5]]
        assert done <= ledger, f"{len(done - ledger)} answered requests have no ledger row"


def test_haproxy_without_replicas_answers_openai_shaped_json(tmp_path: Path) -> None:
    """No replica up: HAProxy's own 503 is the JSON of recipes/fleet/errors/503.http."""
    haproxy = _need("haproxy")
    lb, stats = free_port(), free_port()
    env = {"FLEET_LB_PORT": str(lb), "FLEET_STATS_PORT": str(stats), "FLEET_ERRORS": str(FLEET_DIR / "errors"),
           **{f"FLEET_R{i}": f"127.0.0.1:{free_port()}" for i in range(3)}}
    with managed_process([haproxy, "-db", "-f", str(FLEET_DIR / "haproxy.cfg")],
                         ready_url=f"http://127.0.0.1:{stats}/stats", env=env, name="haproxy"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{lb}/v1", api_key=KEY, max_retries=0, timeout=10)
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="chat", messages=MESSAGES)  # type: ignore[arg-type]
        client.close()
    assert exc.value.status_code == 503
    err = exc.value.response.json()["error"]
    assert err["code"] == "service_unavailable" and err["type"] == "server_error" and "replica" in err["message"]
