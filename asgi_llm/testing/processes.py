"""Process helpers for end-to-end tests, the demo and benchmarks.

* :func:`free_port` - an unused TCP port on 127.0.0.1.
* :func:`managed_process` - start a command, wait until an HTTP readiness URL
  answers 200, and always terminate it (and its whole process group) on exit.
* :func:`fake_upstream` - run :mod:`asgi_llm.testing.fake_upstream` as a
  process and control it through a :class:`FakeUpstreamHandle`.
* :func:`gateway_process` - serve a recipe with ``asgi-llm serve`` as a process,
  ready once ``/healthz`` answers.

Only the standard library is used (``urllib.request`` with proxies disabled),
so these helpers work in any environment the tests run in.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FakeUpstreamHandle",
    "GatewayHandle",
    "ManagedProcess",
    "fake_upstream",
    "free_port",
    "gateway_process",
    "managed_process",
]

# Never route 127.0.0.1 traffic through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_LIVE: set[subprocess.Popen[bytes]] = set()


def free_port() -> int:
    """Return a TCP port that is currently free on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ManagedProcess:
    """A process started by :func:`managed_process`."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    name: str = ""

    def log_text(self) -> str:
        """Return everything the process wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


def _http_status(url: str, timeout: float) -> int | None:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except (OSError, ValueError):
        return None


def _terminate(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group, wait ``grace`` seconds, then SIGKILL it."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # Kill whatever is left in the group (the leader or stray grandchildren).
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    _LIVE.discard(proc)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session=True: pgid == pid
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover - safety net
    for proc in list(_LIVE):
        _terminate(proc, grace=1.0)


@contextlib.contextmanager
def managed_process(
    args: list[str],
    *,
    ready_url: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
    name: str = "",
    keep_log: bool = False,
    cwd: str | os.PathLike[str] | None = None,
) -> Iterator[ManagedProcess]:
    """Run ``args`` as a child process for the duration of the ``with`` block.

    stdout and stderr go to a temporary log file.  ``ready_url`` is polled with
    GET until it answers 200; if the process exits first or ``timeout`` seconds
    pass, the process is killed and ``RuntimeError`` (with the log tail) is
    raised.  ``env`` entries are added on top of ``os.environ``.  On exit the
    whole process group gets SIGTERM, then SIGKILL after 5 s.  The log file is
    deleted on exit unless ``keep_log`` is true (or startup failed). ``cwd`` is the
    process's working directory (default: this process's).
    """
    label = name or Path(args[0]).name
    fd, log_name = tempfile.mkstemp(prefix=f"asgi-llm-{label.replace('/', '_')}-", suffix=".log")
    log_path = Path(log_name)
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    with os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    _LIVE.add(proc)
    failed = True
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"process {label!r} exited with code {proc.returncode} before {ready_url} was ready; "
                    f"log {log_path}:\n{_log_tail(log_path)}"
                )
            if _http_status(ready_url, timeout=1.0) == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"process {label!r} not ready at {ready_url} after {timeout:.1f}s; "
                    f"log {log_path}:\n{_log_tail(log_path)}"
                )
            time.sleep(0.05)
        failed = False
        yield ManagedProcess(proc=proc, log_path=log_path, name=label)
    finally:
        _terminate(proc)
        if not keep_log and not failed:
            with contextlib.suppress(OSError):
                log_path.unlink()


