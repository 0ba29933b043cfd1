"""Start the processes a benchmark row needs: the mock upstream, the passthrough
floor, the gateway variants and (optionally) LiteLLM — each pinned with ``taskset``.

Pinning on a 2-core machine: every server under test runs alone on core
:data:`SERVER_CPU`; the mock upstream and the load generator share core
:data:`LOAD_CPU`. The "direct" row measures the mock's ceiling under exactly that
pinning, so a reader can see whether the mock (rather than the row) saturates first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import yaml

from asgi_llm.testing.processes import free_port, managed_process

__all__ = [
    "LOAD_CPU",
    "ROWS",
    "SERVER_CPU",
    "NodeFleet",
    "Row",
    "RowServer",
    "client_key",
    "find_litellm",
    "full_recipe",
    "mock_upstream",
    "online_nodes",
    "pin",
    "row_info",
    "split_row",
    "start_row",
]

SERVER_CPU = 0
LOAD_CPU = 1 if (os.cpu_count() or 1) > 1 else 0
REPO = Path(__file__).resolve().parent.parent
CLIENT_KEY = "sk-bench-" + "5f0c2a9e7b1d4c3a8e6f9b2d1c7a4e3f" * 2
"""Sent by every load generator; declared in the full recipe and as LiteLLM's master key."""
ADMIN_KEY = "sk-bench-admin-" + "9d3e7a1c5b2f4e8a" * 2
"""Declared as ``auth.admin_keys`` only in recipes with nodes: it mints their enrollment tokens."""
NODE_MODEL = "chat"
"""The model every benchmark node serves: the load generator's model, and the mock's."""


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    name: str
    title: str
    what: str


ROWS: dict[str, Row] = {r.name: r for r in [
    Row("direct", "direct → mock", "wrk straight to the mock upstream: the mock's own ceiling (mock + wrk share one core)"),
    Row("passthrough", "bare ASGI passthrough", "uvicorn + uvloop + httptools + aiohttp, no framework: the Python floor"),
    Row("dispatch", "asgi-llm dispatch only", "build_gateway(recipe, exclude=every optional layer)"),
    Row("full", "asgi-llm full pipeline", "build_gateway(recipe) via `asgi-llm serve`: every layer the build has, memory/SQLite stores"),
    Row("full-shared", "asgi-llm full, Redis + PostgreSQL", "the full pipeline with shared stores"),
    Row("litellm", "LiteLLM proxy", "litellm --num_workers 1, production settings, same mock (optional)"),
]}


BASELINE_ROWS = ("dispatch", "full", "full-shared")
"""Rows that can also run from an earlier commit, as ``<row>@<git ref>``."""


def split_row(name: str) -> tuple[str, str | None]:
    """``"full@119e117"`` → ``("full", "119e117")``; ``"full"`` → ``("full", None)``."""
    base, _, ref = name.partition("@")
    return base, ref or None


def row_info(name: str) -> Row:
    """The table entry of a row, including ``<row>@<ref>`` baseline rows.

    Raises ``KeyError`` for a row that does not exist.
    """
    base, ref = split_row(name)
    if ref is None:
        return ROWS[name]
    if base not in BASELINE_ROWS:
        raise KeyError(name)
    row = ROWS[base]
    return Row(name, f"{row.title} at {ref}",
               f"the {base} row served by the asgi_llm package of commit `{ref}` (same recipe, same run): before/after")


