"""The UpstreamTransport seam: both implementations, foreign errors mapped to ours."""

from __future__ import annotations

import pytest

from asgi_llm.errors import UpstreamConnectionError, UpstreamError
from asgi_llm.providers.transport import AiohttpTransport, HttpxTransport, UpstreamTransport, make_transport
from asgi_llm.testing.processes import FakeUpstreamHandle, free_port
from tests.conftest import UPSTREAM_KEYS

pytestmark = pytest.mark.anyio


def transports(backend: str) -> list[UpstreamTransport]:
    out: list[UpstreamTransport] = [HttpxTransport(connect_timeout=2)]
    if backend == "asyncio":
        out.append(AiohttpTransport(connect_timeout=2))
    return out


HEADERS = {"authorization": f"Bearer {UPSTREAM_KEYS['provider-a']}", "content-type": "application/json"}
BODY = b'{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}'


class TestTransports:
    async def test_stream_and_read(self, anyio_backend: str, upstream_a: FakeUpstreamHandle) -> None:
        """Both transports read whole bodies and iterate streams, and reuse their pool."""
        for t in transports(anyio_backend):
            try:
                for _ in range(2):
                    resp = await t.send("GET", upstream_a.base_url + "/models", headers=HEADERS, body=None)
                    assert resp.status == 200 and b"gpt-4o-mini" in await resp.read()
                    await resp.aclose()
                resp = await t.send("POST", upstream_a.base_url + "/chat/completions", headers=HEADERS, body=BODY)
                assert resp.headers["Content-Type"].startswith("text/event-stream")  # case-insensitive
                data = b"".join([c async for c in resp.iter_chunks()])
                await resp.aclose()
                assert data.endswith(b"data: [DONE]\n\n")
            finally:
                await t.aclose()

    async def test_connection_refused_is_ours(self, anyio_backend: str) -> None:
        """A refused connection raises UpstreamConnectionError, not a library exception."""
        url = f"http://127.0.0.1:{free_port()}/v1/models"
        for t in transports(anyio_backend):
            try:
                with pytest.raises(UpstreamConnectionError):
                    await t.send("GET", url, headers={}, body=None)
            finally:
                await t.aclose()

    async def test_reset_is_ours(self, anyio_backend: str, upstream_a: FakeUpstreamHandle) -> None:
        """A reset before headers and a cut mid-stream raise UpstreamError subclasses."""
        for t in transports(anyio_backend):
            try:
                upstream_a.add_faults({"kind": "reset"})
                with pytest.raises(UpstreamError):
                    await t.send("POST", upstream_a.base_url + "/chat/completions", headers=HEADERS, body=BODY)
                upstream_a.add_faults({"kind": "cut", "after_chunks": 1})
                resp = await t.send("POST", upstream_a.base_url + "/chat/completions", headers=HEADERS, body=BODY)
                with pytest.raises(UpstreamError):
                    async for _ in resp.iter_chunks():
                        pass
                await resp.aclose()
            finally:
                await t.aclose()

    async def test_auto_picks_by_loop(self, anyio_backend: str, upstream_a: FakeUpstreamHandle) -> None:
        """The auto transport works on either loop (aiohttp on asyncio, httpx2 on trio)."""
        t = make_transport("auto")
        try:
            resp = await t.send("GET", upstream_a.base_url + "/models", headers=HEADERS, body=None)
            assert resp.status == 200
            await resp.aclose()
            inner = t._inner  # type: ignore[attr-defined]
            assert isinstance(inner, AiohttpTransport if anyio_backend == "asyncio" else HttpxTransport)
        finally:
            await t.aclose()

    def test_unknown_name(self) -> None:
        """An unknown transport name is a clear ValueError."""
        with pytest.raises(ValueError, match="unknown transport"):
            make_transport("curl")  # type: ignore[arg-type]


class TestWarm:
    async def test_startup_opens_pools_on_the_serving_loop(self, anyio_backend: str, upstream_a: FakeUpstreamHandle) -> None:
        """The gateway's startup picks and opens each provider's pool, so request one pays nothing for it."""
        from asgi_llm.providers.openai import OpenAIAdapter
        from asgi_llm.routing.router import ModelRoute, Router, Target
        from asgi_llm.stack import compose, gateway_lifespan

        adapter = OpenAIAdapter("a", base_url=upstream_a.base_url)
        gw = compose(providers={"a": adapter}, router=Router([ModelRoute("m", (Target("a", "x"),))]))
        async with gateway_lifespan(gw):
            inner = adapter.transport._inner  # type: ignore[attr-defined]
            assert isinstance(inner, AiohttpTransport if anyio_backend == "asyncio" else HttpxTransport)
            opened = inner._session if isinstance(inner, AiohttpTransport) else inner._client
            assert opened is not None


class TestNoSecretsInErrors:
    async def test_connection_error_names_the_url_redacted(self, anyio_backend: str) -> None:
        """Credentials, path and query string of the URL never reach the message, only its
        origin (both transports)."""
        port = free_port()
        url = f"http://bob:hunter2-secret@127.0.0.1:{port}/v1/SECRETPATH/models?key=q-secret-123"
        for t in transports(anyio_backend):
            try:
                with pytest.raises(UpstreamConnectionError) as info:
                    await t.send("GET", url, headers={}, body=None)
                message = str(info.value)
                assert "hunter2" not in message and "q-secret" not in message and "bob" not in message
                assert f"http://127.0.0.1:{port}" in message and "SECRETPATH" not in message and "?" not in message
            finally:
                await t.aclose()

    async def test_credentials_next_to_a_key_header_are_ours_not_a_500(self, anyio_backend: str) -> None:
        """aiohttp refuses URL credentials next to an Authorization header with a bare
        ValueError: mapped at the seam (and redacted) like any other failure."""
        url = f"http://bob:hunter2-secret@127.0.0.1:{free_port()}/v1/models"
        for t in transports(anyio_backend):
            try:
                with pytest.raises(UpstreamError) as info:
                    await t.send("GET", url, headers=HEADERS, body=None)
                assert "hunter2" not in str(info.value)
            finally:
                await t.aclose()


class TestBoundedRead:
    async def test_read_at_most_stops_at_the_limit(self, anyio_backend: str, upstream_a: FakeUpstreamHandle) -> None:
        """A 3 MiB body: None under a 1 MiB limit (the connection dropped), whole under 8 MiB."""
        for t in transports(anyio_backend):
            try:
                for limit, whole in ((1 << 20, False), (8 << 20, True)):
                    upstream_a.add_faults({"kind": "huge", "size": 3 << 20})
                    resp = await t.send("POST", upstream_a.base_url + "/chat/completions", headers=HEADERS,
                                        body=BODY.replace(b',"stream":true', b""))
                    data = await resp.read_at_most(limit)  # type: ignore[attr-defined]
                    await resp.aclose()
                    assert (data is not None) is whole
                    if whole:
                        assert len(data) == 3 << 20 and data.startswith(b'{"pad":"')
            finally:
                await t.aclose()
