"""The ``ProviderAdapter`` seam: one attempt against one target.

An adapter turns the request on the context into the upstream's wire format, sends it
through its :class:`~asgi_llm.providers.transport.UpstreamTransport`, and hands back an
:class:`UpstreamReply` that speaks OpenAI's format whatever the upstream speaks:
``body()`` for a whole response, ``chunks()`` for a stream of chat/completion chunks.
Everything that goes wrong is an :class:`~asgi_llm.errors.UpstreamError` whose
``retryable`` flag tells failover whether another target may help.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit


from asgi_llm._sse import SSEEvent, SSEEventTooLarge, SSEParser
from asgi_llm._timeout import TimeoutPerWait, fail_after
from asgi_llm.errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)

if TYPE_CHECKING:
    from asgi_llm.context import RequestContext
    from asgi_llm.providers.key_pool import KeyPool
    from asgi_llm.providers.transport import UpstreamResponse
    from asgi_llm.targets import Target

__all__ = [
    "Chunk",
    "ProviderAdapter",
    "Timeouts",
    "UpstreamReply",
    "chunk_has_content",
    "describe_request",
    "name_target",
    "raise_for_upstream_status",
    "read_limited",
    "retry_after_seconds",
]

Chunk = tuple[bytes, dict[str, Any]]
"""One stream chunk: the SSE event's bytes, ready to relay, and the parsed object."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-attempt limits: times in seconds, sizes in bytes.

    ``attempt`` bounds a non-streaming call from send to the last body byte, and a
    stream's wait for its response headers. ``ttft`` bounds a stream's wait for its
    first content (time to first token). ``idle`` bounds the silence between two
    stream chunks after that. ``connect`` is handled by the transport.
    ``max_response_bytes`` bounds a whole (non-stream) answer and ``max_event_bytes``
    one stream event: an upstream (or node) that sends more fails the attempt cleanly
    (before the commit point, failover tries the next target) instead of growing the
    gateway's memory.
    """

    connect: float = 5.0
    attempt: float = 60.0
    ttft: float = 15.0
    idle: float = 30.0
    max_response_bytes: int = 64 * 1024 * 1024
    max_event_bytes: int = 16 * 1024 * 1024


class ProviderAdapter(Protocol):
    """Makes one attempt against a target of this provider.

    ``keys`` is the provider's upstream key pool; the caller picks a key and passes it.

    Example:
        >>> key_id, api_key = adapter.keys.pick(target.route)
        >>> reply = await adapter.send(ctx, target, api_key=api_key)
        >>> raw, obj = await reply.body()          # non-streaming
        >>> async for raw, obj in reply.chunks():  # streaming
        ...     ...
    """

    name: str
    keys: KeyPool

    async def send(self, ctx: RequestContext, target: Target, *, api_key: str | None = None) -> UpstreamReply:
        """Send ``ctx``'s request to ``target``; return once the upstream accepted it.

        Raises :class:`UpstreamError` (with ``retryable`` set) for connection failures,
        timeouts and non-2xx statuses. The returned reply must be closed.
        """
        ...

    async def aclose(self) -> None:
        """Close the adapter's connection pool."""
        ...


def chunk_has_content(obj: dict[str, Any]) -> bool:
    """Does this chunk carry answer content (the stream's commit point)?

    Content text, a tool-call delta, a refusal, reasoning text, legacy ``text``, or a
    ``finish_reason`` (an answer that is legitimately empty is still an answer).
    """
    choices = obj.get("choices")
    if not choices or not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") or choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("tool_calls") or delta.get("refusal")
            or delta.get("reasoning_content") or delta.get("reasoning") or delta.get("function_call")
        ):
            return True
    return False