def _check_imports_from(baseline: Path, env: dict[str, str]) -> None:
    """Refuse a baseline row that would import this tree's ``asgi_llm`` instead of the ref's."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import asgi_llm; print(asgi_llm.__file__)"], env=env, cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip().startswith(str(baseline)):
        raise Skip(f"the baseline package would not be the one imported ({out.stdout.strip() or out.stderr.strip()[-200:]})")


def checkout_package(ref: str, workdir: Path, *, repo: Path = REPO) -> Path:
    """Extract ``asgi_llm/`` as it was at git ``ref`` of ``repo`` into ``workdir``; return
    the folder to put first on ``PYTHONPATH`` so a row's process imports that version
    instead of this one. Raises :class:`Skip` when ``ref`` is unknown or git is missing."""
    import subprocess

    dest = workdir / f"baseline-{ref.replace('/', '_')}"
    if (dest / "asgi_llm").is_dir():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    try:
        archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", ref, "asgi_llm"],
                                 check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise Skip(f"cannot check out {ref}: {detail.decode(errors='replace').strip() or exc}") from None
    return dest


def client_key() -> str:
    """The bearer key every load generator sends (the full row's recipe declares it)."""
    return CLIENT_KEY


def pin(cpu: int, args: Sequence[str]) -> list[str]:
    """Prefix ``taskset -c cpu`` when taskset exists (otherwise run unpinned)."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > cpu:
        return ["taskset", "-c", str(cpu), *args]
    return list(args)


@dataclass
class RowServer:
    """A started row: where to send load, which process to watch, what it contains."""

    row: str
    url: str
    pid: int | None = None
    layers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fleet: NodeFleet | None = None
    """The nodes enrolled with this row (``recipe_kwargs={"nodes": N}``), else None."""


@contextlib.contextmanager
def mock_upstream(*, faults: Sequence[dict[str, Any]] = (), cpu: int = LOAD_CPU) -> Iterator[str]:
    """The fast fake OpenAI upstream, pinned; yields its root URL."""
    port = free_port()
    args = [sys.executable, "-m", "asgi_llm.testing.fake_upstream", "--host", "127.0.0.1", "--port", str(port),
            "--name", "mock", "--models", "chat", "--exit-with-parent"]
    for fault in faults:
        args += ["--fault", json.dumps(fault)]
    with managed_process(pin(cpu, args), ready_url=f"http://127.0.0.1:{port}/health", name="bench-mock"):
        yield f"http://127.0.0.1:{port}"


def _base_recipe(mock: str, *, targets: int = 2, models: int = 1, nodes: int = 0) -> dict[str, Any]:
    """Providers and models. With ``nodes``, the benchmark model (``chat``) is served by
    enrolled nodes only (``{nodes: any}``, ``least-busy`` as recipes/node.md recommends),
    so every request goes through node resolution; the nodes themselves are enrolled
    once the gateway runs (:func:`online_nodes`)."""
    providers = {"mock": {"base_url": f"{mock}/v1", "api_keys": ["sk-upstream"]},
                 "mock-b": {"base_url": f"{mock}/v1", "api_keys": ["sk-upstream"]}}
    names = ["chat"] + [f"chat-{i}" for i in range(1, models)]
    price = {"input": 0.15, "output": 0.60}
    model_cfg: dict[str, Any] = {}
    for name in names:
        tlist = [{"provider": "mock" if i % 2 == 0 else "mock-b", "model": "chat", "price": price} for i in range(targets)]
        model_cfg[name] = {"strategy": "priority", "targets": tlist}
    if nodes:
        model_cfg[NODE_MODEL] = {"strategy": "least-busy", "targets": [{"nodes": "any", "model": NODE_MODEL, "price": price}]}
    return {"providers": providers, "models": model_cfg}


BENCH_REDIS = os.environ.get("ASGI_LLM_BENCH_REDIS", "redis://127.0.0.1:6379/11")
BENCH_PG_ADMIN = os.environ.get("ASGI_LLM_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
BENCH_PG_DB = "asgi_llm_bench"


def shared_stores() -> dict[str, str]:
    """Redis + PostgreSQL for the full-shared row: a fresh Redis db and a bench database
    (created if missing, emptied). Raises :class:`Skip` when either is unreachable."""
    try:
        import psycopg
        import redis
    except ImportError as exc:  # pragma: no cover - the dev extras install both
        raise Skip(f"needs the redis and postgres extras ({exc})") from None
    try:
        client = redis.Redis.from_url(BENCH_REDIS, socket_connect_timeout=2)
        client.flushdb()
        client.close()
    except redis.RedisError as exc:
        raise Skip(f"Redis unreachable at {BENCH_REDIS}: {exc}") from None
    host = BENCH_PG_ADMIN.split("://", 1)[1]
    user, _, hostport = host.rpartition("@")
    hostname, _, port = hostport.partition(":")
    dsn = f"host={hostname} port={port or 5432} user={user or 'postgres'} dbname=postgres connect_timeout=3"
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{BENCH_PG_DB}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{BENCH_PG_DB}"')
    except psycopg.Error as exc:
        raise Skip(f"PostgreSQL unreachable at {BENCH_PG_ADMIN}: {exc}") from None
    return {"state": BENCH_REDIS, "cache": BENCH_REDIS, "ledger": f"{BENCH_PG_ADMIN}/{BENCH_PG_DB}"}


def _ledger_path(workdir: Path, nodes: int) -> Path:
    """The SQLite ledger: a fresh file per server. Node records live there (nodes left
    offline by an earlier row would still be scanned and their names would clash), and a
    ``<row>@<ref>`` baseline of an older schema refuses a file a newer row migrated."""
    fd, name = tempfile.mkstemp(dir=workdir, prefix=f"ledger-{nodes}-nodes-", suffix=".db")
    os.close(fd)
    return Path(name)


def full_recipe(mock: str, workdir: Path, *, targets: int = 2, models: int = 1, keys: int = 1, nodes: int = 0,
                shared: bool = False) -> tuple[dict[str, Any], list[str]]:
    """The "full pipeline" recipe: auth + limits + cache + failover (2 targets) + stores.

    ``nodes`` > 0 routes the benchmark model to enrolled nodes (see :func:`_base_recipe`)
    and adds the admin key that mints their enrollment tokens.

    Sections this build refuses (it raises ``ConfigError`` for settings it cannot
    enforce yet) are dropped one by one and reported, so the row picks up each layer
    as soon as the build accepts its settings — and never claims a layer it lacks.
    """
    from asgi_llm.config import ConfigError, config_from_dict
    from asgi_llm.stack import build_gateway

    recipe = _base_recipe(mock, targets=targets, models=models, nodes=nodes)
    big = 10**9
    recipe["stores"] = (shared_stores() if shared else
                        {"state": "memory://", "cache": "memory://", "ledger": f"sqlite:///{_ledger_path(workdir, nodes)}"})
    recipe["auth"] = {"keys": [{"key": CLIENT_KEY if i == 0 else f"{CLIENT_KEY}-{i}", "org": f"org-{i % 10}",
                                "limits": {"rpm": big, "tpm": big}} for i in range(keys)]}
    if nodes:
        recipe["auth"]["admin_keys"] = [ADMIN_KEY]
        # The nodes point at the local mock, and their owner org shares them with the
        # client orgs, which must consent (the gateway's default refuses both).
        recipe["nodes"] = {
            "allowed_networks": ["127.0.0.1/32"],
            "accept_shared": {f"org-{i}": [{"owner": "bench-nodes", "max_price": {"input": 1000, "output": 1000}}]
                              for i in range(min(keys, 10))},
        }
    recipe["limits"] = {"org": {"rpm": big, "tpm": big}}
    recipe["cache"] = {"enabled": True, "ttl_s": 300}
    dropped: list[str] = []
    for _ in range(10):
        try:
            build_gateway(config_from_dict(recipe, environ={}))
            break
        except ConfigError as exc:
            sections = {path.split(".")[0].split("[")[0] for path, _ in exc.problems}
            removable = sections & {"auth", "limits", "cache", "stores"}
            if not removable:
                raise
            for s in sorted(removable):
                recipe.pop(s)
                dropped.append(f"{s} (build refuses: {next(m for p, m in exc.problems if p.startswith(s))})")
    return recipe, dropped


def write_recipe(recipe: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@dataclass
class NodeFleet:
    """Direct-mode nodes enrolled with a running gateway and kept online by heartbeats
    sent from the benchmark process (see :func:`online_nodes` for why no agents)."""

    gateway: str
    credentials: list[str] = field(default_factory=list)
    interval_s: float = 5.0
    heartbeats: int = 0
    failures: int = 0

    def heartbeat(self, http: httpx2.Client, credential: str) -> bool:
        """One ``POST /nodes/heartbeat`` with the body of an idle, ready agent."""
        try:
            ok = http.post("/nodes/heartbeat", json={"status": "ready", "load": {"in_flight": 0.0}},
                           headers={"authorization": f"Bearer {credential}"}).status_code == 200
        except httpx2.HTTPError:
            ok = False
        self.heartbeats += 1
        self.failures += not ok
        return ok

    def keep_alive(self, http: httpx2.Client, stop: threading.Event) -> None:
        """Heartbeat every node once per interval, spread evenly over it: real agents are
        not in phase, and a burst of N heartbeats would show up as latency spikes."""
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {LOAD_CPU})  # this thread only: core 0 stays the row's alone
        gap = self.interval_s / max(1, len(self.credentials))
        while True:
            for credential in self.credentials:
                if stop.wait(gap):
                    return
                self.heartbeat(http, credential)

    def describe(self) -> str:
        """How the nodes were enrolled and kept online (for the results)."""
        return ("direct-mode nodes at the mock, enrolled over HTTP by the benchmark process "
                f"(POST /admin/enrollment-tokens → POST /nodes/enroll, one token each) and kept online by "
                f"POST /nodes/heartbeat every {self.interval_s:g} s per node from one thread on core {LOAD_CPU}")


def _json_ok(resp: httpx2.Response) -> dict[str, Any]:
    if resp.status_code not in (200, 201):
        raise RuntimeError(f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {resp.text[:300]}")
    body: dict[str, Any] = resp.json()
    return body


@contextlib.contextmanager
def online_nodes(gateway: str, mock: str, count: int) -> Iterator[NodeFleet]:
    """Enroll ``count`` direct-mode nodes serving :data:`NODE_MODEL` at ``mock`` and keep
    them online for the ``with`` block.

    It is the real enrollment flow minus the agent processes: an admin mints a one-time
    token, the node exchanges it for a credential (``mode: direct``) and heartbeats at
    the interval the gateway hands back. A hundred ``asgi-llm node join`` processes would
    not fit on 2 cores beside the row, and each would add its own proxy hop; with the
    mock as every node's URL (it ignores the gateway's per-node call secret) the row
    measures what N nodes cost the gateway — records scanned per request, one
    connection pool per node, heartbeats handled — and nothing else.

    Yields once ``GET /admin/nodes`` shows every node online and a request for the
    model was routed to a node (``x-asgi-llm-route: node:…``).
    """
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    fleet = NodeFleet(gateway)
    with httpx2.Client(base_url=gateway, timeout=10, trust_env=False) as http:
        for i in range(count):
            token = _json_ok(http.post("/admin/enrollment-tokens", headers=admin,
                                       json={"org": "bench-nodes", "shared_with": ["*"]}))["token"]
            enrolled = _json_ok(http.post("/nodes/enroll", headers={"authorization": f"Bearer {token}"}, json={
                "name": f"bench-node-{i:03d}", "mode": "direct", "url": f"{mock}/v1", "models": [{"id": NODE_MODEL}]}))
            fleet.credentials.append(enrolled["credential"])
            fleet.interval_s = float(enrolled["heartbeat_interval_s"])
        for credential in fleet.credentials:
            fleet.heartbeat(http, credential)  # a node is online from its first heartbeat
        if fleet.failures:
            raise RuntimeError(f"{fleet.failures} of {count} first heartbeats failed")
        status = [n["status"] for n in _json_ok(http.get("/admin/nodes", headers=admin))["data"]]
        if status.count("online") != count:
            raise RuntimeError(f"expected {count} online nodes, the gateway lists {status}")
        probe = http.post("/v1/chat/completions", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                          json={"model": NODE_MODEL, "messages": [{"role": "user", "content": "which route?"}]})
        route = probe.headers.get("x-asgi-llm-route", "")
        if probe.status_code != 200 or not route.startswith("node:"):
            raise RuntimeError(f"{NODE_MODEL} is not served by a node: {probe.status_code} route {route!r} {probe.text[:200]}")
        stop = threading.Event()
        beat = threading.Thread(target=fleet.keep_alive, args=(http, stop), name="bench-node-heartbeats", daemon=True)
        beat.start()
        try:
            yield fleet
        finally:
            stop.set()
            beat.join()


def _gateway_layers(recipe: dict[str, Any], *, dispatch_only: bool) -> list[str]:
    from asgi_llm.config import config_from_dict
    from asgi_llm.stack import build_gateway

    from benchmarks.apps import OPTIONAL_LAYERS, layer_names

    exclude = OPTIONAL_LAYERS if dispatch_only else ()
    return layer_names(build_gateway(config_from_dict(recipe, environ={}), exclude=exclude))


def find_litellm(explicit: str | None = None) -> str | None:
    """``--litellm PATH`` or ``$LITELLM_BIN``; else ``/tmp/litellm-venv/bin/litellm`` if it exists."""
    for candidate in (explicit, os.environ.get("LITELLM_BIN"), "/tmp/litellm-venv/bin/litellm"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def litellm_config(mock: str) -> dict[str, Any]:
    """LiteLLM's documented production settings, no database, in front of the same mock."""
    return {
        "model_list": [{"model_name": "chat",
                        "litellm_params": {"model": "openai/chat", "api_base": f"{mock}/v1", "api_key": "sk-upstream"}}],
        "litellm_settings": {"set_verbose": False, "json_logs": True, "request_timeout": 60,
                             "turn_off_message_logging": True},
        "general_settings": {"master_key": CLIENT_KEY, "disable_spend_logs": True, "disable_error_logs": True},
    }


