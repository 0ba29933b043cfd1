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
from typing import TYPE_CHECKING, Any


from asgi_llm._timeout import fail_after
from asgi_llm.errors import UpstreamError, UpstreamTimeoutError
from asgi_llm.providers.base import UpstreamReply, describe_request, name_target, raise_for_upstream_status
from asgi_llm.providers.http import HTTPAdapter

if TYPE_CHECKING:
    from asgi_llm.context import RequestContext
    from asgi_llm.targets import Target

__all__ = ["GATEWAY_ONLY_FIELDS", "OpenAIAdapter"]

_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}

GATEWAY_ONLY_FIELDS: frozenset[str] = frozenset({"provider", "models", "fallbacks", "cache"})
"""Request fields meant for the gateway itself (routing overrides in the OpenRouter and
LiteLLM dialects, LiteLLM's cache controls), never forwarded upstream."""



class OpenAIAdapter(HTTPAdapter):
    """One OpenAI-compatible provider: base URL, key pool, timeouts, one connection pool
    (arguments: see :class:`~asgi_llm.providers.http.HTTPAdapter`)."""

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
        headers = {**self._static_headers, **self.key_headers(api_key)}
        if self.request_id_header:
            headers[self.request_id_header] = ctx.request_id
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
        except UpstreamError as exc:
            raise name_target(exc, route) from exc.__cause__
        if not 200 <= response.status < 300:
            await raise_for_upstream_status(response, route, sent=describe_request(
                "POST", url, ctx.payload, model=target.model, stream=ctx.stream, request_id_header=self.request_id_header))
        return UpstreamReply(response, target=route, timeouts=self.timeouts, sent_at=sent_at)
