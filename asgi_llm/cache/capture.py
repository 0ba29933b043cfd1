"""Watch a response go by without holding it back, and keep what is needed to store it.

:class:`ResponseCapture` wraps ``send``: every message passes through at once; a JSON
body is kept (it is already whole), a stream is parsed as SSE and assembled chunk by
chunk (:class:`~asgi_llm.cache.entry.StreamAssembler`). :meth:`ResponseCapture.result`
then says whether there is an answer worth storing: a 200 whose last message was sent,
and for a stream ``[DONE]`` with no error event, no malformed chunk and nothing left
unparsed.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Message, Send

from asgi_llm._sse import SSEParser
from asgi_llm.cache.entry import StreamAssembler
from asgi_llm.context import RequestContext

__all__ = ["ResponseCapture"]


class ResponseCapture:
    """Pass every message through at once; keep what is needed to store the answer."""

    __slots__ = ("ctx", "_send", "status", "finished", "done", "_parts", "_parser", "_assembler")

    def __init__(self, ctx: RequestContext, send: Send) -> None:
        self.ctx = ctx
        self._send = send
        self.status = 0
        self.finished = False
        self.done = False
        self._parts: list[bytes] = []
        self._parser = SSEParser() if ctx.stream else None
        self._assembler = StreamAssembler(ctx.endpoint) if ctx.stream else None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body" and self.status == 200:
            body = message.get("body", b"")
            if self._parser is not None and self._assembler is not None:
                for event in self._parser.feed(body):
                    if event.data == "[DONE]":
                        self.done = True
                        continue
                    try:
                        self._assembler.feed(json.loads(event.data))
                    except ValueError:
                        self._assembler.feed(None)  # marks the stream broken
            elif body:
                self._parts.append(body)
            if not message.get("more_body", False):
                self.finished = True
        await self._send(message)

    def result(self) -> dict[str, Any] | None:
        """The answer to store, if the response was a complete 200."""
        if self.status != 200 or not self.finished:
            return None
        if self._assembler is not None:
            if not self.done or (self._parser is not None and self._parser.pending.strip()):
                return None
            return self._assembler.result(fallback_usage=self.ctx.usage)
        try:
            obj = json.loads(b"".join(self._parts))
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None