# --------------------------------------------------------------------------- #
# Fake upstream
# --------------------------------------------------------------------------- #
@dataclass
class FakeUpstreamHandle:
    """A running fake upstream process and its control API."""

    name: str
    port: int
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """Server root, e.g. ``http://127.0.0.1:9001``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. ``http://127.0.0.1:9001/v1``."""
        return f"{self.url}/v1"

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("content-type", "application/json")
        try:
            with _OPENER.open(request, timeout=10) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"fake upstream {self.name}: {method} {path} -> {exc.code}: {detail}") from None

    def add_faults(self, *faults: dict[str, Any]) -> None:
        """Append faults (see :mod:`asgi_llm.testing.fake_upstream` for the kinds)."""
        self._call("POST", "/_fake/faults", list(faults))

    def clear_faults(self) -> None:
        """Remove every pending fault."""
        self._call("DELETE", "/_fake/faults")

    def faults(self) -> list[dict[str, Any]]:
        """Return the pending faults."""
        return list(self._call("GET", "/_fake/faults")["faults"])

    def stats(self) -> dict[str, Any]:
        """Return the server's stats document (requests, by_model, usage, disconnects, ...)."""
        return dict(self._call("GET", "/_fake/stats"))

    def reset(self) -> None:
        """Clear faults and stats."""
        self._call("POST", "/_fake/reset")

    def wait_stats(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """Poll :meth:`stats` until ``predicate(stats)`` is true; raise ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake upstream {self.name}: stats condition not met; last stats: {stats}")
            time.sleep(0.02)


@contextlib.contextmanager
def fake_upstream(
    name: str = "fake",
    *,
    port: int | None = None,
    models: Sequence[str] | None = None,
    api_key: str | None = None,
    faults: Sequence[dict[str, Any]] | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[FakeUpstreamHandle]:
    """Run a fake upstream process on 127.0.0.1 and yield its :class:`FakeUpstreamHandle`."""
    port = port or free_port()
    args = [
        sys.executable, "-m", "asgi_llm.testing.fake_upstream",
        "--host", "127.0.0.1", "--port", str(port), "--name", name, "--exit-with-parent",
    ]
    if models:
        args += ["--models", ",".join(models)]
    if api_key is not None:
        args += ["--api-key", api_key]
    for fault in faults or ():
        args += ["--fault", json.dumps(fault)]
    args += list(extra_args)
    with managed_process(args, ready_url=f"http://127.0.0.1:{port}/health", name=f"fake-upstream-{name}") as mp:
        yield FakeUpstreamHandle(name=name, port=port, process=mp)


# --------------------------------------------------------------------------- #
# Gateway
# --------------------------------------------------------------------------- #
@dataclass
class GatewayHandle:
    """A running ``asgi-llm serve`` process."""

    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        """Server root, e.g. ``http://127.0.0.1:8080``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. ``http://127.0.0.1:8080/v1``."""
        return f"{self.url}/v1"


@contextlib.contextmanager
def gateway_process(
    recipe: str | os.PathLike[str],
    *,
    name: str = "gateway",
    env: Mapping[str, str] | None = None,
    log_level: str = "warning",
    extra_args: Sequence[str] = (),
    timeout: float = 20.0,
    cwd: str | os.PathLike[str] | None = None,
) -> Iterator[GatewayHandle]:
    """Serve ``recipe`` with ``asgi-llm serve`` on a free port for the ``with`` block.

    ``extra_args`` go to ``serve`` (e.g. ``("--workers", "2")``); ``env`` is added to
    the environment (recipes read ``${VAR}`` from it). The gateway runs in ``cwd``;
    by default in a fresh temporary directory removed on exit, so relative store paths
    (the default ledger ``sqlite:///asgi-llm.db``) never land in the caller's directory,
    a checkout or the database of a real ``asgi-llm serve`` there.
    """
    port = free_port()
    args = [sys.executable, "-m", "asgi_llm.cli", "serve", "--config", str(Path(recipe).resolve()), "--port", str(port),
            "--log-level", log_level, *extra_args]
    with contextlib.ExitStack() as stack:
        if cwd is None:
            cwd = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"asgi-llm-{name.replace('/', '_')}-cwd-"))
        mp = stack.enter_context(managed_process(args, ready_url=f"http://127.0.0.1:{port}/healthz", env=env, name=name,
                                                 timeout=timeout, cwd=cwd))
        yield GatewayHandle(port=port, process=mp)
