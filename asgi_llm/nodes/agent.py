"""The node agent: ``asgi-llm node join`` on a BYOI machine.

What it does, in order:

1. **Discovers** the engine's models (``GET {engine}/models``) and what it can tell of
   their capabilities (context length from vLLM's ``max_model_len``, llama.cpp's
   ``meta.n_ctx_train``, LM Studio / others' ``context_length``).
2. **Enrolls** once: the one-time token is exchanged for a node credential, saved in
   ``--state-dir`` (``node.json``, mode 0600). On restart the saved credential is used
   and the token is not needed again (re-enrollment is idempotent).
3. **Connects** the gateway to the engine:
   * ``direct`` — serves a small proxy (``--host``/``--port``) that forwards ``/v1/*`` to
     the engine and accepts only calls bearing the gateway's per-node secret;
   * ``tunnel`` (``--tunnel``) — dials ``ws(s)://gateway/nodes/tunnel`` and serves the
     requests the gateway multiplexes over it (streams included); reconnects with
     jittered exponential backoff. No inbound port is needed.
4. **Heartbeats** every interval with its load: requests in flight here, and the
   engine's queue depth / running requests / KV-cache use when it exposes Prometheus
   ``/metrics`` (vLLM, llama.cpp server, TGI).
5. **Drains** on SIGTERM/SIGINT (or when an admin drains the node): tells the gateway
   it is draining (it leaves routing at once), finishes what is in flight, exits 0.
   A revoked credential makes it exit with status 3.

The agent process is asyncio-only (``websockets``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import random
import re
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from asgi_llm.nodes.records import CALL_SECRET_HEADER

__all__ = ["AgentConfig", "NodeAgent", "RevokedError", "discover_models", "parse_metrics", "run_agent"]

logger = logging.getLogger("asgi_llm.nodes.agent")

EXIT_REVOKED = 3
_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "authorization",
                CALL_SECRET_HEADER, "accept-encoding"}

# Prometheus gauges → our load fields (summed over label sets), per engine family.
_METRICS: dict[str, str] = {
    "vllm:num_requests_waiting": "queue_depth",
    "vllm:num_requests_running": "running",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "llamacpp:requests_deferred": "queue_depth",
    "llamacpp:requests_processing": "running",
    "llamacpp:kv_cache_usage_ratio": "kv_cache_usage",
    "tgi_queue_size": "queue_depth",
    "tgi_batch_current_size": "running",
}
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEnaNIf]+)")


class RevokedError(Exception):
    """The gateway refused this node's credential (revoked, or unknown)."""


@dataclass
class AgentConfig:
    """``asgi-llm node join`` options."""

    gateway: str
    engine: str
    token: str | None = None
    name: str | None = None
    tunnel: bool = False
    host: str = "127.0.0.1"
    port: int = 8780
    advertise_url: str | None = None
    state_dir: Path = field(default_factory=lambda: Path.home() / ".asgi-llm-node")
    engine_key: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    price: dict[str, str] | None = None
    drain_timeout_s: float = 30.0
    heartbeat_interval_s: float | None = None


def parse_metrics(text: str) -> dict[str, float]:
    """Engine load from Prometheus text: ``queue_depth``, ``running``, ``kv_cache_usage``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line)
        if m is None or m.group(1) not in _METRICS:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        if value != value:  # NaN
            continue
        key = _METRICS[m.group(1)]
        out[key] = out.get(key, 0.0) + value
    return out


def _engine_root(engine: str) -> str:
    """``http://h:p/v1`` → ``http://h:p`` (where ``/metrics`` and ``/health`` live)."""
    return re.sub(r"/v1/?$", "", engine.rstrip("/"))


