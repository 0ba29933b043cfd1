"""Adapter for OpenAI-compatible upstreams (OpenAI, Groq, Together, Mistral, DeepSeek,
vLLM, Ollama, llama.cpp, LM Studio, …).

The forwarded body is the client's parsed JSON with two changes: ``model`` becomes the
target's upstream model name, and streams always ask for the usage chunk
(``stream_options.include_usage``) so every call can be metered; the client only gets
that chunk if it asked. Unknown fields pass through untouched. Upstream keys rotate
round-robin over the provider's pool.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any


from asgi_llm._timeout import fail_after
from asgi_llm.errors import UpstreamError, UpstreamTimeoutError
from asgi_llm.providers.base import Timeouts, UpstreamReply, raise_for_upstream_status
from asgi_llm.providers.keys import KeyPool
from asgi_llm.providers.transport import UpstreamTransport, make_transport

if TYPE_CHECKING:
    from asgi_llm.context import RequestContext
    from asgi_llm.routing.health import HealthTracker
    from asgi_llm.routing.router import Target

__all__ = ["GATEWAY_ONLY_FIELDS", "OpenAIAdapter"]

_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}

GATEWAY_ONLY_FIELDS: frozenset[str] = frozenset({"provider", "models", "fallbacks", "cache"})
"""Request fields meant for the gateway itself (routing overrides in the OpenRouter and
LiteLLM dialects, LiteLLM's cache controls), never forwarded upstream."""

_USER_AGENT = "asgi-llm/0.1"


class OpenAIAdapter:
    """One OpenAI-compatible provider: base URL, key pool, timeouts, one connection pool.

    Args:
        name: the provider's name in the recipe (used in routes and messages).
        base_url: e.g. ``https://api.openai.com/v1`` (no trailing slash needed).
        api_keys: upstream keys, used round-robin; empty for keyless local engines.
        timeouts: per-attempt limits.
        headers: extra static headers sent with every request.
        transport: the connection pool; built with :func:`make_transport` if omitted.
    """

    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_keys: Sequence[str] = (),
        timeouts: Timeouts | None = None,
        headers: Mapping[str, str] | None = None,
        transport: UpstreamTransport | None = None,
        max_connections: int = 256,
        health: HealthTracker | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.timeouts = timeouts or Timeouts()
        self.transport = transport or make_transport(max_connections=max_connections, connect_timeout=self.timeouts.connect)
        self._static_headers = {"content-type": "application/json", "user-agent": _USER_AGENT, **(headers or {})}
        self.keys = KeyPool(name, api_keys, health=health)

    def build_body(self, ctx: RequestContext, target: Target) -> bytes:
        """The JSON body sent upstream for this attempt."""
        payload = ctx.payload
        body: dict[str, Any] = {k: v for k, v in payload.items() if k not in GATEWAY_ONLY_FIELDS} if GATEWAY_ONLY_FIELDS else dict(payload)
        body["model"] = target.model
        if ctx.stream:
            opts = payload.get("stream_options")
            body["stream_options"] = {**opts, "include_usage": True} if isinstance(opts, dict) else {"include_usage": True}
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    def build_headers(self, ctx: RequestContext, api_key: str | None) -> dict[str, str]:
        headers = dict(self._static_headers)
        headers["x-request-id"] = ctx.request_id
        if api_key is not None:
            headers["authorization"] = "Bearer " + api_key
        if ctx.stream:
            headers["accept"] = "text/event-stream"
        return headers

    async def send(self, ctx: RequestContext, target: Target, *, api_key: str | None = None) -> UpstreamReply:
        url = self.base_url + _PATHS[ctx.endpoint]
        body = self.build_body(ctx, target)
        headers = self.build_headers(ctx, api_key)
        route = target.route
        # Streams wait for headers within the first-token limit; others within the attempt.
        limit = self.timeouts.ttft if ctx.stream else self.timeouts.attempt
        sent_at = time.perf_counter()
        try:
            async with fail_after(limit):
                response = await self.transport.send("POST", url, headers=headers, body=body)
        except TimeoutError:
            what = "time-to-first-token limit" if ctx.stream else "attempt timeout"
            raise UpstreamTimeoutError(f"{route} did not answer within the {what} of {limit:g} s.", target=route) from None
        if not 200 <= response.status < 300:
            await raise_for_upstream_status(response, route)
        return UpstreamReply(response, target=route, timeouts=self.timeouts, sent_at=sent_at)

    async def probe(self) -> bool:
        """Free health probe: ``GET /models`` answers 200 within the connect+attempt limits."""
        key_id, api_key = "", None
        if len(self.keys):
            api_key = self.keys._keys[0]  # any key proves reachability; listing models is free
        headers = {"user-agent": _USER_AGENT}
        if api_key:
            headers["authorization"] = "Bearer " + api_key
        try:
            async with fail_after(min(self.timeouts.attempt, 10.0)):
                response = await self.transport.send("GET", self.base_url + "/models", headers=headers, body=None)
                try:
                    return 200 <= response.status < 300
                finally:
                    await response.aclose()
        except (TimeoutError, UpstreamError):
            return False

    async def aclose(self) -> None:
        await self.transport.aclose()
