#!/usr/bin/env python3
"""A fleet on one machine: 3 `asgi-llm serve` replicas behind HAProxy, with a private
Redis, a fresh PostgreSQL database and a fake upstream — and the failures to try on it.

    python recipes/fleet/fleet.py up                 # start everything (state in $FLEET_STATE)
    python recipes/fleet/fleet.py load --seconds 20  # SDK clients through HAProxy; counts at the end
    python recipes/fleet/fleet.py kill 0             # SIGKILL replica 0 (run while `load` runs)
    python recipes/fleet/fleet.py start 0            # start it again (replays its journal)
    python recipes/fleet/fleet.py restart 1          # SIGTERM (drain), wait, start again
    python recipes/fleet/fleet.py rolling            # restart 0, 1, 2 in turn
    python recipes/fleet/fleet.py redis-blip --seconds 3
    python recipes/fleet/fleet.py pg-terminate       # pg_terminate_backend every connection of the database
    python recipes/fleet/fleet.py ledger             # ledger rows vs the requests `load` saw completed
    python recipes/fleet/fleet.py status | down

Needs: haproxy, redis-server, a PostgreSQL you may create a database in ($FLEET_PG,
default ``postgresql://postgres@127.0.0.1:5432``), and asgi-llm with [dev] installed
(the openai SDK, psycopg). See README.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATE = Path(os.environ.get("FLEET_STATE", "/tmp/asgi-llm-fleet"))
PG = os.environ.get("FLEET_PG", "postgresql://postgres@127.0.0.1:5432")
KEY = "sk-fleet-walkthrough-0123456789"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def state() -> dict:
    return json.loads((STATE / "fleet.json").read_text())


def save(st: dict) -> None:
    (STATE / "fleet.json").write_text(json.dumps(st, indent=2))


def spawn(name: str, args: list[str], env: dict | None = None) -> int:
    log = open(STATE / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=STATE,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    return proc.pid


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with OPENER.open(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {timeout}s (logs in {STATE})")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_replica(st: dict, i: int) -> None:
    r = st["replicas"][i]
    r["pid"] = spawn(f"replica-{i}", [sys.executable, "-m", "asgi_llm.cli", "serve", "--config", str(STATE / "recipe.yaml"),
                                      "--port", str(r["port"]), "--log-level", "warning"])
    save(st)
    wait_http(f"http://127.0.0.1:{r['port']}/healthz")
    print(f"replica {i} up on :{r['port']} (pid {r['pid']})")


def start_redis(st: dict) -> None:
    st["redis_pid"] = spawn("redis", ["redis-server", "--port", str(st["redis_port"]), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(STATE)])
    save(st)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", st["redis_port"])) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def cmd_up(_: argparse.Namespace) -> None:
    import psycopg

    for tool in ("haproxy", "redis-server"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install -y {tool.split('-')[0]})")
    STATE.mkdir(parents=True, exist_ok=True)
    db = "asgi_llm_fleet_" + uuid.uuid4().hex[:8]
    with psycopg.connect(PG + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    st = {"db": db, "redis_port": free_port(), "upstream_port": free_port(), "lb_port": int(os.environ.get("FLEET_LB_PORT", 8080)),
          "stats_port": free_port(), "replicas": [{"port": free_port()} for _ in range(3)]}
    save(st)
    start_redis(st)
    st["upstream_pid"] = spawn("upstream", [sys.executable, "-m", "asgi_llm.testing.fake_upstream", "--port", str(st["upstream_port"]),
                                            "--models", "gpt-4o-mini"])
    wait_http(f"http://127.0.0.1:{st['upstream_port']}/health")
    # Slow streams (~0.4 s), so some are always in flight when a replica goes.
    req = urllib.request.Request(f"http://127.0.0.1:{st['upstream_port']}/_fake/faults", method="POST",
                                 data=json.dumps([{"kind": "chunk_delay", "delay_s": 0.06, "times": None, "match": {"stream": True}},
                                                  {"kind": "delay", "delay_s": 0.15, "times": None, "match": {"stream": False}}]).encode(),
                                 headers={"content-type": "application/json"})
    OPENER.open(req, timeout=5).close()
    recipe = (HERE / "fleet.yaml").read_text()
    (STATE / "recipe.yaml").write_text(recipe)
    os.environ.update(fleet_env(st))
    for i in range(3):
        start_replica(st, i)
    st["haproxy_pid"] = spawn("haproxy", ["haproxy", "-db", "-f", str(HERE / "haproxy.cfg")], fleet_env(st))
    save(st)
    wait_http(f"http://127.0.0.1:{st['lb_port']}/healthz")
    print(f"HAProxy on http://127.0.0.1:{st['lb_port']}/v1 (key {KEY}), stats http://127.0.0.1:{st['stats_port']}/stats")


def fleet_env(st: dict) -> dict[str, str]:
    return {"FLEET_LB_PORT": str(st["lb_port"]), "FLEET_STATS_PORT": str(st["stats_port"]), "FLEET_ERRORS": str(HERE / "errors"),
            **{f"FLEET_R{i}": f"127.0.0.1:{r['port']}" for i, r in enumerate(st["replicas"])},
            "FLEET_UPSTREAM": f"http://127.0.0.1:{st['upstream_port']}/v1",
            "FLEET_REDIS": f"redis://127.0.0.1:{st['redis_port']}/0", "FLEET_DATABASE": f"{PG}/{st['db']}",
            "FLEET_SPILL": str(STATE / "spill"), "FLEET_KEY": KEY}


def cmd_load(args: argparse.Namespace) -> None:
    import openai

    st = state()
    url = f"http://127.0.0.1:{st['lb_port']}/v1"
    lock, done, failed = threading.Lock(), [], []
    end = time.monotonic() + args.seconds

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30)
        n = 0
        while time.monotonic() < end:
            n += 1
            try:
                if (i + n) % 2:
                    with c.chat.completions.with_streaming_response.create(
                            model="chat", messages=[{"role": "user", "content": "one two three four"}], stream=True) as resp:
                        rid = resp.headers.get("x-request-id")
                        ok = any(ch.choices and ch.choices[0].finish_reason for ch in resp.parse())
                else:
                    raw = c.chat.completions.with_raw_response.create(model="chat", messages=[{"role": "user", "content": "hi"}])
                    rid, ok = raw.headers.get("x-request-id"), bool(raw.parse().choices)
                with lock:
                    (done if ok else failed).append(rid or "?")
            except openai.APIStatusError as exc:
                with lock:
                    failed.append(f"{exc.status_code} {exc.response.text[:160]}")
            except openai.APIError as exc:
                with lock:
                    failed.append(f"{type(exc).__name__}")
        c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(STATE / "completed.txt", "a") as f:
        f.writelines(r + "\n" for r in done)
    kinds: dict[str, int] = {}
    for x in failed:
        kinds[x] = kinds.get(x, 0) + 1
    print(json.dumps({"sent": len(done) + len(failed), "completed": len(done), "failed": len(failed),
                      "failures": dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:5])}, indent=2))


def cmd_kill(args: argparse.Namespace) -> None:
    st = state()
    os.kill(st["replicas"][args.replica]["pid"], signal.SIGKILL)
    print(f"replica {args.replica} SIGKILLed; HAProxy marks it DOWN within ~0.6 s (inter 300ms x fall 2)")


def cmd_start(args: argparse.Namespace) -> None:
    st = state()
    os.environ.update(fleet_env(st))
    start_replica(st, args.replica)


def restart(st: dict, i: int) -> None:
    pid = st["replicas"][i]["pid"]
    os.kill(pid, signal.SIGTERM)
    t = time.monotonic()
    while alive(pid) and time.monotonic() - t < 60:
        time.sleep(0.05)
    print(f"replica {i} drained and exited in {time.monotonic() - t:.1f}s")
    start_replica(st, i)
    time.sleep(1.0)  # HAProxy's rise (2 x 300 ms) before the next one goes


def cmd_restart(args: argparse.Namespace) -> None:
    st = state()
    os.environ.update(fleet_env(st))
    restart(st, args.replica)


def cmd_rolling(_: argparse.Namespace) -> None:
    st = state()
    os.environ.update(fleet_env(st))
    for i in range(3):
        restart(st, i)


def cmd_redis_blip(args: argparse.Namespace) -> None:
    st = state()
    os.kill(st["redis_pid"], signal.SIGKILL)
    print(f"Redis down for {args.seconds}s: clients get 503 store_unavailable; /readyz stays 200 (degraded)")
    with OPENER.open(f"http://127.0.0.1:{st['replicas'][0]['port']}/readyz", timeout=5) as r:
        print("  /readyz:", r.read().decode())
    time.sleep(args.seconds)
    start_redis(st)
    print("Redis back; the replicas reconnect by themselves")


def cmd_pg_terminate(_: argparse.Namespace) -> None:
    import psycopg

    st = state()
    with psycopg.connect(PG + "/postgres", autocommit=True) as conn:
        n = len(conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (st["db"],)).fetchall())
    print(f"terminated {n} PostgreSQL connections of {st['db']} (the reconnect path of a server restart)")


def cmd_ledger(_: argparse.Namespace) -> None:
    import psycopg

    st = state()
    done = set((STATE / "completed.txt").read_text().split()) if (STATE / "completed.txt").exists() else set()
    with psycopg.connect(f"{PG}/{st['db']}") as conn:
        rows = {r[0] for r in conn.execute("SELECT DISTINCT request_id FROM usage_ledger")}
    print(json.dumps({"completed_requests": len(done), "with_ledger_row": len(done & rows), "missing": len(done - rows)}))


def cmd_status(_: argparse.Namespace) -> None:
    st = state()
    with OPENER.open(f"http://127.0.0.1:{st['stats_port']}/stats;csv", timeout=5) as r:
        for line in r.read().decode().splitlines():
            parts = line.split(",")
            if len(parts) > 17 and parts[0] == "gateways":
                print(parts[1], parts[17])


def cmd_down(_: argparse.Namespace) -> None:
    import psycopg

    st = state()
    pids = [st.get("haproxy_pid"), *(r.get("pid") for r in st["replicas"]), st.get("upstream_pid"), st.get("redis_pid")]
    for pid in pids:
        if pid and alive(pid):
            os.kill(pid, signal.SIGTERM)
    with psycopg.connect(PG + "/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{st["db"]}" WITH (FORCE)')
    shutil.rmtree(STATE, ignore_errors=True)
    print("fleet stopped")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("up", "rolling", "pg-terminate", "ledger", "status", "down"):
        sub.add_parser(name)
    load = sub.add_parser("load")
    load.add_argument("--seconds", type=float, default=20)
    load.add_argument("--clients", type=int, default=12)
    for name in ("kill", "start", "restart"):
        sub.add_parser(name).add_argument("replica", type=int, choices=range(3))
    sub.add_parser("redis-blip").add_argument("--seconds", type=float, default=3)
    args = p.parse_args()
    globals()["cmd_" + args.cmd.replace("-", "_")](args)


if __name__ == "__main__":
    main()