class Skip(Exception):
    """A row that cannot run here; the message says why."""


@contextlib.contextmanager
def start_row(row: str, mock: str, workdir: Path, *, litellm: str | None = None,
              recipe_kwargs: dict[str, Any] | None = None) -> Iterator[RowServer]:
    """Start the server for ``row`` (pinned to :data:`SERVER_CPU`) and yield it.

    ``recipe_kwargs`` go to :func:`full_recipe`; with ``nodes: N`` (full rows only) the
    row is yielded with N nodes enrolled and online (:func:`online_nodes`).
    """
    if row == "direct":
        yield RowServer(row, mock, layers=["(none: the mock itself)"])
        return
    row_info(row)  # unknown rows fail here, with the list of rows
    name, ref = split_row(row)
    pythonpath = [str(REPO)]
    env: dict[str, str] = {}
    if ref is not None:
        baseline = checkout_package(ref, workdir)
        pythonpath.insert(0, str(baseline))
        # `python -m` would put the working directory (this repository) first on
        # sys.path, ahead of PYTHONPATH, and serve this tree's package instead.
        env["PYTHONSAFEPATH"] = "1"
        _check_imports_from(baseline, {**os.environ, **env, "PYTHONPATH": os.pathsep.join(pythonpath)})
    nodes = int((recipe_kwargs or {}).get("nodes", 0))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    uvicorn = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
               "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    ready = f"{url}/healthz"
    server = RowServer(row, url)
    row = name  # from here on, a baseline row starts like its base row
    if row == "passthrough":
        args = [*uvicorn, "benchmarks.passthrough:app"]
        env["BENCH_UPSTREAM"] = mock
        server.layers = ["uvicorn + aiohttp relay"]
    elif row in ("dispatch", "full", "full-shared"):
        if nodes and row == "dispatch":
            raise ValueError("nodes need the auth layer, which the dispatch row excludes")
        recipe, dropped = full_recipe(mock, workdir, **(recipe_kwargs or {}), shared=row == "full-shared")
        if row == "dispatch":
            recipe = _base_recipe(mock, **{k: v for k, v in (recipe_kwargs or {}).items() if k in ("targets", "models")})
        path = write_recipe(recipe, workdir / f"recipe-{row}-{port}.yaml")
        server.layers = (_gateway_layers(recipe, dispatch_only=row == "dispatch") if ref is None
                         else [f"(as built by commit {ref})"])
        if row in ("full", "full-shared"):
            server.notes += [f"dropped {d}" for d in dropped]
            args = [sys.executable, "-m", "asgi_llm.cli", "serve", "--config", str(path), "--port", str(port),
                    "--log-level", "warning"]
        else:
            env["BENCH_RECIPE"] = str(path)
            args = [*uvicorn, "--factory", "benchmarks.apps:dispatch_only", "--lifespan", "on"]
    elif row == "litellm":
        if litellm is None:
            raise Skip("LiteLLM not installed (pip install 'litellm[proxy]' in its own venv; pass --litellm PATH or set LITELLM_BIN)")
        cfg = workdir / f"litellm-{port}.yaml"
        cfg.write_text(yaml.safe_dump(litellm_config(mock), sort_keys=False))
        args = [litellm, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
        env.update({"LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION", "DISABLE_ADMIN_UI": "True",
                    "NO_DOCS": "True", "LITELLM_TELEMETRY": "False"})
        ready = f"{url}/health/liveliness"
        server.layers = ["litellm proxy (FastAPI)"]
    else:
        raise ValueError(f"unknown row {row!r}; rows are {', '.join(ROWS)}")
    try:
        cm = managed_process(pin(SERVER_CPU, args), ready_url=ready, env={**env, "PYTHONPATH": os.pathsep.join(pythonpath)},
                             timeout=180 if row == "litellm" else 30, name=f"bench-{row}")
        mp = cm.__enter__()
    except RuntimeError as exc:
        if row != "litellm" and ref is None:
            raise
        tail = " ".join(str(exc).strip().splitlines()[-3:])[-300:]
        raise Skip(f"{'LiteLLM' if ref is None else row} did not start: {tail}") from None
    try:
        server.pid = mp.proc.pid
        with contextlib.ExitStack() as fleet:
            if nodes:
                server.fleet = fleet.enter_context(online_nodes(url, mock, nodes))
                server.notes.append(f"{nodes} {server.fleet.describe()}")
            yield server
    except BaseException as exc:
        if not cm.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        cm.__exit__(None, None, None)
