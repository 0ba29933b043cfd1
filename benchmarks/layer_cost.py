"""What each optional layer of the *full* pipeline costs, in CPU per request.

The ``layers`` benchmark adds one layer at a time around a canned in-process provider
(no network, base chain only). This one builds the full recipe (auth with a key, quota
with org and key limits, usage + SQLite ledger, hash-chained audit, cache enabled but
missing on every request, observability) with ``build_gateway`` and then the same
recipe with one layer excluded at a time, and sends sequential requests through each
in process to a real fake upstream (a separate process on the other core). It reports
the gateway process's CPU time per request (``time.process_time``, all threads: the
ledger/audit writer threads count, as they compete for the gateway's core). A layer's
cost is the full stack's CPU minus the CPU without it; interleaved reps, medians.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Any

import anyio

__all__ = ["layer_cost_markdown", "measure_layer_cost"]

OPTIONAL = ("observability", "audit", "quota", "usage", "cache")

RECIPE = """
providers:
  a: {{base_url: "{url}", api_keys: ["k"]}}
models:
  chat: {{targets: [{{provider: a, model: m, price: {{input: 1, output: 2}}}}]}}
stores: {{ledger: "sqlite:///{tmp}/ledger.db"}}
auth:
  admin_keys: ["sk-admin-bench-0123456789"]
  pepper: "bench-pepper-0123456789"
  keys: [{{key: "sk-team-bench-0123456789", org: team-a, limits: {{rpm: 100000000, tpm: 1000000000}}}}]
limits: {{org: {{rpm: 100000000}}}}
cache: {{enabled: true}}
routing: {{health: {{probe_interval_s: 0}}}}
"""


async def call(app: Any, payload: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> int:
    """One in-process request; returns the status (the body is drained and dropped)."""
    body = json.dumps(payload).encode()
    sent = False
    done = anyio.Event()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif not message.get("more_body", False):
            done.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 1), "server": ("bench", 80)}
    await app(scope, receive, send)
    return status


async def _cpu_per_request(gateway: Any, requests: int) -> float:
    from asgi_llm.stack import gateway_lifespan

    headers = [(b"authorization", b"Bearer sk-team-bench-0123456789")]
    async with gateway_lifespan(gateway):
        for i in range(50):  # warm-up: pools, caches, lazy imports
            await call(gateway, {"model": "chat", "messages": [{"role": "user", "content": f"warm {i}"}]}, headers)
        c0 = time.process_time()
        for i in range(requests):  # a different prompt each time: the cache always misses
            status = await call(gateway, {"model": "chat", "messages": [{"role": "user", "content": f"hello {i}"}]}, headers)
            if status != 200:
                raise RuntimeError(f"request failed with {status}")
        return (time.process_time() - c0) / requests * 1e6


def measure_layer_cost(*, requests: int = 1000, reps: int = 3) -> dict[str, Any]:
    """Median CPU µs/request for the full stack and for it minus each optional layer."""
    from asgi_llm.config import parse_config
    from asgi_llm.stack import build_gateway
    from asgi_llm.testing.processes import fake_upstream

    variants: list[tuple[str, ...]] = [(), *[(name,) for name in OPTIONAL], OPTIONAL]
    samples: dict[tuple[str, ...], list[float]] = {v: [] for v in variants}
    tmp = tempfile.mkdtemp(prefix="asgi-llm-layer-cost-")
    with fake_upstream("bench") as upstream:
        pinned = hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2
        if pinned:
            os.sched_setaffinity(upstream.process.proc.pid, {1})  # type: ignore[union-attr]
            os.sched_setaffinity(0, {0})
        try:
            for _ in range(reps):
                for v in variants:  # interleaved, so drift hits every variant alike
                    gateway = build_gateway(parse_config(RECIPE.format(url=upstream.base_url, tmp=tmp)), exclude=v)
                    samples[v].append(anyio.run(_cpu_per_request, gateway, requests, backend_options={"use_uvloop": True}))
        finally:
            if pinned:
                os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    full = statistics.median(samples[()])
    rows = []
    for v in variants:
        med = statistics.median(samples[v])
        label = "full pipeline" if not v else ("without every optional layer" if v == OPTIONAL else f"without {v[0]}")
        rows.append({"variant": label, "excluded": list(v), "cpu_us": med, "min": min(samples[v]),
                     "max": max(samples[v]), "layer_cost_us": full - med if v else 0.0})
    return {"requests": requests, "reps": reps, "pinned": pinned, "rows": rows}


def layer_cost_markdown(res: dict[str, Any]) -> str:
    lines = [
        f"In process, {res['requests']} sequential requests per variant × {res['reps']} reps (interleaved), real fake "
        f"upstream on the other core{'' if res['pinned'] else ' (not pinned: fewer than 2 cores)'}; gateway process "
        "CPU µs/request (all threads), median (min–max). Layer cost = full − without it.",
        "",
        "| variant | CPU µs/request | layer cost µs |",
        "|---|---:|---:|",
    ]
    for r in res["rows"]:
        cost = "—" if not r["excluded"] else f"{r['layer_cost_us']:.0f}"
        lines.append(f"| {r['variant']} | {r['cpu_us']:.0f} ({r['min']:.0f}–{r['max']:.0f}) | {cost} |")
    return "\n".join(lines) + "\n"
