"""The Python floor: a bare pure-ASGI passthrough proxy (no framework, no gateway).

uvicorn (uvloop + httptools) + one aiohttp ``ClientSession`` with one connector. It reads
the request body, POSTs it unchanged to ``$BENCH_UPSTREAM`` + path, and relays the status
and body — streams chunk by chunk. Anything an LLM gateway does costs more than this, so
it is the yardstick the gateway rows are compared with.

    BENCH_UPSTREAM=http://127.0.0.1:9001 uvicorn benchmarks.passthrough:app --port 8000
"""

from __future__ import annotations

import os

import aiohttp

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9001").rstrip("/")
_HOP = {b"host", b"content-length", b"connection", b"transfer-encoding"}
_session: aiohttp.ClientSession | None = None


def _get_session() -> aiohttp.ClientSession:
    global _session
    if _session is None:
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=0)
        _session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                         skip_auto_headers=("User-Agent",))
    return _session


async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if _session is not None:
                    await _session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/healthz":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    headers = {k.decode(): v.decode() for k, v in scope["headers"] if k not in _HOP}
    async with _get_session().request(scope["method"], UPSTREAM + scope["path"], data=body, headers=headers) as resp:
        out = [(b"content-type", resp.headers.get("content-type", "application/json").encode())]
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            data = await resp.read()
            out.append((b"content-length", str(len(data)).encode()))
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            await send({"type": "http.response.body", "body": data})
