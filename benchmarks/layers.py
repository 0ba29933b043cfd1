"""``python -m benchmarks layers``: per-layer cost, in process, no network.

The gateway is composed around :class:`BenchAdapter`, an in-process provider that
answers with a canned OpenAI reply (wrapped in the real
:class:`~asgi_llm.providers.base.UpstreamReply`, so body/stream parsing and timeouts
are the production code). The composed chain is walked from the innermost app outwards;
each suffix of the chain (``dispatch``; ``endpoints → dispatch``; ``context → endpoints
→ dispatch``; …) is a complete ASGI app, so the stacks add one layer at a time and the
delta between two rows is what that layer costs. A regression names its layer.

New layers are picked up automatically: the chain is whatever ``compose()`` builds.
Requests are driven by calling the app directly with a minimal scope/receive/send in a
tight loop under uvloop; the floor row is a bare app that reads the body and sends a
canned reply.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from asgi_llm.providers.base import Timeouts, UpstreamReply
from asgi_llm.routing.router import ModelRoute, Router, Target
from asgi_llm.stack import compose

from benchmarks.apps import layer_chain, layer_names
from benchmarks.servers import CLIENT_KEY

__all__ = ["BenchAdapter", "measure_layers", "layers_markdown"]

_REPLY = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "chat",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from bench. You said: hi"},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8},
}, separators=(",", ":")).encode()


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _stream_events() -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "chat"}
    events = [_sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})]
    for word in "Hello from bench. You said: hi".split():
        events.append(_sse({**base, "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}))
    events.append(_sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    events.append(_sse({**base, "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}}))
    events.append(b"data: [DONE]\n\n")
    return events


_EVENTS = _stream_events()


class _CannedResponse:
    """A fake :class:`~asgi_llm.providers.transport.UpstreamResponse` (already "arrived")."""

    __slots__ = ("status", "headers", "_stream")

    def __init__(self, stream: bool) -> None:
        self.status = 200
        self.headers: Mapping[str, str] = {"content-type": "text/event-stream" if stream else "application/json"}
        self._stream = stream

    async def read(self) -> bytes:
        return _REPLY

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        for event in _EVENTS:
            yield event

    async def aclose(self) -> None:
        return None


class BenchAdapter:
    """A :class:`~asgi_llm.providers.base.ProviderAdapter` that never leaves the process."""

    def __init__(self, name: str = "bench") -> None:
        self.name = name
        self.timeouts = Timeouts()
        try:  # builds whose adapters carry an upstream key pool
            from asgi_llm.providers.key_pool import KeyPool
        except ImportError:  # pragma: no cover - builds before the key_pool rename
            try:
                from asgi_llm.providers.keys import KeyPool  # type: ignore[no-redef]
            except ImportError:  # older builds: no key pool
                return
        self.keys = KeyPool(name, [])

    async def send(self, ctx: Any, target: Target, *, api_key: str | None = None) -> UpstreamReply:
        return UpstreamReply(_CannedResponse(ctx.stream), target=target.route, timeouts=self.timeouts,
                             sent_at=time.perf_counter())

    async def aclose(self) -> None:
        return None


async def _floor_app(scope: Any, receive: Any, send: Any) -> None:
    """Read the body, send the canned reply: the cost of the ASGI calls themselves."""
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(_REPLY)).encode())]})
    await send({"type": "http.response.body", "body": _REPLY})


def _body(stream: bool) -> bytes:
    payload: dict[str, Any] = {"model": "chat", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello"}]}
    if stream:
        payload["stream"] = True
    return json.dumps(payload, separators=(",", ":")).encode()


async def _drive(app: Any, body: bytes, n: int) -> tuple[float, int]:
    """Call ``app`` ``n`` times; return (seconds, status of the last response)."""
    loop = asyncio.get_running_loop()
    headers = [(b"host", b"bench"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"authorization", b"Bearer " + CLIENT_KEY.encode())]
    status = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    t0 = time.perf_counter()
    for _ in range(n):
        first = True
        forever = loop.create_future()

        async def receive() -> dict[str, Any]:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": body, "more_body": False}
            await forever  # the client never disconnects (cancelled when the response ends)
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "root_path": "", "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 8080), "state": {}}
        await app(scope, receive, send)
    return time.perf_counter() - t0, status


def measure_layers(*, requests: int = 20000, reps: int = 5) -> dict[str, Any]:
    """µs/request for each stack (floor, then the chain's suffixes), non-stream and stream."""
    adapter = BenchAdapter()
    router = Router([ModelRoute("chat", (Target("bench", "chat"),))])
    gateway, resources = compose(providers={"bench": adapter}, router=router), None
    chain = layer_chain(gateway)
    names = layer_names(gateway)
    stacks: list[tuple[str, Any]] = [("floor (raw ASGI app)", _floor_app)]
    for i in range(len(chain) - 1, -1, -1):
        stacks.append((" → ".join(names[i:]), chain[i]))
    result: dict[str, Any] = {"requests": requests, "reps": reps, "layers": names, "modes": {}}

    async def main() -> None:
        for stream in (False, True):
            body = _body(stream)
            timings: dict[str, list[float]] = {label: [] for label, _ in stacks}
            statuses: dict[str, int] = {}
            for label, app in stacks:  # warm-up
                _, statuses[label] = await _drive(app, body, max(200, requests // 20))
            for _ in range(reps):
                for label, app in stacks:  # interleaved
                    gc.collect()
                    seconds, statuses[label] = await _drive(app, body, requests)
                    timings[label].append(seconds / requests * 1e6)
            rows = []
            prev = None
            for i, (label, _) in enumerate(stacks):
                med = statistics.median(timings[label])
                added = None if i == 0 else (names[len(chain) - i] if i > 0 else None)
                rows.append({"stack": label, "added_layer": added, "us_per_request": med,
                             "min": min(timings[label]), "max": max(timings[label]),
                             "delta_us": None if prev is None else med - prev, "status": statuses[label]})
                prev = med
            result["modes"]["stream" if stream else "non-stream"] = rows

    async def with_lifespan() -> None:
        startup = getattr(resources, "startup", None)
        if startup is not None:
            await startup()
        try:
            await main()
        finally:
            shutdown = getattr(resources, "shutdown", None)
            if shutdown is not None:
                await shutdown()

    try:
        import uvloop

        uvloop.run(with_lifespan())
    except ImportError:  # pragma: no cover
        asyncio.run(with_lifespan())
    return result


def layers_markdown(res: dict[str, Any]) -> str:
    lines = [f"In-process, no network: {res['requests']} sequential requests per stack × {res['reps']} reps "
             "(interleaved), uvloop; median µs/request (min–max). Each row adds one layer around the row above; "
             "Δ is what that layer costs.", ""]
    for mode, rows in res["modes"].items():
        lines += [f"### {mode}", "", "| stack | added layer | µs/request | Δ µs | status |", "|---|---|---:|---:|---:|"]
        for r in rows:
            delta = "—" if r["delta_us"] is None else f"{r['delta_us']:+.1f}"
            lines.append(f"| {r['stack']} | {r['added_layer'] or '—'} | {r['us_per_request']:.1f} "
                         f"({r['min']:.1f}–{r['max']:.1f}) | {delta} | {r['status']} |")
        lines.append("")
    return "\n".join(lines)
