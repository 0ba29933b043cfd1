"""Load generators: wrk with ``lua/chat.lua`` (preferred), or a Python fallback.

Both return a :class:`LoadResult` with requests/s and latency percentiles in
microseconds. The fallback (aiohttp, N concurrent keep-alive connections, fixed
duration) exists so the harness still runs where wrk is not installed; it is much
slower than wrk, so results always say which tool produced them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LUA_SCRIPT", "LoadResult", "LoadSpec", "find_wrk", "run_load"]

LUA_SCRIPT = Path(__file__).resolve().parent / "lua" / "chat.lua"


@dataclass(frozen=True)
class LoadSpec:
    """What to send: one POST shape, at a fixed concurrency, for a fixed time."""

    url: str
    concurrency: int
    duration: float
    stream: bool = False
    model: str = "chat"
    prompt_bytes: int = 0
    auth: str | None = None
    path: str = "/v1/chat/completions"


@dataclass
class LoadResult:
    """One measured run."""

    tool: str
    requests: int
    seconds: float
    rps: float
    errors: int
    latency_us: dict[str, float] = field(default_factory=dict)
    """``p50``, ``p90``, ``p99``, ``mean``, ``max``."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_wrk() -> str | None:
    """Path of the wrk binary, or None (``BENCH_NO_WRK=1`` forces the fallback)."""
    if os.environ.get("BENCH_NO_WRK") == "1":
        return None
    return shutil.which("wrk")


def run_load(spec: LoadSpec, *, cpu: int | None = None, tool: str = "auto") -> LoadResult:
    """Run one load test; ``cpu`` pins the load generator to that core."""
    wrk = find_wrk() if tool in ("auto", "wrk") else None
    if tool == "wrk" and wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk), use --tool python")
    if wrk is not None:
        return _run_wrk(wrk, spec, cpu)
    return _run_python(spec, cpu)


def _bench_env(spec: LoadSpec) -> dict[str, str]:
    env = {
        **os.environ,
        "BENCH_PATH": spec.path,
        "BENCH_MODEL": spec.model,
        "BENCH_STREAM": "1" if spec.stream else "0",
        "BENCH_PROMPT_BYTES": str(spec.prompt_bytes),
    }
    env.pop("BENCH_AUTH", None)
    if spec.auth:
        env["BENCH_AUTH"] = spec.auth
    return env


def _run_wrk(wrk: str, spec: LoadSpec, cpu: int | None) -> LoadResult:
    # One wrk thread: the load generator has one core (shared with the mock upstream).
    args = [wrk, "-t1", f"-c{spec.concurrency}", f"-d{max(1, round(spec.duration))}s", "--timeout", "10s",
            "--latency", "-s", str(LUA_SCRIPT), spec.url]
    if cpu is not None and shutil.which("taskset"):
        args = ["taskset", "-c", str(cpu), *args]
    proc = subprocess.run(args, capture_output=True, text=True, env=_bench_env(spec), timeout=spec.duration + 60)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    data = json.loads(line[len("BENCHJSON "):])
    seconds = data["duration_us"] / 1e6
    lat = data["latency_us"]
    errors = sum(data["errors"].values())
    return LoadResult(
        tool="wrk",
        requests=data["requests"],
        seconds=seconds,
        rps=data["requests"] / seconds if seconds else 0.0,
        errors=errors,
        latency_us={"p50": lat["p"]["50"], "p90": lat["p"]["90"], "p99": lat["p"]["99"],
                    "mean": lat["mean"], "max": lat["max"]},
    )


# ------------------------------------------------------------------ python fallback


def _body(spec: LoadSpec, worker: int, n: int) -> bytes:
    pad = (" " + "lorem " * (spec.prompt_bytes // 6)) if spec.prompt_bytes else ""
    payload: dict[str, Any] = {"model": spec.model, "max_tokens": 16,
                               "messages": [{"role": "user", "content": f"Say hello, request {worker}-{n}{pad}"}]}
    if spec.stream:
        payload["stream"] = True
    return json.dumps(payload, separators=(",", ":")).encode()


async def _python_load(spec: LoadSpec) -> LoadResult:
    import aiohttp

    headers = {"content-type": "application/json"}
    if spec.auth:
        headers["authorization"] = f"Bearer {spec.auth}"
    latencies: list[float] = []
    errors = 0
    url = spec.url.rstrip("/") + spec.path
    connector = aiohttp.TCPConnector(limit=spec.concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        start = time.perf_counter()
        deadline = start + spec.duration

        async def worker(i: int) -> None:
            nonlocal errors
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=_body(spec, i, n), headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    ok = False
                latencies.append(time.perf_counter() - t0)
                errors += not ok

        await asyncio.gather(*(worker(i) for i in range(spec.concurrency)))
        seconds = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] * 1e6 if latencies else 0.0

    return LoadResult(
        tool="python-aiohttp",
        requests=len(latencies),
        seconds=seconds,
        rps=len(latencies) / seconds if seconds else 0.0,
        errors=errors,
        latency_us={"p50": pct(50), "p90": pct(90), "p99": pct(99),
                    "mean": sum(latencies) / len(latencies) * 1e6 if latencies else 0.0,
                    "max": latencies[-1] * 1e6 if latencies else 0.0},
    )


def _run_python(spec: LoadSpec, cpu: int | None) -> LoadResult:
    # Runs in a child process so pinning it does not pin the harness.
    args = ["python", "-c", "import sys, json; from benchmarks.loadgen import _python_main; _python_main()"]
    import sys

    args[0] = sys.executable
    if cpu is not None and shutil.which("taskset"):
        args = ["taskset", "-c", str(cpu), *args]
    proc = subprocess.run(args, input=json.dumps(asdict(spec)), capture_output=True, text=True,
                          timeout=spec.duration + 60, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"python load generator failed:\n{proc.stderr}")
    return LoadResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _python_main() -> None:
    import sys

    spec = LoadSpec(**json.loads(sys.stdin.read()))
    try:
        import uvloop

        result = uvloop.run(_python_load(spec))
    except ImportError:  # pragma: no cover
        result = asyncio.run(_python_load(spec))
    print(json.dumps(result.as_dict()))
