"""Streaming latency: time to first byte and inter-chunk gap, row against row.

A mock upstream with a ``chunk_delay`` fault (slow but healthy: it sleeps between SSE
events) serves one stream at a time (concurrency 1). For every stream the client
records when each body piece arrives (``perf_counter``): TTFB is request start → first
body byte; the gap is the mean time between consecutive pieces. Rows are interleaved
stream by stream, so machine noise hits all of them alike. Overhead = row − passthrough.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.servers import LOAD_CPU, Skip, client_key, mock_upstream, start_row

__all__ = ["measure_streaming", "streaming_markdown"]


_CONTENT = re.compile(rb'"content":"[^"]')


async def _one_stream(session: Any, url: str, body: bytes, headers: dict[str, str]) -> tuple[float, float, float, int]:
    t0 = time.perf_counter()
    arrivals: list[float] = []
    first_content = None
    async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {await resp.text()}")
        async for piece in resp.content.iter_any():
            if piece:
                arrivals.append(time.perf_counter())
                if first_content is None and _CONTENT.search(piece):
                    first_content = arrivals[-1]
    ttfb = arrivals[0] - t0
    ttft = (first_content or arrivals[0]) - t0
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return ttft, ttfb, (statistics.fmean(gaps) if gaps else 0.0), len(arrivals)


async def _measure(urls: dict[str, str], streams: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    import aiohttp

    headers = {"content-type": "application/json", "authorization": f"Bearer {client_key()}"}
    out: dict[str, dict[str, list[float]]] = {r: {"ttft": [], "ttfb": [], "gap": [], "pieces": []} for r in urls}
    sessions = {r: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for r in urls}
    try:
        for i in range(warmup + streams):
            for row, url in urls.items():
                body = json.dumps({"model": "chat", "stream": True, "max_tokens": 16,
                                   "messages": [{"role": "user", "content": f"one two three four five six {i}"}]}).encode()
                ttft, ttfb, gap, pieces = await _one_stream(sessions[row], url, body, headers)
                if i >= warmup:
                    out[row]["ttft"].append(ttft)
                    out[row]["ttfb"].append(ttfb)
                    out[row]["gap"].append(gap)
                    out[row]["pieces"].append(pieces)
    finally:
        for s in sessions.values():
            await s.close()
    return out


def measure_streaming(rows: list[str], *, streams: int = 200, warmup: int = 20, chunk_delay: float = 0.005,
                      litellm: str | None = None) -> dict[str, Any]:
    """Start a chunk-delay mock and the rows, measure, and summarise (medians in ms)."""
    result: dict[str, Any] = {"streams": streams, "chunk_delay_ms": chunk_delay * 1000, "rows": {}, "skipped": {}}
    fault = {"kind": "chunk_delay", "delay_s": chunk_delay, "times": None}
    with tempfile.TemporaryDirectory(prefix="asgi-llm-bench-") as tmp, \
            mock_upstream(faults=[fault]) as mock, contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        layers: dict[str, list[str]] = {}
        for row in rows:
            try:
                srv = stack.enter_context(start_row(row, mock, Path(tmp), litellm=litellm))
            except Skip as exc:
                result["skipped"][row] = str(exc)
                continue
            urls[row], layers[row] = srv.url, srv.layers
        old = os.sched_getaffinity(0)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {LOAD_CPU})
        try:
            raw = _run(_measure(urls, streams, warmup))
        finally:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, old)
    for row, data in raw.items():
        result["rows"][row] = {
            "layers": layers[row],
            "ttft_ms": statistics.median(data["ttft"]) * 1000,
            "ttft_p90_ms": sorted(data["ttft"])[int(0.9 * len(data["ttft"]))] * 1000,
            "ttfb_ms": statistics.median(data["ttfb"]) * 1000,
            "gap_ms": statistics.median(data["gap"]) * 1000,
            "pieces": statistics.median(data["pieces"]),
        }
    base = result["rows"].get("passthrough")
    if base:
        for r in result["rows"].values():
            r["ttft_overhead_ms"] = r["ttft_ms"] - base["ttft_ms"]
            r["ttfb_overhead_ms"] = r["ttfb_ms"] - base["ttfb_ms"]
            r["gap_overhead_ms"] = r["gap_ms"] - base["gap_ms"]
    return result


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def streaming_markdown(res: dict[str, Any]) -> str:
    lines = [f"Streams at concurrency 1, mock sleeping {res['chunk_delay_ms']:g} ms between SSE events, "
             f"{res['streams']} streams per row (interleaved), medians:", "",
             "| row | first content byte ms | p90 ms | overhead vs passthrough ms | first byte ms | "
             "first byte overhead ms | mean inter-chunk gap ms | gap overhead ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for row, r in res["rows"].items():
        lines.append(f"| {row} | {r['ttft_ms']:.3f} | {r['ttft_p90_ms']:.3f} | {r.get('ttft_overhead_ms', nan):+.3f} | "
                     f"{r['ttfb_ms']:.3f} | {r.get('ttfb_overhead_ms', nan):+.3f} | {r['gap_ms']:.3f} | "
                     f"{r.get('gap_overhead_ms', nan):+.3f} |")
    for row, why in res["skipped"].items():
        lines.append(f"| {row} | — | — | — | — | — | — | skipped: {why} |")
    lines += ["", "*First content byte* is when the first piece carrying answer text arrives (the time to first "
              "token as a user sees it; the target is measured on it). *First byte* counts the role-only opening "
              "chunk too: a gateway with failover holds that chunk until the first content arrives (its commit "
              "point), by design, so its first byte comes one upstream chunk later than a plain relay's."]
    return "\n".join(lines) + "\n"
