"""The one per-request object every layer shares.

:class:`ContextMiddleware` creates a :class:`RequestContext` once, stores it at
``scope["asgi_llm"]`` and calls the next layer. Outer layers keep a reference to the
object; inner layers write their results on it (``principal``, ``plan``, ``target``,
``attempts``, ``usage``, ``cost``, ``cache_status``, ``timings``). Nothing re-parses the
body, and no middleware keeps per-request state on ``self``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from starlette.types import Scope

from asgi_llm._asgi import BodyReservation
from asgi_llm._ids import new_id

if TYPE_CHECKING:
    from asgi_llm.schemas import InferenceRequest
    from asgi_llm.targets import Target

__all__ = [
    "ANONYMOUS",
    "SCOPE_KEY",
    "Attempt",
    "BodyState",
    "CacheHit",
    "Endpoint",
    "Principal",
    "QuotaOutcome",
    "RequestContext",
    "Usage",
    "gateway_headers",
    "get_context",
    "new_request_id",
]

SCOPE_KEY = "asgi_llm"

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_INFLIGHT_BODY_BYTES = 256 * 1024 * 1024
DEFAULT_BODY_READ_TIMEOUT_S = 60.0

Endpoint = Literal["chat", "completions", "embeddings", "models", "health", "admin", "nodes", "other"]


def new_request_id() -> str:
    """A unique request id (``req_`` + 32 hex digits)."""
    return "req_" + new_id()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: set by auth, read by quota, cache, usage, audit and routing.

    ``models`` is the key's allow-list of public model names (``None`` = all);
    ``limits`` is whatever the quota layer attached for this key.
    """

    key_id: str
    org: str
    scopes: frozenset[str] = frozenset({"inference"})
    models: frozenset[str] | None = None
    name: str | None = None
    team: str | None = None
    limits: Any = None

    def allows_model(self, model: str) -> bool:
        """May this key use the public model ``model``?"""
        return self.models is None or "*" in self.models or model in self.models

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


ANONYMOUS = Principal(key_id="anonymous", org="default")
"""The principal of every request when no auth layer is configured."""


@dataclass(slots=True)
class Usage:
    """Token usage of one attempt, as the upstream reported it (or estimated, flagged)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        """Read an OpenAI ``usage`` object; ``None`` when it is missing or not an object."""
        if not isinstance(usage, dict):
            return None
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        details = usage.get("prompt_tokens_details")
        cdetails = usage.get("completion_tokens_details")
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=_int(usage.get("total_tokens")) or prompt + completion,
            cached_tokens=_int(details.get("cached_tokens")) if isinstance(details, dict) else 0,
            reasoning_tokens=_int(cdetails.get("reasoning_tokens")) if isinstance(cdetails, dict) else 0,
        )


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


@dataclass(slots=True)
class Attempt:
    """One attempt against one target, as the ledger records it.

    ``outcome``: ``ok`` (complete answer), ``error`` (failed before or during the
    answer), ``aborted`` (the client went away). ``usage`` is what the upstream
    reported, or what was counted of a cut stream (``usage.estimated``).
    """

    number: int
    route: str
    provider: str
    model: str
    started_at: float
    status: int = 0
    outcome: str = "error"
    error_code: str | None = None
    usage: Usage | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    response_model: str | None = None
    content_chunks: int = 0
    key_id: str = ""


@dataclass(slots=True)
class BodyState:
    """How (and whether yet) a request's body is read (:func:`asgi_llm.request.ensure_body`)."""

    max_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout_s: float | None = DEFAULT_BODY_READ_TIMEOUT_S
    reservation: BodyReservation = field(default_factory=lambda: BodyReservation(None))
    held: bool = False  # True until auth has accepted the key
    loaded: bool = False


@dataclass(slots=True)
class QuotaOutcome:
    """What the quota layer reserved at admission and settled afterwards (pico-USD, tokens)."""

    reserved_tokens: int = 0
    reserved_spend_pico_usd: int = 0
    tokens: int = 0
    spend_pico_usd: int = 0
    unpriced_routes: list[str] = field(default_factory=list)
    store_unavailable_open: bool = False
    """The state store was down and ``stores.state_failure: open`` admitted the request unlimited."""


