"""A fast, scriptable fake OpenAI-compatible upstream server.

Used by end-to-end tests, the demo and throughput benchmarks as a stand-in for
a real provider (OpenAI, vLLM, ...).  Run it as a process::

    python -m asgi_llm.testing.fake_upstream --host 127.0.0.1 --port 9001 \\
        --name provider-a [--models m1,m2] [--api-key K] \\
        [--fault '{"kind": "status", "status": 503}' ...] [--embedding-dims 8]

Design
------
The server is written directly on ``asyncio`` (an :class:`asyncio.Protocol`
per connection, uvloop when importable) with ``httptools`` doing the HTTP/1.1
parsing.  No web framework sits in between, for two reasons:

* **speed** - it must never be the bottleneck of a gateway benchmark.  Plain
  (non-faulted, non-streaming) requests are answered synchronously from
  ``data_received`` without creating a task; keep-alive and pipelining work.
* **control over the socket** - faults need to reset a connection (TCP RST),
  stay silent, or cut a chunked body without its terminating chunk, which a
  framework would not let us do.

Plain responses carry ``Content-Length``; SSE streams use
``Transfer-Encoding: chunked`` with exactly one SSE event per chunk, written to
the socket immediately.

Everything the server generates is deterministic (see :func:`count_tokens` and
:func:`prompt_tokens_for`), so tests can predict replies and token usage:

* chat reply: ``"Hello from {name}. You said: {last user message text}"``,
  one completion token per whitespace-separated word, truncated (finish reason
  ``length``) by ``max_tokens`` / ``max_completion_tokens``;
* with ``tools`` (and ``tool_choice`` != ``"none"``): one call to the first tool
  (or the function named by ``tool_choice``) with arguments
  ``{"echo": "<last user text>"}``;
* with ``response_format`` ``json_object`` / ``json_schema``: content is
  ``json.dumps({"reply": <reply text>})``;
* embeddings: an L2-normalised vector derived from the sha256 of each input's
  JSON representation (``encoding_format="base64"`` is honoured).

Endpoints
---------
``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``, ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (vLLM-style gauges ``vllm:num_requests_running`` and
``vllm:num_requests_waiting``).

Control API (never faulted, never counted in the stats):
``POST /_fake/faults`` (one fault object or a list; appended),
``GET /_fake/faults``, ``DELETE /_fake/faults``, ``POST /_fake/reset``
(clears faults and stats), ``GET /_fake/stats``.

Stats: ``requests`` counts every non-control request by path (``/health`` and
``/metrics`` included); ``recent`` holds the last 50 ``/v1/*`` requests;
``usage`` bills what was actually generated (a stream cut by a fault or by the
client bills its prompt tokens plus the content written; error answers, resets
and garbage bill nothing); ``disconnects`` counts streams whose response had
started and whose client went away before it ended.

Faults
------
A fault is a dict ``{"kind": ..., "times": 1, "match": {...}, **options}``.
``times`` defaults to 1, ``null`` means "until cleared".  ``match`` may
constrain ``path``, ``model`` and ``stream`` (bool).  For every ``/v1/*``
request the first pending fault that matches is applied and its ``times``
decremented.  Faults only apply to ``/v1/*`` paths (never to ``/health``,
``/metrics`` or the control API).  Kinds:

``status``
    ``{"status": 503, "message": ..., "code": null, "type": "server_error",
    "retry_after": 2, "retry_after_ms": 150}``: OpenAI-shaped error with that
    status (``Retry-After`` / ``retry-after-ms`` headers when given).
``context_length``
    400 ``invalid_request_error`` / ``context_length_exceeded``.
``content_filter``
    400 ``invalid_request_error`` / ``content_policy_violation``.
``reject_prefill``
    400 "assistant prefill is not supported"; only matches when the last
    message has role ``assistant`` (otherwise it stays pending).
``reset``
    read the request, then reset the TCP connection (RST), no response.
``silence``
    read the request, never answer; the connection stays open.
``delay``
    ``{"delay_s": 1.0}``: wait, then answer normally.
``slow_first_token``
    ``{"delay_s": 1.0}``: streams send headers, then wait before the first
    chunk; non-streaming requests behave like ``delay``.
``chunk_delay``  (streams only)
    ``{"delay_s": 0.1}``: sleep between chunks - slow but healthy.
``cut``  (streams only)
    ``{"after_chunks": 3}``: after N content chunks close the connection with
    no terminating chunk and no ``[DONE]``.
``stall``  (streams only)
    ``{"after_chunks": 3}``: after N content chunks stop writing, keep the
    connection open.
``malformed``  (streams only)
    ``{"after_chunks": 2}``: after N content chunks write the event
    ``data: {"choices": [oops`` and then continue normally.
``no_done``  (streams only)
    finish the stream (terminating chunk included) without ``data: [DONE]``.
``garbage``
    200 with ``content-type: text/html`` and body ``<html>oops</html>``.
``misreport``
    ``{"usage": {"prompt_tokens": 1180591620717411303424}, "model": "..."}``: answer
    normally (streams too) but report that usage (merged over the true one) and/or that
    ``model`` - a lying or broken upstream. The stats still bill what was generated.
``huge``
    ``{"size": 52428800}``: streams send one event of ``size`` bytes (in 1 MiB
    pieces) before the first chunk, then continue normally; non-streaming requests
    get a 200 JSON body of ``size`` bytes.
``empty``
    ``{"status": 400}``: that status with an empty body and no reason (what
    llama-cpp-python's server answers to a request header it rejects).

"Content chunks" are the per-word chunks (per-fragment for tool-call arguments
and JSON mode).  Stream-only kinds never match non-streaming requests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import http
import itertools
import json
import math
import os
import socket
import struct
import time
import traceback
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import httptools

__all__ = [
    "FAULT_KINDS",
    "STREAM_ONLY_FAULTS",
    "FakeUpstream",
    "count_tokens",
    "main",
    "prompt_tokens_for",
    "serve",
]

FAULT_KINDS = frozenset(
    {
        "status",
        "context_length",
        "content_filter",
        "reject_prefill",
        "reset",
        "silence",
        "delay",
        "slow_first_token",
        "chunk_delay",
        "cut",
        "stall",
        "malformed",
        "no_done",
        "garbage",
        "misreport",
        "huge",
        "empty",
    }
)
STREAM_ONLY_FAULTS = frozenset({"chunk_delay", "cut", "stall", "malformed", "no_done"})

RECENT_MAX = 50
_JSON_CT = b"application/json"
_MALFORMED_EVENT = b'data: {"choices": [oops\n\n'
_DONE_EVENT = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------- #
# Deterministic token accounting
# --------------------------------------------------------------------------- #
def count_tokens(text: str) -> int:
    """Return the fake token count of ``text``: its number of whitespace-separated words."""
    return len(text.split())


def content_text(content: Any) -> str:
    """Return the text of a message ``content`` (string, list of text parts or None)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
        return " ".join(parts)
    return ""