async def discover_models(client: httpx2.AsyncClient, engine: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    """The engine's models with what it reveals of their capabilities."""
    resp = await client.get(engine.rstrip("/") + "/models", headers=headers)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    out = []
    for m in data:
        if not isinstance(m, dict) or not isinstance(m.get("id"), str):
            continue
        info: dict[str, Any] = {"id": m["id"]}
        meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
        ctx = m.get("max_model_len") or m.get("context_length") or m.get("max_context_length") or meta.get("n_ctx_train")
        if isinstance(ctx, int) and ctx > 0:
            info["context_length"] = ctx
        lowered = m["id"].lower()
        if any(tag in lowered for tag in ("embed", "e5", "bge", "gte", "minilm")) or m.get("type") == "embeddings":
            info["embeddings"] = True
        if isinstance(m.get("owned_by"), str):
            info["owned_by"] = m["owned_by"]
        out.append(info)
    return out


class NodeAgent:
    """One agent: enrollment, heartbeats, the direct proxy or the tunnel, draining."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state: dict[str, Any] = {}
        self.models: list[dict[str, Any]] = []
        self.in_flight = 0
        self.draining = False
        self.enrolled = asyncio.Event()
        self.stop = asyncio.Event()
        self.exit_code = 0
        self._client: httpx2.AsyncClient | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._state_file: Path | None = None
        self._background: list[asyncio.Task[Any]] = []  # drains: awaited by run(), never left behind

    # ----------------------------------------------------------------- plumbing

    @property
    def client(self) -> httpx2.AsyncClient:
        if self._client is None:
            self._client = httpx2.AsyncClient(timeout=httpx2.Timeout(None, connect=5), trust_env=False)
        return self._client

    @property
    def mode(self) -> str:
        return "tunnel" if self.config.tunnel else "direct"

    @property
    def gateway(self) -> str:
        return self.config.gateway.rstrip("/").removesuffix("/v1")

    def engine_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.config.engine_key}"} if self.config.engine_key else {}

    def advertised_url(self) -> str | None:
        if self.config.tunnel:
            return None
        if self.config.advertise_url:
            return self.config.advertise_url.rstrip("/")
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"http://{host}:{self.config.port}/v1"

    @property
    def state_file(self) -> Path:
        """Where this node's credential is kept (see :meth:`_pick_state_file`)."""
        if self._state_file is None:
            self._state_file = self._pick_state_file()
        return self._state_file

    def _pick_state_file(self) -> Path:
        """``node.json``, unless it holds *another* node than ``--name`` asks for: then
        ``node-<name>.json``. So ``--token T --name B`` where node ``A`` is saved enrolls a
        new node ``B`` (a new token means a new node) instead of silently serving as ``A``,
        and several agents (one per engine or GPU) share one state directory."""
        default = self.config.state_dir / "node.json"
        name = self.config.name
        if not name:
            return default
        own = self.config.state_dir / f"node-{_safe_name(name)}.json"
        if own.exists():
            return own
        saved = _read_state(default)
        if saved is None or saved.get("name") in (None, name):
            return default
        logger.info("%s holds node %r; node %r keeps its credential in %s", default, saved.get("name"), name, own)
        return own

    def _save_state(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.state, f, indent=2)
        os.replace(tmp, self.state_file)

    def _advertisement(self) -> dict[str, Any]:
        return {"mode": self.mode, "url": self.advertised_url(), "models": self.models}

    # ----------------------------------------------------------------- enrollment

    async def enroll(self) -> None:
        """Use the saved credential if there is one for this gateway; else spend the token."""
        saved = _read_state(self.state_file)
        if saved is not None and self.config.name and saved.get("name") not in (None, self.config.name):
            raise SystemExit(  # only a hand-edited file gets here: refuse rather than become another node
                f"{self.state_file} holds node {saved.get('name')!r}, not {self.config.name!r}: run with "
                f"--name {saved.get('name')} to serve as that node, or use another --state-dir")
        if saved is not None:
            if saved.get("gateway") == self.gateway and saved.get("credential"):
                self.state = saved
                try:
                    await self.register()
                    await self.heartbeat()
                except RevokedError:
                    if not self.config.token:
                        raise
                    logger.warning("saved credential refused; enrolling again with the token")
                else:
                    logger.info("re-using the saved credential of node %s (%s)%s", saved.get("name"), saved.get("node_id"),
                                "; the --token was not spent (pass a different --name to enroll another node)"
                                if self.config.token else "")
                    self.enrolled.set()
                    return
        if not self.config.token:
            others = sorted(p.name for p in self.config.state_dir.glob("node*.json")) if self.config.state_dir.is_dir() else []
            hint = f" (saved here: {', '.join(others)}; pick one with --name)" if others else ""
            raise SystemExit(f"no saved credential in {self.state_file} and no --token: ask an admin for an enrollment token{hint}")
        name = self.config.name or socket.gethostname().split(".")[0]
        body = {"name": name, **self._advertisement(), "labels": self.config.labels}
        if self.config.price:
            body["price"] = self.config.price
        resp = await self.client.post(self.gateway + "/nodes/enroll", json=body,
                                      headers={"authorization": f"Bearer {self.config.token}"})
        if resp.status_code != 201:
            raise SystemExit(f"enrollment refused: HTTP {resp.status_code}: {_error_message(resp)}")
        data = resp.json()
        self.state = {"gateway": self.gateway, **{k: data[k] for k in ("node_id", "name", "org", "credential", "call_secret")}}
        self._save_state()
        logger.info("enrolled as node %s (%s) of org %s", data["name"], data["node_id"], data["org"])
        if self.config.heartbeat_interval_s is None:
            self.config.heartbeat_interval_s = float(data.get("heartbeat_interval_s", 5))
        await self.heartbeat()
        self.enrolled.set()

    # ----------------------------------------------------------------- heartbeats

    async def engine_load(self) -> dict[str, float]:
        load: dict[str, float] = {"in_flight": float(self.in_flight)}
        try:
            resp = await self.client.get(_engine_root(self.config.engine) + "/metrics", headers=self.engine_headers(),
                                         timeout=2)
            if resp.status_code == 200:
                load.update(parse_metrics(resp.text))
        except httpx2.HTTPError:
            pass
        return load

    async def register(self) -> None:
        """Re-register with the saved credential: where the gateway should call us now
        (heartbeats cannot change it). The gateway checks and audits it."""
        resp = await self.client.post(self.gateway + "/nodes/register", json=self._advertisement(),
                                      headers={"authorization": f"Bearer {self.state['credential']}"}, timeout=10)
        if resp.status_code == 401:
            raise RevokedError(_error_message(resp))
        if resp.status_code >= 400:
            raise SystemExit(f"re-registration refused: HTTP {resp.status_code}: {_error_message(resp)}")

    async def heartbeat(self) -> dict[str, Any]:
        body = {"status": "draining" if self.draining else "ready", "load": await self.engine_load(), **self._advertisement()}
        resp = await self.client.post(self.gateway + "/nodes/heartbeat", json=body,
                                      headers={"authorization": f"Bearer {self.state['credential']}"}, timeout=10)
        if resp.status_code == 401:
            raise RevokedError(_error_message(resp))
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        if self.config.heartbeat_interval_s is None:
            self.config.heartbeat_interval_s = float(data.get("heartbeat_interval_s", 5))
        if data.get("state") == "draining" and not self.draining:
            logger.info("the gateway asked this node to drain")
            self.begin_drain()
        return data

    async def heartbeat_loop(self) -> None:
        rediscover = 0
        while not self.stop.is_set():
            await _sleep_or(self.stop, self.config.heartbeat_interval_s or 5)
            if self.stop.is_set():
                return
            rediscover += 1
            try:
                if rediscover % 12 == 0:
                    self.models = await discover_models(self.client, self.config.engine, self.engine_headers()) or self.models
                await self.heartbeat()
            except RevokedError as exc:
                logger.error("the gateway refused this node's credential: %s", exc)
                self.exit_code = EXIT_REVOKED
                self.stop.set()
                return
            except (httpx2.HTTPError, OSError, ValueError) as exc:
                logger.warning("heartbeat failed (%s); retrying", exc)

    # ----------------------------------------------------------------- draining

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True

        async def drain() -> None:
            with contextlib.suppress(Exception):
                await self.heartbeat()  # the gateway takes us out of routing now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout_s)
            self.stop.set()

        self._background.append(asyncio.get_running_loop().create_task(drain()))

    # ----------------------------------------------------------------- forwarding

    @contextlib.asynccontextmanager
    async def forward(self, method: str, path: str, headers: dict[str, str], body: bytes | None
                      ) -> AsyncIterator[tuple[int, dict[str, str], AsyncIterator[bytes]]]:
        """Send a request to the engine; yield (status, headers, body chunks)."""
        if not path.startswith("/v1/"):
            raise ValueError("only /v1/* is forwarded")
        url = self.config.engine.rstrip("/") + path[len("/v1"):]
        fwd = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
        fwd.update(self.engine_headers())
        self.in_flight += 1
        self._idle.clear()
        try:
            request = self.client.build_request(method, url, headers=fwd, content=body)
            resp = await self.client.send(request, stream=True)
            try:
                out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS | {"content-encoding"}}
                yield resp.status_code, out_headers, resp.aiter_raw()
            finally:
                await resp.aclose()
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    # ----------------------------------------------------------------- direct mode

    async def proxy_app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The direct-mode proxy (ASGI): ``/healthz`` open; ``/v1/*`` needs the call secret."""
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/healthz":
            ready = self.enrolled.is_set() and not self.draining
            await _send_json(send, 200 if ready else 503, {"status": "ready" if ready else "starting"})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        secret = self.state.get("call_secret") or ""
        if self.config.tunnel or not secret or not hmac.compare_digest(headers.get(CALL_SECRET_HEADER, ""), secret):
            await _send_json(send, 401, {"error": {"message": "This node only accepts calls from its gateway.",
                                                   "type": "authentication_error", "param": None, "code": "node_secret"}})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            async with self.forward(scope["method"], path, headers, body or None) as (status, out_headers, chunks):
                await send({"type": "http.response.start", "status": status,
                            "headers": [(k.encode(), v.encode()) for k, v in out_headers.items()]})
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except (httpx2.HTTPError, ValueError) as exc:
            await _send_json(send, 502, {"error": {"message": f"The node could not reach its engine: {exc}",
                                                   "type": "server_error", "param": None, "code": "engine_unreachable"}})

    # ----------------------------------------------------------------- tunnel mode

    async def tunnel_loop(self) -> None:
        """Keep a tunnel open; reconnect with jittered exponential backoff."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus, WebSocketException

        url = re.sub(r"^http", "ws", self.gateway) + "/nodes/tunnel"
        delay = 0.5
        while not self.stop.is_set():
            try:
                async with connect(url, additional_headers={"authorization": f"Bearer {self.state['credential']}"},
                                   max_size=32 * 1024 * 1024, proxy=None, open_timeout=10) as ws:
                    logger.info("tunnel open to %s", url)
                    delay = 0.5
                    await self._serve_tunnel(ws)
            except InvalidStatus as exc:
                logger.warning("tunnel refused: HTTP %s", exc.response.status_code)
            except (OSError, WebSocketException, TimeoutError) as exc:
                logger.warning("tunnel dropped (%s); reconnecting in %.1f s", exc, delay)
            if self.stop.is_set():
                return
            await _sleep_or(self.stop, delay * (0.5 + random.random()))
            delay = min(delay * 2, 30.0)

    async def _serve_tunnel(self, ws: Any) -> None:
        lock = asyncio.Lock()
        tasks: dict[int, asyncio.Task[None]] = {}

        async def emit(frame: dict[str, Any]) -> None:
            async with lock:
                await ws.send(json.dumps(frame, separators=(",", ":")))

        async def handle(frame: dict[str, Any]) -> None:
            rid = frame["id"]
            try:
                body = base64.b64decode(frame["body"]) if frame.get("body") else None
                async with self.forward(frame.get("method", "POST"), frame.get("path", ""), frame.get("headers") or {},
                                        body) as (status, headers, chunks):
                    await emit({"type": "response", "id": rid, "status": status, "headers": headers})
                    async for chunk in chunks:
                        await emit({"type": "chunk", "id": rid, "data": base64.b64encode(chunk).decode("ascii")})
                await emit({"type": "end", "id": rid})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported to the gateway as this request's failure
                with contextlib.suppress(Exception):
                    await emit({"type": "error", "id": rid, "message": str(exc) or type(exc).__name__})
            finally:
                tasks.pop(rid, None)

        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            while True:
                recv = asyncio.ensure_future(ws.recv())
                done, _ = await asyncio.wait({recv, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    recv.cancel()
                    return
                frame = json.loads(recv.result())
                if not isinstance(frame, dict) or not isinstance(frame.get("id"), int):
                    continue
                if frame.get("type") == "request":
                    tasks[frame["id"]] = asyncio.get_running_loop().create_task(handle(frame))
                elif frame.get("type") == "cancel" and frame["id"] in tasks:
                    tasks[frame["id"]].cancel()
        finally:
            stopper.cancel()
            for task in list(tasks.values()):
                task.cancel()

    # ----------------------------------------------------------------- run

    async def _reap(self, workers: list[asyncio.Task[Any]]) -> None:
        """Cancel and await every task this agent started, logging what failed: no task is
        left for the loop to complain about ("Task exception was never retrieved")."""
        tasks = [*workers, *self._background]
        for task in tasks:
            task.cancel()
        for task, result in zip(tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                logger.warning("agent task %s ended with %r", task.get_coro(), result)
        self._background.clear()

    async def run(self) -> int:
        """Run until stopped (signal, drain, revocation); return the exit status."""
        import uvicorn

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):  # Windows
                loop.add_signal_handler(sig, self.begin_drain)
        self.models = await discover_models(self.client, self.config.engine, self.engine_headers())
        logger.info("engine %s serves %s", self.config.engine, ", ".join(m["id"] for m in self.models) or "no models")

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # type: ignore[no-untyped-def]
                yield  # the agent handles SIGTERM itself: drain first, then stop

        host = self.config.host if not self.config.tunnel else "127.0.0.1"
        server = _Server(uvicorn.Config(self.proxy_app, host=host, port=self.config.port, lifespan="off",
                                        interface="asgi3", log_level="warning", access_log=False))
        server_task = loop.create_task(server.serve())
        while not server.started and not server_task.done():
            await asyncio.sleep(0.01)
        if server_task.done():
            raise SystemExit(f"could not listen on {host}:{self.config.port}")
        workers: list[asyncio.Task[Any]] = []
        try:
            await self.enroll()
            workers.append(loop.create_task(self.heartbeat_loop()))
            if self.config.tunnel:
                workers.append(loop.create_task(self.tunnel_loop()))
            await self.stop.wait()
        except RevokedError as exc:
            logger.error("the gateway refused this node's credential: %s", exc)
            self.exit_code = EXIT_REVOKED
        finally:
            await self._reap(workers)
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server_task, 10)
            if self._client is not None:
                await self._client.aclose()
        return self.exit_code


def _safe_name(name: str) -> str:
    """A node name as a file-name part (names are free text; files are not)."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "node"


def _read_state(path: Path) -> dict[str, Any] | None:
    """A saved state file's content (``None``: missing or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


def _error_message(resp: httpx2.Response) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except Exception:  # noqa: BLE001 - not our error shape
        return resp.text[:200]


def run_agent(config: AgentConfig) -> int:
    """Run the agent in a fresh asyncio loop; return the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s asgi-llm-node %(levelname)s %(message)s")
    for noisy in ("httpx2", "httpx", "httpcore", "httpcore2", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(NodeAgent(config).run())