@dataclass(slots=True)
class CacheHit:
    """A cached answer the cache layer replayed instead of calling an upstream."""

    usage: Usage | None
    route: str | None
    key: str
    age_s: float


@dataclass(slots=True)
class RequestContext:
    """Everything the pipeline knows about one request.

    Set by :class:`~asgi_llm.middleware.context.ContextMiddleware`:
        ``request_id``, ``endpoint``, ``body`` (the raw bytes), ``payload`` (the parsed,
        validated JSON object, unknown fields kept), ``model`` (the public name),
        ``stream``, ``include_usage`` (did the *client* ask for the usage chunk).
    Written by inner layers:
        ``principal`` (auth), ``plan`` and ``target`` (routing), ``attempts``,
        ``usage``, ``cost``, ``cache_status``, ``timings`` (seconds, by phase),
        ``response_headers`` (extra headers any layer wants on the response).
    """

    request_id: str
    endpoint: Endpoint = "other"
    method: str = "GET"
    path: str = ""
    body: bytes = b""
    payload: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    started_at: float = field(default_factory=time.perf_counter)
    principal: Principal = ANONYMOUS
    plan: list[Target] = field(default_factory=list)
    target: Target | None = None
    attempts: int = 0
    attempt_log: list[Attempt] = field(default_factory=list)
    usage: Usage | None = None
    cost: Any = None
    cache_status: str = "BYPASS"
    upstream_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    request: InferenceRequest | None = None
    """The validated body (:func:`asgi_llm.schemas.validate_payload`): typed fields for consumers."""
    body_state: BodyState | None = None
    """How (and whether yet) the body is read (:mod:`asgi_llm.request`)."""
    client_disconnected: bool = False
    """The client went away during the answer (dispatch)."""
    node_choices: dict[int, list[Target]] = field(default_factory=dict)
    """Node selector → the nodes it resolved to for this request (the router: once per request)."""
    quota: QuotaOutcome | None = None
    """What the quota layer reserved and settled."""
    cache_layer_seen: bool = False
    """A cache layer handled this request (a second one refuses to run)."""
    cache_hit: CacheHit | None = None
    """The cached answer replayed (cache layer → usage layer)."""
    charges: list[Any] | None = None
    """The attempts' :class:`~asgi_llm.usage.accounting.Charge` s, computed once (ledger and quota share them)."""
    audit_target: str | None = None
    """What an admin or node action acted on (e.g. the key id created), for the audit log."""
    audit_detail: dict[str, Any] | None = None
    """Extra, bounded detail for the audit event."""
    state: dict[str, Any] = field(default_factory=dict)
    """For host apps' own layers; asgi-llm itself keeps nothing here."""

    @property
    def is_inference(self) -> bool:
        """True for the endpoints that call an upstream."""
        return self.endpoint in ("chat", "completions", "embeddings")

    def overhead_ms(self) -> float:
        """Time spent in the gateway so far, excluding time waiting on upstreams."""
        return max(0.0, (time.perf_counter() - self.started_at - self.upstream_seconds) * 1000.0)


def get_context(scope: Scope) -> RequestContext | None:
    """The request's context, or ``None`` when ``ContextMiddleware`` has not run."""
    return scope.get(SCOPE_KEY)  # type: ignore[no-any-return]


def gateway_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """The headers every gateway response carries, success or error.

    ``x-request-id`` always; ``x-asgi-llm-route`` / ``-attempts`` once a target was
    tried; ``x-asgi-llm-cache``; ``x-asgi-llm-overhead-ms`` (time in the gateway, not
    waiting on upstreams, up to now); then whatever layers put on
    ``ctx.response_headers`` (rate-limit headers, for instance).
    """
    headers = [(b"x-request-id", ctx.request_id.encode())]
    if ctx.is_inference:
        if ctx.target is not None:
            headers.append((b"x-asgi-llm-route", ctx.target.route.encode()))
        headers.append((b"x-asgi-llm-attempts", str(ctx.attempts).encode()))
        headers.append((b"x-asgi-llm-cache", ctx.cache_status.encode()))
        headers.append((b"x-asgi-llm-overhead-ms", f"{ctx.overhead_ms():.2f}".encode()))
    headers.extend(ctx.response_headers)
    return headers