def prompt_tokens_for(messages: Iterable[Any]) -> int:
    """Return the prompt token count of chat ``messages``: sum of (tokens of content + 1)."""
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        total += count_tokens(content_text(content)) + 1
    return total


def _last_user_text(messages: Sequence[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return _dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def _split_pieces(text: str, n: int = 3) -> list[str]:
    """Split ``text`` into at most ``n`` non-empty consecutive pieces."""
    if not text:
        return [""]
    size = max(1, math.ceil(len(text) / n))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _embedding(item: Any, dims: int) -> list[float]:
    seed = json.dumps(item, separators=(",", ":"), sort_keys=True).encode()
    raw = b""
    block = hashlib.sha256(seed).digest()
    counter = 0
    while len(raw) < dims:
        raw += block
        counter += 1
        block = hashlib.sha256(block + counter.to_bytes(4, "little")).digest()
    vec = [b / 127.5 - 1.0 for b in raw[:dims]]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


# --------------------------------------------------------------------------- #
# Requests, faults, generated answers
# --------------------------------------------------------------------------- #
class _Request:
    __slots__ = ("method", "path", "headers", "body", "keep_alive")

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes, keep_alive: bool):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


@dataclass
class Fault:
    """One scripted fault (see the module docstring for the kinds and options)."""

    kind: str
    times: int | None = 1
    match: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Any) -> Fault:
        """Validate and build a fault from its JSON form; raises ``ValueError``."""
        if not isinstance(raw, dict):
            raise ValueError("a fault must be a JSON object")
        data = dict(raw)
        kind = data.pop("kind", None)
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        times = data.pop("times", 1)
        if times is not None and (not isinstance(times, int) or isinstance(times, bool) or times < 1):
            raise ValueError("'times' must be a positive integer or null")
        match = data.pop("match", None) or {}
        if not isinstance(match, dict):
            raise ValueError("'match' must be an object")
        return cls(kind=kind, times=times, match=match, options=data)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form of the fault (as listed by ``GET /_fake/faults``)."""
        return {"kind": self.kind, "times": self.times, "match": self.match, **self.options}

    def float_opt(self, name: str, default: float) -> float:
        """Return numeric option ``name`` as a float (``default`` if absent or not a number)."""
        value = self.options.get(name, default)
        return float(value) if isinstance(value, (int, float)) else default

    def int_opt(self, name: str, default: int) -> int:
        """Return numeric option ``name`` as an int (``default`` if absent or not a number)."""
        value = self.options.get(name, default)
        return int(value) if isinstance(value, (int, float)) else default


@dataclass
class _Choice:
    pieces: list[str]  # content fragments, "".join(pieces) is the full text/arguments
    finish_reason: str


@dataclass
class _Static:
    """A precomputed JSON answer (embeddings, model list)."""

    payload: bytes
    prompt_tokens: int = 0
    completion_tokens: int = 0
    billed: bool = True

    def body(self) -> bytes:
        return self.payload


@dataclass
class _Generation:
    """The full deterministic answer to a generation request, before framing."""

    endpoint: str  # "chat" | "completion"
    model: str
    id: str
    created: int
    choices: list[_Choice]
    prompt_tokens: int
    completion_tokens: int
    include_usage: bool = False
    tool_call: tuple[str, str] | None = None  # (call id, function name)
    billed: bool = True
    reported_usage: dict[str, Any] | None = None  # a ``misreport`` fault's usage

    def usage(self, completion_tokens: int | None = None) -> dict[str, Any]:
        ct = self.completion_tokens if completion_tokens is None else completion_tokens
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": ct,
                                 "total_tokens": self.prompt_tokens + ct}
        if self.reported_usage:
            usage.update(self.reported_usage)
        return usage

    def misreport(self, options: dict[str, Any]) -> None:
        """Report ``options["usage"]`` (merged) and/or ``options["model"]`` instead of the truth."""
        if isinstance(options.get("usage"), dict):
            self.reported_usage = dict(options["usage"])
        if isinstance(options.get("model"), str):
            self.model = options["model"]

    # -- non-streaming -------------------------------------------------------
    def body(self) -> bytes:
        if self.endpoint == "completion":
            return _dumps(
                {
                    "id": self.id,
                    "object": "text_completion",
                    "created": self.created,
                    "model": self.model,
                    "choices": [
                        {"text": "".join(c.pieces), "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                        for i, c in enumerate(self.choices)
                    ],
                    "usage": self.usage(),
                }
            )
        choice = self.choices[0]
        text = "".join(choice.pieces)
        message: dict[str, Any]
        if self.tool_call is not None:
            call_id, fn_name = self.tool_call
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": call_id, "type": "function", "function": {"name": fn_name, "arguments": text}}],
            }
        else:
            message = {"role": "assistant", "content": text}
        return _dumps(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": choice.finish_reason}],
                "usage": self.usage(),
            }
        )

    # -- streaming -----------------------------------------------------------
    def events(self) -> list[tuple[bool, bytes, str]]:
        """Return the SSE events as ``(is_content, event_bytes, content_text)``, without [DONE]."""
        out: list[tuple[bool, bytes, str]] = []
        obj = "text_completion" if self.endpoint == "completion" else "chat.completion.chunk"
        usage_null = self.include_usage

        def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None, final: bool = False) -> bytes:
            chunk: dict[str, Any] = {
                "id": self.id,
                "object": obj,
                "created": self.created,
                "model": self.model,
                "choices": choices,
            }
            if usage_null:
                chunk["usage"] = usage if final else None
            return b"data: " + _dumps(chunk) + b"\n\n"

        if self.endpoint == "completion":
            for index, choice in enumerate(self.choices):
                for piece in choice.pieces:
                    ev = event([{"text": piece, "index": index, "logprobs": None, "finish_reason": None}])
                    out.append((True, ev, piece))
            for index, choice in enumerate(self.choices):
                ev = event([{"text": "", "index": index, "logprobs": None, "finish_reason": choice.finish_reason}])
                out.append((False, ev, ""))
        else:
            choice = self.choices[0]

            def delta(d: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
                return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]

            if self.tool_call is not None:
                call_id, fn_name = self.tool_call
                head = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"index": 0, "id": call_id, "type": "function", "function": {"name": fn_name, "arguments": ""}}
                    ],
                }
                out.append((False, event(delta(head)), ""))
                for piece in choice.pieces:
                    d = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
                    out.append((True, event(delta(d)), piece))
            else:
                out.append((False, event(delta({"role": "assistant", "content": ""})), ""))
                for piece in choice.pieces:
                    out.append((True, event(delta({"content": piece})), piece))
            out.append((False, event(delta({}, choice.finish_reason)), ""))
        if self.include_usage:
            out.append((False, event([], self.usage(), final=True), ""))
        return out


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


# --------------------------------------------------------------------------- #
# Connection protocol
# --------------------------------------------------------------------------- #
class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: parses requests and serialises their handling."""

    def __init__(self, server: FakeUpstream) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._pending: collections.deque[_Request] = collections.deque()
        self._busy = False
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop transports are not subclasses
        self.server._connections.add(self)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - platform specific
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server._connections.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake_drain()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fatal(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fatal(400, f"malformed HTTP request: {exc}")

    # -- httptools callbacks -------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        path = self._url.split(b"?", 1)[0].decode("latin-1")
        request = _Request(
            self.parser.get_method().decode("latin-1"),
            path,
            self._headers,
            b"".join(self._body),
            self.parser.should_keep_alive(),
        )
        self._pending.append(request)
        if not self._busy:
            self._process()

    # -- request processing ----------------------------------------------------
    def _process(self) -> None:
        while self._pending and not self.closed:
            request = self._pending.popleft()
            try:
                pending = self.server._dispatch(request, self)
            except Exception:  # pragma: no cover - defensive
                traceback.print_exc()
                self.send(500, _error_body("fake upstream internal error", "server_error"), keep_alive=False)
                pending = None
            if pending is None:
                if not request.keep_alive:
                    self.close()
                    return
                continue
            self._busy = True
            task = self.loop.create_task(self._run(pending, request))
            self.server._tasks.add(task)
            task.add_done_callback(self.server._tasks.discard)
            return

    async def _run(self, pending: Coroutine[Any, Any, None], request: _Request) -> None:
        try:
            await pending
        except asyncio.CancelledError:
            self.abort()
            raise
        except Exception:  # pragma: no cover - defensive
            traceback.print_exc()
            self.abort()
        finally:
            self._busy = False
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        if not request.keep_alive:
            self.close()
            return
        self._process()

    # -- output helpers --------------------------------------------------------
    def write(self, data: bytes) -> bool:
        """Write raw bytes; return False when the connection is gone."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    def send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: bytes = _JSON_CT,
        headers: Sequence[tuple[str, str]] = (),
        keep_alive: bool = True,
    ) -> None:
        """Write a complete response with ``Content-Length``."""
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, _reason(status)),
            b"content-type: " + content_type + b"\r\n",
            b"content-length: %d\r\n" % len(body),
            self.server._name_header,
        ]
        for name, value in headers:
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        head.append(body)
        self.write(b"".join(head))

    def send_error(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                   *, keep_alive: bool = True) -> None:
        """Write an OpenAI-shaped error response."""
        self.send(status, _error_body(message, type_, code, param), keep_alive=keep_alive)

    def start_chunked(self, status: int = 200, content_type: bytes = b"text/event-stream") -> bool:
        return self.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n%s\r\n" % (status, _reason(status), content_type, self.server._name_header)
        )

    def write_chunk(self, data: bytes) -> bool:
        return self.write(b"%x\r\n%s\r\n" % (len(data), data))

    async def drain(self) -> None:
        if not self._paused or self.closed:
            return
        waiter = self.loop.create_future()
        self._drain_waiter = waiter
        await waiter

    def _wake_drain(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def sleep_or_lost(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; return True (early) if the client went away."""
        if self.closed:
            return True
        if delay > 0:
            await asyncio.wait([self.lost], timeout=delay)
        return self.closed

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0)."""
        if self.transport is None or self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, AttributeError):  # pragma: no cover - platform specific
                pass
        self.transport.abort()

    def _fatal(self, status: int, message: str) -> None:
        self.send_error(status, message, "invalid_request_error", keep_alive=False)
        self._pending.clear()
        self.close()


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


# --------------------------------------------------------------------------- #
# The server
# --------------------------------------------------------------------------- #
class FakeUpstream:
    """The fake upstream: routing, generation, faults and stats.

    Use :meth:`start` inside a running event loop (or :func:`serve` /
    :func:`main` to run it as a process).
    """

    def __init__(
        self,
        name: str = "fake",
        *,
        models: Sequence[str] = ("fake-model",),
        api_key: str | None = None,
        embedding_dims: int = 8,
        faults: Iterable[dict[str, Any]] = (),
    ) -> None:
        self.name = name
        self.models = list(models) or ["fake-model"]
        self.api_key = api_key
        self.embedding_dims = max(1, embedding_dims)
        self.faults: list[Fault] = [Fault.from_dict(f) for f in faults]
        self._name_header = f"x-fake-upstream: {name}\r\n".encode("latin-1")
        self._ids = itertools.count(1)
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self.reset_stats()

    # -- lifecycle -----------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.AbstractServer:
        """Start listening; returns the asyncio server (``port=0`` picks a free port)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=1024, reuse_address=True)
        return self._server

    @property
    def port(self) -> int:
        """The bound TCP port (after :meth:`start`)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening, drop every connection and cancel pending handlers."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- stats -----------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero every counter (``in_flight`` is live state and is kept)."""
        self.requests: collections.Counter[str] = collections.Counter()
        self.by_model: collections.Counter[str] = collections.Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.billed_requests = 0
        self.disconnects = 0
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_MAX)
        if not hasattr(self, "in_flight"):
            self.in_flight = 0

    def stats(self) -> dict[str, Any]:
        """Return the stats document served at ``GET /_fake/stats``."""
        return {
            "name": self.name,
            "requests": dict(self.requests),
            "by_model": dict(self.by_model),
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "billed_requests": self.billed_requests,
            },
            "disconnects": self.disconnects,
            "in_flight": self.in_flight,
            "faults_pending": len(self.faults),
            "recent": list(self.recent),
        }

    def _bill(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.billed_requests += 1

    def _metrics(self) -> bytes:
        label = f'{{model_name="{self.models[0]}"}}'
        return (
            "# HELP vllm:num_requests_running Number of requests currently running.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{label} {float(self.in_flight)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{label} 0.0\n"
        ).encode()

    # -- faults ------------------------------------------------------------------
    def add_faults(self, raw: Any) -> int:
        """Validate and append one fault dict or a list of them; returns how many were added."""
        items = raw if isinstance(raw, list) else [raw]
        faults = [Fault.from_dict(item) for item in items]
        self.faults.extend(faults)
        return len(faults)

    def _take_fault(self, path: str, model: str | None, body: Any, stream: bool) -> Fault | None:
        for index, fault in enumerate(self.faults):
            match = fault.match
            if "path" in match and match["path"] != path:
                continue
            if "model" in match and match["model"] != model:
                continue
            if "stream" in match and bool(match["stream"]) != stream:
                continue
            if fault.kind in STREAM_ONLY_FAULTS and not stream:
                continue
            if fault.kind == "reject_prefill":
                messages = body.get("messages") if isinstance(body, dict) else None
                if not (
                    isinstance(messages, list)
                    and messages
                    and isinstance(messages[-1], dict)
                    and messages[-1].get("role") == "assistant"
                ):
                    continue
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self.faults[index]
            return fault
        return None

    # -- dispatch ------------------------------------------------------------------
    def _dispatch(self, req: _Request, conn: _Connection) -> Coroutine[Any, Any, None] | None:
        """Handle ``req``; returns None when answered synchronously, else a coroutine to run."""
        path = req.path
        keep = req.keep_alive
        if path.startswith("/_fake/"):
            self._control(req, conn)
            return None
        self.requests[path] += 1
        if path == "/health" and req.method in ("GET", "HEAD"):
            conn.send(200, b'{"status":"ok"}', keep_alive=keep)
            return None
        if path == "/metrics" and req.method == "GET":
            conn.send(200, self._metrics(), content_type=b"text/plain; version=0.0.4; charset=utf-8", keep_alive=keep)
            return None
        route = _ROUTES.get(path)
        if route is None or not path.startswith("/v1/"):
            conn.send_error(404, f"Unknown request URL: {req.method} {path}.", "invalid_request_error",
                            "unknown_url", keep_alive=keep)
            return None
        method, kind = route
        body: Any = None
        bad_json = False
        if req.body:
            try:
                body = json.loads(req.body)
            except ValueError:
                bad_json = True
        self.recent.append({"path": path, "method": req.method, "headers": req.headers, "body": body})
        if req.method != method:
            conn.send_error(405, f"Method {req.method} not allowed for {path}.", "invalid_request_error",
                            "method_not_allowed", keep_alive=keep)
            return None
        if self.api_key is not None and req.headers.get("authorization") != f"Bearer {self.api_key}":
            conn.send_error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key",
                            keep_alive=keep)
            return None
        if kind == "models":
            answer: _Generation | _Static = _Static(self._models_body(), billed=False)
            fault = self._take_fault(path, None, None, False)
            if fault is None:
                conn.send(200, answer.body(), keep_alive=keep)
                return None
            return self._faulted(fault, conn, keep, answer)
        # POST endpoints
        if bad_json or not isinstance(body, dict):
            if bad_json or body is None:
                msg = "We could not parse the JSON body of your request."
            else:
                msg = "The request body must be a JSON object."
            conn.send_error(400, msg, "invalid_request_error", "invalid_json", keep_alive=keep)
            return None
        raw_model = body.get("model")
        model = raw_model if isinstance(raw_model, str) and raw_model else self.models[0]
        stream = kind != "embeddings" and bool(body.get("stream"))
        try:
            if kind == "embeddings":
                answer = self._embeddings(body, model)
            elif kind == "chat":
                answer = self._chat(body, model)
            else:
                answer = self._completion(body, model)
        except _BadRequest as exc:
            conn.send_error(400, exc.message, "invalid_request_error", None, exc.param, keep_alive=keep)
            return None
        self.by_model[model] += 1
        fault = self._take_fault(path, model, body, stream)
        if fault is not None and fault.kind == "misreport":
            if isinstance(answer, _Generation):
                answer.misreport(fault.options)
            fault = None
        if not stream:
            if fault is None:
                conn.send(200, answer.body(), keep_alive=keep)
                self._bill_answer(answer)
                return None
            return self._faulted(fault, conn, keep, answer)
        assert isinstance(answer, _Generation)
        if fault is not None and fault.kind not in ("slow_first_token", "huge") and fault.kind not in STREAM_ONLY_FAULTS:
            return self._faulted(fault, conn, keep, answer)
        return self._stream(conn, answer, fault)

    def _control(self, req: _Request, conn: _Connection) -> None:
        keep = req.keep_alive
        path, method = req.path, req.method
        if path == "/_fake/faults" and method == "POST":
            try:
                added = self.add_faults(json.loads(req.body or b"null"))
            except ValueError as exc:
                conn.send_error(400, str(exc), "invalid_request_error", keep_alive=keep)
                return
            conn.send(200, _dumps({"added": added, "faults_pending": len(self.faults)}), keep_alive=keep)
        elif path == "/_fake/faults" and method == "GET":
            conn.send(200, _dumps({"faults": [f.to_dict() for f in self.faults]}), keep_alive=keep)
        elif path == "/_fake/faults" and method == "DELETE":
            self.faults.clear()
            conn.send(200, b'{"faults_pending":0}', keep_alive=keep)
        elif path == "/_fake/reset" and method == "POST":
            self.faults.clear()
            self.reset_stats()
            conn.send(200, b'{"status":"ok"}', keep_alive=keep)
        elif path == "/_fake/stats" and method == "GET":
            conn.send(200, _dumps(self.stats()), keep_alive=keep)
        else:
            conn.send_error(404, f"Unknown control URL: {method} {path}.", "invalid_request_error", "unknown_url",
                            keep_alive=keep)

    # -- generation ------------------------------------------------------------------
    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    @staticmethod
    def _max_tokens(body: dict[str, Any]) -> int | None:
        for key in ("max_completion_tokens", "max_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return max(0, value)
        return None

    @staticmethod
    def _words_choice(reply: str, limit: int | None) -> _Choice:
        words = reply.split()
        finish = "stop"
        if limit is not None and limit < len(words):
            words = words[:limit]
            finish = "length"
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        return _Choice(pieces, finish)

    def _chat(self, body: dict[str, Any], model: str) -> _Generation:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty array.", "messages")
        user_text = _last_user_text(messages)
        reply = f"Hello from {self.name}. You said: {user_text}"
        stream_options = body.get("stream_options")
        include_usage = bool(body.get("stream")) and isinstance(stream_options, dict) and \
            bool(stream_options.get("include_usage"))
        gen = _Generation("chat", model, self._next_id("chatcmpl"), int(time.time()), [],
                          prompt_tokens_for(messages), 0, include_usage)
        tools = body.get("tools")
        tool_choice = body.get("tool_choice")
        response_format = body.get("response_format")
        if isinstance(tools, list) and tools and tool_choice != "none":
            fn_name = None
            if isinstance(tool_choice, dict):
                fn_name = (tool_choice.get("function") or {}).get("name")
            if not isinstance(fn_name, str):
                first = tools[0] if isinstance(tools[0], dict) else {}
                fn_name = (first.get("function") or {}).get("name") or "tool"
            arguments = json.dumps({"echo": user_text})
            gen.tool_call = (f"call_{next(self._ids)}", fn_name)
            gen.choices = [_Choice(_split_pieces(arguments), "tool_calls")]
            gen.completion_tokens = max(1, count_tokens(arguments))
        elif isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
            content = json.dumps({"reply": reply})
            gen.choices = [_Choice(_split_pieces(content), "stop")]
            gen.completion_tokens = count_tokens(content)
        else:
            choice = self._words_choice(reply, self._max_tokens(body))
            gen.choices = [choice]
            gen.completion_tokens = len(choice.pieces)
        return gen

    def _completion(self, body: dict[str, Any], model: str) -> _Generation:
        prompt = body.get("prompt")
        prompts: list[str]
        prompt_tokens = 0
        if isinstance(prompt, str):
            prompts = [prompt]
            prompt_tokens = count_tokens(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
            prompt_tokens = sum(count_tokens(p) for p in prompts)
        elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            prompts = [" ".join(str(p) for p in prompt)]
            prompt_tokens = len(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            prompts = [" ".join(str(t) for t in p) for p in prompt]
            prompt_tokens = sum(len(p) for p in prompt)
        else:
            raise _BadRequest("'prompt' must be a string, an array of strings or token arrays.", "prompt")
        limit = self._max_tokens(body)
        choices = [self._words_choice(f"Hello from {self.name}. You said: {p}", limit) for p in prompts]
        stream_options = body.get("stream_options")
        include_usage = bool(body.get("stream")) and isinstance(stream_options, dict) and \
            bool(stream_options.get("include_usage"))
        return _Generation("completion", model, self._next_id("cmpl"), int(time.time()), choices, prompt_tokens,
                           sum(len(c.pieces) for c in choices), include_usage)

    def _embeddings(self, body: dict[str, Any], model: str) -> _Static:
        raw = body.get("input")
        items: list[Any]
        if isinstance(raw, str):
            items = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
            items = list(raw)
        elif isinstance(raw, list) and raw and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
            items = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
            items = list(raw)
        else:
            raise _BadRequest("'input' must be a string, an array of strings, or token arrays.", "input")
        dims = body.get("dimensions")
        n = dims if isinstance(dims, int) and not isinstance(dims, bool) and dims > 0 else self.embedding_dims
        as_b64 = body.get("encoding_format") == "base64"
        data = []
        tokens = 0
        for index, item in enumerate(items):
            tokens += count_tokens(item) if isinstance(item, str) else len(item)
            vec = _embedding(item, n)
            emb: Any = base64.b64encode(struct.pack(f"<{n}f", *vec)).decode() if as_b64 else vec
            data.append({"object": "embedding", "index": index, "embedding": emb})
        payload = _dumps({"object": "list", "data": data, "model": model,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        return _Static(payload, prompt_tokens=tokens)

    def _models_body(self) -> bytes:
        return _dumps(
            {"object": "list",
             "data": [{"id": m, "object": "model", "created": 0, "owned_by": self.name} for m in self.models]}
        )

    # -- faulted / async paths ---------------------------------------------------
    def _error_fault(self, fault: Fault, conn: _Connection, keep: bool) -> bool:
        """Answer synchronous error-like faults; returns True if handled."""
        kind = fault.kind
        if kind == "status":
            status = fault.int_opt("status", 500)
            default_type = "server_error" if status >= 500 else ("requests" if status == 429 else
                                                                 "invalid_request_error")
            default_code = "rate_limit_exceeded" if status == 429 else None
            headers: list[tuple[str, str]] = []
            if fault.options.get("retry_after") is not None:
                headers.append(("retry-after", str(fault.options["retry_after"])))
            if fault.options.get("retry_after_ms") is not None:
                headers.append(("retry-after-ms", str(fault.options["retry_after_ms"])))
            message = fault.options.get("message") or f"fake upstream {self.name}: injected HTTP {status}"
            body = _error_body(str(message), str(fault.options.get("type") or default_type),
                               fault.options.get("code", default_code), fault.options.get("param"))
            conn.send(status, body, headers=headers, keep_alive=keep)
        elif kind == "context_length":
            limit = fault.int_opt("max_context", 4096)
            message = fault.options.get("message") or (
                f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
                f"{limit + 1} tokens. Please reduce the length of the messages."
            )
            conn.send_error(400, str(message), "invalid_request_error", "context_length_exceeded", "messages",
                            keep_alive=keep)
        elif kind == "content_filter":
            message = fault.options.get("message") or (
                "Your request was rejected as a result of our safety system."
            )
            conn.send_error(400, str(message), "invalid_request_error", "content_policy_violation", None,
                            keep_alive=keep)
        elif kind == "reject_prefill":
            message = fault.options.get("message") or "assistant prefill is not supported"
            conn.send_error(400, str(message), "invalid_request_error", "unsupported_prefill", "messages",
                            keep_alive=keep)
        elif kind == "garbage":
            conn.send(200, b"<html>oops</html>", content_type=b"text/html", keep_alive=keep)
        elif kind == "huge":  # non-streaming (streams get theirs in _stream)
            size = fault.int_opt("size", 50 * 1024 * 1024)
            conn.send(200, b'{"pad":"' + b"x" * max(size - 10, 0) + b'"}', keep_alive=keep)
        elif kind == "empty":
            conn.send(fault.int_opt("status", 400), b"", keep_alive=keep)
        elif kind == "reset":
            conn.reset()
        else:
            return False
        return True

    def _bill_answer(self, answer: _Generation | _Static) -> None:
        if answer.billed:
            self._bill(answer.prompt_tokens, answer.completion_tokens)

    def _faulted(
        self, fault: Fault, conn: _Connection, keep: bool, answer: _Generation | _Static
    ) -> Coroutine[Any, Any, None] | None:
        """Apply ``fault`` to a request answered as a whole (or an error fault to a stream)."""
        if self._error_fault(fault, conn, keep):
            return None
        return self._delayed(fault, conn, keep, answer)

    async def _delayed(self, fault: Fault, conn: _Connection, keep: bool, answer: _Generation | _Static) -> None:
        """``silence``, ``delay`` and non-streaming ``slow_first_token``."""
        self.in_flight += 1
        try:
            if fault.kind == "silence":
                await conn.lost
                return
            if await conn.sleep_or_lost(fault.float_opt("delay_s", 1.0)):
                return
            conn.send(200, answer.body(), keep_alive=keep)
            self._bill_answer(answer)
        finally:
            self.in_flight -= 1

    async def _stream(self, conn: _Connection, gen: _Generation, fault: Fault | None) -> None:
        """Write ``gen`` as an SSE stream, applying a stream fault if any."""
        self.in_flight += 1
        written: list[str] = []
        kind = fault.kind if fault is not None else None
        try:
            if not conn.start_chunked():
                return
            first_delay = fault.float_opt("delay_s", 1.0) if fault is not None and kind == "slow_first_token" else 0.0
            if first_delay and await conn.sleep_or_lost(first_delay):
                self._stream_gone(gen, written)
                return
            if kind == "huge":
                size, piece = fault.int_opt("size", 50 * 1024 * 1024), 1024 * 1024  # type: ignore[union-attr]
                conn.write_chunk(b'data: {"pad":"')
                for _ in range(size // piece):
                    if not conn.write_chunk(b"x" * piece):
                        self._stream_gone(gen, written)
                        return
                    await conn.drain()
                conn.write_chunk(b'"}\n\n')
            events = gen.events()
            total = sum(1 for is_content, _, _ in events if is_content)
            after = fault.int_opt("after_chunks", 0) if fault is not None else 0
            chunk_delay = fault.float_opt("delay_s", 0.1) if fault is not None and kind == "chunk_delay" else 0.0
            triggered = False
            for position, (is_content, data, text) in enumerate(events):
                if not triggered and kind in ("cut", "stall", "malformed") and \
                        (is_content or len(written) == total) and len(written) >= after:
                    triggered = True
                    if kind == "cut":
                        self._bill(gen.prompt_tokens, count_tokens("".join(written)))
                        conn.close()
                        return
                    if kind == "stall":
                        await conn.lost
                        self._stream_gone(gen, written)
                        return
                    conn.write_chunk(_MALFORMED_EVENT)
                if chunk_delay and position > 0 and await conn.sleep_or_lost(chunk_delay):
                    self._stream_gone(gen, written)
                    return
                if not conn.write_chunk(data):
                    self._stream_gone(gen, written)
                    return
                if is_content:
                    written.append(text)
                await conn.drain()
            if kind != "no_done":
                if chunk_delay and await conn.sleep_or_lost(chunk_delay):
                    self._stream_gone(gen, written)
                    return
                conn.write_chunk(_DONE_EVENT)
            if not conn.write(b"0\r\n\r\n"):
                self._stream_gone(gen, written)
                return
            self._bill(gen.prompt_tokens, gen.completion_tokens)
        finally:
            self.in_flight -= 1

    def _stream_gone(self, gen: _Generation, written: list[str]) -> None:
        """Account for a started stream whose client went away."""
        self.disconnects += 1
        self._bill(gen.prompt_tokens, count_tokens("".join(written)))


_ROUTES: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("POST", "chat"),
    "/v1/completions": ("POST", "completion"),
    "/v1/embeddings": ("POST", "embeddings"),
    "/v1/models": ("GET", "models"),
}


# --------------------------------------------------------------------------- #
# Entry points
# --------------------------------------------------------------------------- #
async def serve(
    host: str,
    port: int,
    upstream: FakeUpstream,
    *,
    exit_with_parent: bool = False,
) -> None:
    """Run ``upstream`` on ``host:port`` until SIGINT/SIGTERM (or the parent process dies)."""
    import signal

    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def _stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, _stop)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-POSIX
            pass
    await upstream.start(host, port)
    print(f"fake upstream {upstream.name!r} listening on http://{host}:{upstream.port}", flush=True)

    async def _watch_parent() -> None:
        parent = os.getppid()
        while not stop.done():
            await asyncio.sleep(0.5)
            if os.getppid() != parent:
                _stop()

    watcher = loop.create_task(_watch_parent()) if exit_with_parent else None
    try:
        await stop
    finally:
        if watcher is not None:
            watcher.cancel()
        await upstream.close()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m asgi_llm.testing.fake_upstream",
        description="Fast fake OpenAI-compatible upstream with scripted faults.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--name", default="fake", help="provider name used in replies and owned_by")
    parser.add_argument("--models", default="fake-model", help="comma-separated model ids for /v1/models")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--fault", action="append", default=[], metavar="JSON",
                        help="pre-load a fault (object or list); repeatable")
    parser.add_argument("--embedding-dims", type=int, default=8)
    parser.add_argument("--exit-with-parent", action="store_true",
                        help="exit when the parent process dies (used by the test helpers)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (``python -m asgi_llm.testing.fake_upstream``)."""
    args = _parse_args(argv)
    faults: list[dict[str, Any]] = []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        for raw in args.fault:
            value = json.loads(raw)
            faults.extend(value if isinstance(value, list) else [value])
        upstream = FakeUpstream(args.name, models=models, api_key=args.api_key,
                                embedding_dims=args.embedding_dims, faults=faults)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError too
        raise SystemExit(f"fake_upstream: invalid --fault: {exc}") from None
    coro = serve(args.host, args.port, upstream, exit_with_parent=args.exit_with_parent)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