class UpstreamReply:
    """An accepted upstream response, presented in OpenAI's format.

    The base class reads OpenAI-compatible bodies and SSE streams; adapters for other
    wire formats override :meth:`body` and :meth:`chunks`.
    """

    def __init__(self, response: UpstreamResponse, *, target: str, timeouts: Timeouts, sent_at: float) -> None:
        self.response = response
        self.target = target
        self.timeouts = timeouts
        self.sent_at = sent_at
        self.first_content_at: float | None = None

    @property
    def headers(self) -> Any:
        return self.response.headers

    async def body(self) -> tuple[bytes, dict[str, Any]]:
        """The whole JSON body (bytes to relay, parsed object), within the attempt timeout."""
        remaining = self.timeouts.attempt - (time.perf_counter() - self.sent_at)
        try:
            async with fail_after(max(remaining, 0.001)):
                raw = await read_limited(self.response, self.timeouts.max_response_bytes, self.target)
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"{self.target} did not finish its response within {self.timeouts.attempt:g} s.", target=self.target
            ) from None
        obj = _parse_json_object(raw, self.target)
        if "error" in obj and not obj.get("choices") and not obj.get("data"):
            raise _error_from_body(obj, 502, self.target, self.response.headers)
        return raw, obj

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Stream chunks until ``[DONE]``, enforcing time-to-first-token and idle limits.

        Raises :class:`UpstreamProtocolError` for a malformed chunk or a stream that
        ends without ``[DONE]``, :class:`UpstreamTimeoutError` for a stall, and an
        :class:`UpstreamError` for an ``{"error": ...}`` event.
        """
        async with contextlib.aclosing(self.events(lambda e: e.data == "[DONE]", "[DONE]")) as events:
            async for event in events:
                payload = event.data
                if payload == "[DONE]":
                    return
                if event.event is not None and event.event not in ("message", "chunk"):
                    if event.event == "error":
                        raise _error_from_event(payload, self.target)
                    continue
                obj = _parse_json_object(payload, self.target, what="stream chunk")
                if "error" in obj and not obj.get("choices"):
                    raise _error_from_body(obj, 502, self.target, None)
                if self.first_content_at is None and chunk_has_content(obj):
                    self.first_content_at = time.perf_counter()
                yield event.raw, obj

    async def events(self, is_end: Callable[[SSEEvent], bool], end_name: str) -> AsyncIterator[SSEEvent]:
        """Raw SSE events with the stream's time limits, up to and including the end event.

        The limit on each wait is the idle limit, or — until the consumer has set
        ``first_content_at`` — whatever is left of the time-to-first-token limit. After
        the end event the body is drained so the connection can be reused. A body that
        ends before the end event raises :class:`UpstreamProtocolError`.
        """
        parser = SSEParser(max_event_bytes=self.timeouts.max_event_bytes)
        iterator = self.response.iter_chunks().__aiter__()
        ttft_deadline = self.sent_at + self.timeouts.ttft
        waits = TimeoutPerWait()
        try:
            while True:
                if self.first_content_at is None:
                    wait = min(self.timeouts.idle, ttft_deadline - time.perf_counter())
                else:
                    wait = self.timeouts.idle
                try:
                    async with waits(max(wait, 0.001)):
                        data = await iterator.__anext__()
                except StopAsyncIteration:
                    if parser.pending.strip():
                        raise UpstreamProtocolError(f"{self.target} cut the stream mid-event.", target=self.target) from None
                    raise UpstreamProtocolError(
                        f"{self.target} ended the stream without {end_name}; the answer may be incomplete.",
                        target=self.target,
                    ) from None
                except TimeoutError:
                    if self.first_content_at is None:
                        raise UpstreamTimeoutError(
                            f"{self.target} sent no tokens within the time-to-first-token limit of {self.timeouts.ttft:g} s.",
                            target=self.target,
                        ) from None
                    raise UpstreamTimeoutError(
                        f"{self.target} stalled: no data for {self.timeouts.idle:g} s mid-stream.", target=self.target
                    ) from None
                try:
                    events = parser.feed(data)
                except SSEEventTooLarge:
                    raise UpstreamProtocolError(
                        f"{self.target} sent a stream event larger than {self.timeouts.max_event_bytes} bytes; "
                        "the attempt was abandoned.",
                        target=self.target,
                    ) from None
                for event in events:
                    if is_end(event):
                        # Drain first: the consumer usually stops at the end event.
                        await _drain(iterator)
                        yield event
                        return
                    yield event
        finally:
            await iterator.aclose()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.response.aclose()


async def _drain(iterator: AsyncIterator[bytes]) -> None:
    """Read to the end of the body after ``[DONE]`` (normally just the closing chunk),
    so the connection goes back to the pool instead of being dropped."""
    try:
        async with fail_after(1.0):
            async for _ in iterator:
                pass
    except (TimeoutError, UpstreamError):
        pass  # the answer is complete; a connection that misbehaves now is simply not reused


def name_target(exc: UpstreamError, route: str) -> UpstreamError:
    """``exc`` (from a transport, which names only the upstream's origin) with the target
    route named first, once — what a client may know of an upstream it could not reach."""
    if exc.target is None:
        exc.target = route
        exc.message = f"{route}: {exc.message}"
        exc.args = (exc.message,)
    return exc


async def read_limited(response: UpstreamResponse, limit: int, target: str, *, truncate: bool = False) -> bytes:
    """The whole body of ``response``, at most ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before reading; responses
    with ``read_at_most`` (both transports) stop reading at the limit; others are read
    whole and then checked. Past the limit: :class:`UpstreamProtocolError`, or with
    ``truncate`` an empty body (for error bodies, of which only a message is wanted).
    """
    headers = response.headers
    declared = headers.get("content-length") if headers else None
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raw: bytes | None = None
    else:
        read_at_most = getattr(response, "read_at_most", None)
        if read_at_most is not None:
            raw = await read_at_most(limit)
        else:
            raw = await response.read()
            raw = raw if len(raw) <= limit else None
    if raw is None:
        if truncate:
            return b""
        raise _too_large(target, limit)
    return raw


def _too_large(target: str, limit: int) -> UpstreamProtocolError:
    return UpstreamProtocolError(
        f"{target} sent a response larger than {limit} bytes; the attempt was abandoned.", target=target
    )


def _parse_json_object(raw: bytes | str, target: str, *, what: str = "response") -> dict[str, Any]:
    """``raw`` as a JSON object. Stream events arrive already decoded (``str``): parsing
    them as such skips json's encoding detection and a second UTF-8 decode per chunk."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        preview = raw[:80] if isinstance(raw, str) else raw[:80].decode("utf-8", "replace")
        raise UpstreamProtocolError(
            f"{target} sent a {what} that is not JSON (starts with {preview!r}).", target=target
        ) from None
    if not isinstance(obj, dict):
        raise UpstreamProtocolError(f"{target} sent a {what} that is not a JSON object.", target=target)
    return obj


def _error_from_event(payload: str, target: str) -> UpstreamError:
    try:
        obj = json.loads(payload)
    except ValueError:
        obj = {}
    return _error_from_body(obj if isinstance(obj, dict) else {}, 502, target, None)


def _error_from_body(obj: dict[str, Any], status: int, target: str, headers: Any,
                     no_message: str | None = None) -> UpstreamError:
    """The error for an upstream's error object; ``no_message`` (if given) is the whole
    message when the upstream gave none."""
    err = obj.get("error")
    message = None
    etype = code = param = None
    if isinstance(err, dict):
        message = err.get("message")
        etype = err.get("type")
        code = err.get("code")
        param = err.get("param")
    elif isinstance(err, str):
        message = err
    if not isinstance(message, str) or not message:
        message = no_message or f"{target} answered with HTTP {status}."
    else:
        message = f"{target}: {message}"
    return UpstreamStatusError(
        message,
        upstream_status=status,
        upstream_type=etype if isinstance(etype, str) else None,
        code=code if isinstance(code, str) else None,
        param=param if isinstance(param, str) else None,
        target=target,
        headers=_retry_headers(headers),
    )


def _retry_headers(headers: Any) -> dict[str, str]:
    if headers is None:
        return {}
    out = {}
    for name in ("retry-after", "retry-after-ms"):
        value = headers.get(name)
        # Relayed to the client as is: only short, printable ASCII (a date or a number);
        # anything else would not even encode as a header.
        if isinstance(value, str) and value and len(value) <= 64 and value.isascii() and value.isprintable():
            out[name] = value
    return out


_ERROR_BODY_BYTES = 64 * 1024
"""Of an error body only the message is wanted: read no more than this."""


_KNOWN_FORMATS = frozenset({"text", "json_object", "json_schema"})
_KNOWN_CHOICES = frozenset({"auto", "none", "required"})


def describe_request(method: str, url: str, payload: Mapping[str, Any], *, model: str, stream: bool,
                     request_id_header: str | None = None) -> str:
    """What was sent upstream, in a line a person can act on when the upstream says nothing.

    Only the URL's path (never its host, credentials or query), the upstream model name,
    and the shape of the request: counts and known enum values, never client text.

    Example:
        >>> describe_request("POST", "http://h/v1/chat/completions", {"messages": [{}, {}], "tools": [{}]},
        ...                  model="m", stream=True)
        "POST /v1/chat/completions (model 'm', stream, 2 messages, tools: 1)"
    """
    path = urlsplit(url).path[:100] or "/"
    parts = [f"model {model[:80]!r}"]
    if stream:
        parts.append("stream")
    for field, noun in (("messages", "message"), ("input", "input")):
        value = payload.get(field)
        if isinstance(value, list):
            parts.append(f"{len(value)} {noun}{'' if len(value) == 1 else 's'}")
    tools = payload.get("tools")
    if isinstance(tools, list) and tools:
        parts.append(f"tools: {len(tools)}")
    choice = payload.get("tool_choice")
    if isinstance(choice, str):
        parts.append(f"tool_choice: {choice if choice in _KNOWN_CHOICES else 'other'}")
    elif isinstance(choice, dict):
        parts.append("tool_choice: a named function")
    fmt = payload.get("response_format")
    if isinstance(fmt, dict):
        kind = fmt.get("type")
        parts.append(f"response_format: {kind if kind in _KNOWN_FORMATS else 'other'}")
    if request_id_header:
        parts.append(f"request id in header {request_id_header}")
    return f"{method} {path} ({', '.join(parts)})"


async def raise_for_upstream_status(response: UpstreamResponse, target: str, *, sent: str | None = None) -> None:
    """Raise the right :class:`UpstreamError` for a non-2xx response (and close it).

    ``sent`` (see :func:`describe_request`) goes into the message when the upstream's
    body gives no reason, e.g. an engine's bare ``400`` to a header it rejects.
    """
    try:
        try:
            async with fail_after(5):
                raw = await read_limited(response, _ERROR_BODY_BYTES, target, truncate=True)
        except (TimeoutError, UpstreamError):
            raw = b""
        try:
            obj = json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError):
            obj = {}
        if not isinstance(obj, dict) or "error" not in obj:
            text = raw[:200].decode("utf-8", "replace").strip()
            obj = {"error": {"message": text}} if text and not text.startswith("<") else {}
        no_message = None
        if sent is not None:
            body = "an empty body" if not raw.strip() else "no error message"
            status = response.status
            # A request the upstream refused (not a key, a rate limit or an outage): say where the reason is.
            hint = (": its own log says which field or header it rejected" if 400 <= status < 500
                    and status not in (401, 403, 407, 429) else "")
            no_message = f"{target} answered HTTP {status} with {body} to {sent}. It gave no reason{hint}."
        raise _error_from_body(obj, response.status, target, response.headers, no_message)
    finally:
        await response.aclose()


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds an upstream asked us to wait: ``retry-after-ms``, or ``Retry-After`` as
    seconds or an HTTP date. ``None`` when absent or unreadable."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    import datetime as _dt

    return max(0.0, (when - _dt.datetime.now(_dt.timezone.utc)).total_seconds())
