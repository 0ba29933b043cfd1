"""The recipe schema: the models of the YAML that configures an asgi-llm gateway.

A recipe is one YAML mapping with these top-level keys (only ``models`` is required)::

    providers:                      # upstream APIs, by a name of your choice
      provider-a:
        kind: openai                # wire format: openai (default) | anthropic
        base_url: https://api.example.com/v1
        api_keys: ["${PROVIDER_A_KEY}"]   # a pool, rotated
        timeout_s: 60               # per attempt
        ttft_timeout_s: 15          # streams: time to first token
    models:                         # public model names that clients send
      chat:
        strategy: priority          # priority | weighted | cheapest | fastest | least-busy
        targets:
          - {provider: provider-a, model: gpt-4o-mini, price: {input: 0.15, output: 0.60}}
          - {nodes: any, model: "llama3.1:8b"}   # any enrolled node serving it
    stores: {state: memory://, cache: memory://, ledger: sqlite:///asgi-llm.db}
    auth:
      admin_keys: ["${ASGI_LLM_ADMIN_KEY}"]
      keys: [{key: "${TEAM_KEY}", org: team-a, limits: {rpm: 60}}]
    limits: {org: {rpm: 600, spend_usd_per_day: 50}}
    cache: {enabled: true, ttl_s: 300}
    server: {max_body_bytes: 16777216, request_timeout_s: 600}

Loading (YAML, ``${VAR}`` expansion) is :mod:`asgi_llm.recipe.load`.

Every problem found -- YAML syntax, expansion, unknown keys, wrong types, bad values and
cross-references -- is collected and raised together as one :class:`ConfigError`, each
with the dotted path of the offending key (``models.chat.targets[0].price.input``).
Secret values (API keys, admin keys, the pepper, store URLs) are never echoed in errors.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from asgi_llm._options import OPTION_MODEL_CONFIG
from asgi_llm.auth.limits import KeyLimits  # the schema imports its options' types
from asgi_llm.providers.http import REQUEST_ID_HEADER
from asgi_llm.routing.rules import RoutingRule, RuleMatch

__all__ = [
    "AuthConfig",
    "CacheConfig",
    "CacheRuleConfig",
    "ConfigError",
    "ConsoleConfig",
    "GatewayConfig",
    "KeyLimits",
    "LimitsConfig",
    "ModelConfig",
    "NodesConfig",
    "ObservabilityConfig",
    "OtelConfig",
    "PriceConfig",
    "ProviderConfig",
    "RoutingConfig",
    "RoutingRule",
    "RuleMatch",
    "ServerConfig",
    "StaticKey",
    "StoresConfig",
    "TargetConfig",
    "UsageConfig",
]

Loc = tuple[int | str, ...]


# --------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """A recipe could not be loaded; ``problems`` lists every ``(path, message)`` found.

    ``path`` is a dotted key path such as ``models.chat.targets[0].provider`` (empty
    for problems about the file as a whole); ``source`` is the file name when known.
    """

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        self.source: str | None = source
        super().__init__(self._format())

    def _format(self) -> str:
        lines = [f"{path}: {message}" if path else message for path, message in self.problems]
        if self.source is None:
            return "\n".join(lines)
        n = len(self.problems)
        header = f"{self.source}: {n} problem{'' if n == 1 else 's'}"
        return "\n".join([header, *(f"  {line}" for line in lines)])

    def __str__(self) -> str:
        return self._format()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems, self.source))


class _Problems(ValueError):
    """Raised inside validators to report several problems at paths relative to the model."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{_render_loc(loc)}: {msg}" if loc else msg for loc, msg in problems))


# --------------------------------------------------------------------------- schema

_MODEL_CONFIG = OPTION_MODEL_CONFIG

_SECRET = Annotated[str, Field(min_length=8)]
_SCOPE = Literal["inference", "admin", "node"]



_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,64}")
_NOT_A_REQUEST_ID_HEADER = frozenset({
    "accept", "accept-encoding", "anthropic-version", "authorization", "connection", "content-encoding",
    "content-length", "content-type", "cookie", "host", "keep-alive", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "user-agent", "x-api-key", "x-asgi-llm-node-secret",
})
"""Headers the gateway sets itself (framing, credentials, the node call secret): a request
id under one of these names would corrupt the request or overwrite a secret."""


def _request_id_header(value: str | None) -> str | None:
    """``request_id_header``: a header name (lower-cased), or ``none`` / null to send no id."""
    if value is None:
        return None
    name = value.strip().lower()
    if name in ("none", ""):
        return None
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError('must be an HTTP header name (letters, digits, "-", at most 64 characters) or "none"')
    if name in _NOT_A_REQUEST_ID_HEADER:
        raise ValueError(f"{name!r} is a header the gateway sets itself; pick another name (e.g. {REQUEST_ID_HEADER!r}) or \"none\"")
    return name


class ProviderConfig(BaseModel):
    """An upstream API the gateway calls (OpenAI-compatible or Anthropic)."""

    model_config = _MODEL_CONFIG

    kind: Literal["openai", "anthropic"] = Field("openai", description="wire format spoken upstream")
    base_url: str = Field(description="absolute http(s) URL, e.g. https://api.openai.com/v1 (no trailing /)")
    api_keys: list[str] = Field(default_factory=list, description="pool of upstream API keys, rotated")
    timeout_s: float = Field(60, gt=0, description="per-attempt timeout, seconds")
    ttft_timeout_s: float = Field(15, gt=0, description="streams: max seconds to the first token")
    connect_timeout_s: float = Field(5, gt=0, description="TCP/TLS connect timeout, seconds")
    idle_timeout_s: float = Field(30, gt=0, description="streams: max silence between chunks, seconds")
    max_connections: int = Field(256, ge=1, description="connection pool size for this provider")
    headers: dict[str, str] = Field(default_factory=dict, description="extra static headers sent upstream")
    max_response_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="largest whole (non-stream) response accepted from it, bytes"
    )
    max_event_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest single stream event accepted, bytes")
    request_id_header: str | None = Field(
        REQUEST_ID_HEADER,
        description='header carrying our request id upstream; "none" sends none (x-request-id only if the upstream accepts req_… values)',
    )

    @field_validator("request_id_header")
    @classmethod
    def _check_request_id_header(cls, value: str | None) -> str | None:
        return _request_id_header(value)

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        # The URL may carry credentials (https://user:pass@host): never echo it.
        problem = "must be an absolute http(s) URL such as https://api.example.com/v1"
        if not value or any(ch.isspace() for ch in value):
            raise ValueError(problem)
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 -- raises ValueError on a malformed port
        except ValueError:
            raise ValueError(problem) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(problem)
        if parts.username is not None or parts.password is not None:
            # Refused rather than turned into a header: the gateway presents provider keys
            # itself (api_keys), and a URL is logged, listed and shown in errors where a
            # header is not. Saying so at load time beats a 500 on every request.
            raise ValueError(
                "must not contain credentials (user:password@); put the key in api_keys, "
                "or an Authorization header in headers"
            )
        if parts.query or parts.fragment or value.endswith(("?", "#")):
            raise ValueError(
                "must not have a query string or fragment (request paths are appended to it); "
                "send such parameters in headers"
            )
        return value.rstrip("/")


class PriceConfig(BaseModel):
    """Prices in USD per 1M tokens."""

    model_config = _MODEL_CONFIG

    input: Decimal = Field(ge=0, description="USD per 1M prompt tokens")
    output: Decimal = Field(ge=0, description="USD per 1M completion tokens")
    cached_input: Decimal | None = Field(None, ge=0, description="USD per 1M cached prompt tokens")


class TargetConfig(BaseModel):
    """One place a public model can be served: a provider's model, or enrolled nodes."""

    model_config = _MODEL_CONFIG

    provider: str | None = Field(None, min_length=1, description="name of a key under `providers`")
    nodes: str | None = Field(None, min_length=1, description='"any" or a node selector (BYOI nodes)')
    model: str = Field(min_length=1, description="the upstream model name")
    price: PriceConfig | None = Field(None, description="for cost accounting and the `cheapest` strategy")
    weight: float = Field(1.0, gt=0, description="relative share for the `weighted` strategy")
    context_window: int | None = Field(None, gt=0, description="max tokens (prompt + completion)")
    prefill: bool = Field(True, description="accepts a trailing assistant message (prefill); false = never sent one")

    @model_validator(mode="after")
    def _exactly_one_backend(self) -> TargetConfig:
        if (self.provider is None) == (self.nodes is None):
            raise ValueError("exactly one of 'provider' or 'nodes' must be set")
        return self


class ModelConfig(BaseModel):
    """A public model name: how to choose among its targets."""

    model_config = _MODEL_CONFIG

    strategy: Literal["priority", "weighted", "cheapest", "fastest", "least-busy"] = Field(
        "priority", description="how a target is chosen; the others are the failover order"
    )
    targets: list[TargetConfig] = Field(min_length=1, description="where the model can be served")


_STORE_SCHEMES: dict[str, tuple[str, ...]] = {
    "state": ("memory://", "redis://", "rediss://"),
    "cache": ("memory://", "redis://", "rediss://"),
    "ledger": ("sqlite://", "postgresql://", "postgresql+psycopg://"),
}
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def _check_store_url(role: str, value: str) -> str:
    allowed = _STORE_SCHEMES[role]
    if value.startswith(allowed):
        return value
    message = f"unsupported URL for the {role} store (allowed schemes: {', '.join(allowed)})"
    # Store URLs may carry passwords: mention only the scheme, and only if it looks like one.
    match = _SCHEME_RE.match(value)
    if match:
        message += f"; got a {match.group(1)}:// URL"
    raise ValueError(message)


class StoresConfig(BaseModel):
    """Where shared state, the response cache and the usage ledger live (URLs)."""

    model_config = _MODEL_CONFIG

    state: str = Field("memory://", description="rate-limit/routing state: memory:// or redis(s)://")
    cache: str = Field("memory://", description="response cache: memory:// or redis(s)://")
    ledger: str = Field("sqlite:///asgi-llm.db", description="usage ledger: sqlite:// or postgresql://")
    state_failure: Literal["closed", "open"] = Field(
        "closed", description="when the state store is unreachable: refuse with 503 (closed) or admit unlimited (open)"
    )

    @field_validator("state", "cache", "ledger")
    @classmethod
    def _check_scheme(cls, value: str, info: ValidationInfo) -> str:
        return _check_store_url(info.field_name, value)


class StaticKey(BaseModel):
    """A client API key declared in the recipe (keys can also be created via the admin API)."""

    model_config = _MODEL_CONFIG

    key: str = Field(min_length=8, description="the secret bearer token clients send")
    org: str = Field(min_length=1, description="the organisation billed and limited")
    name: str | None = Field(None, description="human label shown in reports")
    models: list[str] = Field(default_factory=lambda: ["*"], description='public models allowed; "*" = all')
    limits: KeyLimits = Field(default_factory=KeyLimits, description="per-key limits")
    scopes: list[_SCOPE] = Field(default_factory=lambda: ["inference"], description="what the key may do")
    model_limits: dict[str, KeyLimits] = Field(default_factory=dict, description="limits per public model, for this key")


class AuthConfig(BaseModel):
    """Admin keys, static client keys and the pepper used to hash stored keys."""

    model_config = _MODEL_CONFIG

    admin_keys: list[_SECRET] = Field(default_factory=list, description="keys for /admin (min 8 chars)")
    keys: list[StaticKey] = Field(default_factory=list, description="static client keys")
    pepper: str | None = Field(None, description="secret mixed into stored key hashes")
    keys_from_db: bool = Field(True, description="also accept keys created via the admin API (stored in stores.ledger)")
    cache_ttl_s: float = Field(10, ge=0, description="seconds a stored key's lookup is cached (revocation latency)")

    @model_validator(mode="after")
    def _no_duplicate_keys(self) -> AuthConfig:
        seen: dict[str, Loc] = {}
        problems: list[tuple[Loc, str]] = []
        entries: list[tuple[Loc, str]] = [(("admin_keys", i), k) for i, k in enumerate(self.admin_keys)]
        entries += [(("keys", i, "key"), k.key) for i, k in enumerate(self.keys)]
        for loc, value in entries:
            if value in seen:
                # Never echo the secret itself: point at its first occurrence instead.
                problems.append((loc, f"duplicate key (same value as auth.{_render_loc(seen[value])})"))
            else:
                seen[value] = loc
        if problems:
            raise _Problems(problems)
        return self


class LimitsConfig(BaseModel):
    """Limits shared by every key of an organisation."""

    model_config = _MODEL_CONFIG

    org: KeyLimits = Field(default_factory=KeyLimits, description="applied to each org as a whole")
    default_max_tokens: int = Field(
        4096, ge=1, description="completion tokens reserved when a request sets no max_tokens"
    )


class CacheRuleConfig(BaseModel):
    """Cache settings for one model or one org; unset fields inherit (org > model > default)."""

    model_config = _MODEL_CONFIG

    enabled: bool | None = Field(None, description="cache this model's / org's requests")
    ttl_s: float | None = Field(None, gt=0, description="entry lifetime, seconds")
    cache_nondeterministic: bool | None = Field(None, description="also cache sampled or n > 1 requests")


class CacheConfig(BaseModel):
    """The exact-match response cache."""

    model_config = _MODEL_CONFIG

    enabled: bool = Field(False, description="serve identical requests from the cache")
    ttl_s: float = Field(300, gt=0, description="entry lifetime, seconds")
    max_entries: int = Field(10_000, ge=1, description="max number of cached responses")
    max_bytes: int = Field(256 * 1024 * 1024, ge=1, description="max total size of cached responses")
    max_ttl_s: float = Field(86_400, gt=0, description="upper bound on a lifetime a client asks for, seconds")
    partition: Literal["org", "key"] = Field("org", description="entries shared per org, or per API key")
    cache_nondeterministic: bool = Field(
        False, description="also cache requests that sample (temperature > 0 without seed) or ask for n > 1"
    )
    wait_s: float = Field(30, ge=0, description="single flight: max wait for an identical request in flight (0 = off)")
    models: dict[str, CacheRuleConfig] = Field(default_factory=dict, description="rules by public model name")
    orgs: dict[str, CacheRuleConfig] = Field(default_factory=dict, description="rules by org")


class ServerConfig(BaseModel):
    """HTTP server limits."""

    model_config = _MODEL_CONFIG

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    request_timeout_s: float = Field(600, gt=0, description="whole request, including failover, seconds")
    max_inflight_body_bytes: int = Field(
        256 * 1024 * 1024, ge=1024,
        description="request-body bytes one process holds at once; past it 503 + Retry-After "
                    "(measured: a held body costs ~5x its size in RSS while its request runs)",
    )
    body_read_timeout_s: float = Field(60, gt=0, description="a request body must arrive within this, seconds (else 408)")
    header_timeout_s: float = Field(
        10, gt=0, description="`asgi-llm serve`: a connection must send complete request headers within this, seconds"
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="`asgi-llm serve`: request line + headers larger than this get 431"
    )
    max_headers: int = Field(100, ge=8, description="`asgi-llm serve`: more request headers than this get 431")
    drain_timeout_s: float = Field(
        30, gt=0, le=3600,
        description="`asgi-llm serve`: on SIGTERM, stop accepting and let requests in flight (streams "
                    "included) finish for up to this long, then flush the ledger and exit",
    )
    drain_notice_s: float = Field(
        0, ge=0, le=300,
        description="`asgi-llm serve`: on SIGTERM, first answer /readyz with 503 for this long while still "
                    "serving, so a balancer takes the replica out before its listener closes (set it above "
                    "the balancer's check interval x fall count); then drain. Not with --workers > 1 "
                    "(one process per replica is what a fleet runs)",
    )

    @model_validator(mode="after")
    def _check_budget(self) -> ServerConfig:
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise _Problems([(("max_inflight_body_bytes",),
                              "must be at least max_body_bytes, or no largest body could ever be accepted")])
        return self


class UsageConfig(BaseModel):
    """The usage ledger and audit log writers (one ledger row per attempt)."""

    model_config = _MODEL_CONFIG

    enabled: bool = Field(True, description="meter every attempt into the ledger (stores.ledger)")
    audit: bool = Field(True, description="write the hash-chained audit log (stores.ledger)")
    queue_max: int = Field(100_000, ge=1, description="rows held in memory before spilling to disk")
    batch_size: int = Field(5000, ge=1, description="max rows per INSERT batch (one commit each): a flush writes what queued since the last one, up to this")
    flush_interval_s: float = Field(1.0, gt=0, description="max seconds a row waits before a flush (each flush is a commit; larger batches cost far less per row)")
    shutdown_timeout_s: float = Field(10, gt=0, description="flush time at shutdown; the rest is spilled")
    spill_dir: str | None = Field(None, description="where rows go when the queue is full or the store is down")
    prompt_estimate: Literal["chars", "words"] = Field(
        "chars", description="prompt-token heuristic when an upstream reports no usage (rows flagged estimated)"
    )
    prompt_content_orgs: list[str] = Field(
        default_factory=list, description="orgs that opted in to storing prompt text with the prompt hash"
    )
    prices: dict[str, PriceConfig] = Field(
        default_factory=dict, description="price overrides by route (provider/model or node/model) or model name"
    )


class OtelConfig(BaseModel):
    """OpenTelemetry spans; ``asgi-llm serve`` also sets up the SDK and its exporter.

    Unset options fall back to the standard ``OTEL_*`` environment variables
    (``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS``, ``OTEL_SERVICE_NAME``). A gateway mounted in
    another app uses that app's tracer provider: nothing is set up for it.
    """

    model_config = _MODEL_CONFIG

    exporter: Literal["otlp", "console", "none"] | None = Field(
        None, description="`asgi-llm serve`: where spans go: OTLP/HTTP, the console (local use), nowhere "
                          "(default: $OTEL_TRACES_EXPORTER, else otlp)"
    )
    endpoint: str | None = Field(
        None, max_length=2048, pattern=r"^https?://",
        description="OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces (default: the OTEL_* env vars, "
                    "else http://localhost:4318/v1/traces)",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="OTLP request headers, e.g. an API key (`${VAR}` keeps it out of the file)"
    )
    service_name: str | None = Field(None, max_length=200, description="service.name (default: $OTEL_SERVICE_NAME, else asgi-llm)")


class ObservabilityConfig(BaseModel):
    """Logs, metrics and traces."""

    model_config = _MODEL_CONFIG

    metrics: bool = Field(True, description="serve Prometheus metrics at GET /metrics")
    log_json: bool = Field(False, description="configure structlog to print JSON lines (serve)")
    otel: Annotated[
        Annotated[bool, Tag("on")] | Annotated[OtelConfig, Tag("options")],
        Discriminator(lambda v: "options" if isinstance(v, (dict, OtelConfig)) else "on"),
    ] = Field(
        False, description="OpenTelemetry spans (needs the [otel] extra): true, or exporter options; "
                           "`asgi-llm serve` configures the SDK (OTLP/HTTP or console)"
    )


class HealthConfig(BaseModel):
    """Circuit breakers and active probes."""

    model_config = _MODEL_CONFIG

    failure_threshold: int = Field(3, ge=1, description="consecutive failures that open a breaker")
    cooldown_s: float = Field(30, gt=0, description="how long a breaker stays open (doubles on re-open)")
    max_cooldown_s: float = Field(300, gt=0, description="cap on the doubling")
    probe_interval_s: float = Field(10, ge=0, description="free GET /models probes of open breakers and refused keys; 0 = off")
    auth_cooldown_s: float = Field(300, gt=0, le=86_400, description="how long one upstream 401/403 retires a "
                                   "(target, key); a free probe with that key that succeeds brings it back sooner")


class RoutingConfig(BaseModel):
    """Failover policy and routing rules."""

    model_config = _MODEL_CONFIG

    rules: list[RoutingRule] = Field(default_factory=list, description="first matching rule applies")
    max_attempts: int = Field(4, ge=1, description="attempts per request across all targets")
    retries_per_target: int = Field(1, ge=0, description="extra tries on the same target for 5xx/resets")
    max_retry_wait_s: float = Field(5, ge=0, description="longest Retry-After worth waiting for when no other target is left")
    health: HealthConfig = Field(default_factory=HealthConfig)


class NodePriceCap(BaseModel):
    """The most a consuming org accepts to pay for a shared node, USD per 1M tokens."""

    model_config = _MODEL_CONFIG

    input: Decimal = Field(ge=0, le=10_000, description="USD per 1M prompt tokens")
    output: Decimal = Field(ge=0, le=10_000, description="USD per 1M completion tokens")


class NodeAcceptRule(BaseModel):
    """One consent to shared capacity: nodes of ``owner`` (``"*"``: any org) up to ``max_price``."""

    model_config = _MODEL_CONFIG

    owner: str = Field(min_length=1, max_length=200, description="the owner org of accepted nodes, or '*'")
    max_price: NodePriceCap = Field(description="nodes priced above this are not used for this org")


class NodesConfig(BaseModel):
    """BYOI nodes: enrollment, heartbeats, connectivity (see ``asgi_llm.nodes``)."""

    model_config = _MODEL_CONFIG

    enabled: bool = Field(True, description="accept node enrollment (needs auth: tokens are made with an admin key)")
    heartbeat_interval_s: float = Field(5, gt=0, description="how often agents heartbeat, seconds")
    heartbeat_window_s: float = Field(15, gt=0, description="a node silent this long leaves routing, seconds")
    token_ttl_s: float = Field(600, gt=0, description="default lifetime of an enrollment token, seconds")
    max_token_ttl_s: float = Field(86_400, gt=0, description="longest enrollment-token lifetime an admin may ask for")
    tunnel: bool = Field(True, description="accept agents that dial in over a WebSocket (/nodes/tunnel)")
    auto_models: bool = Field(
        True, description="a model an online node advertises is routable under its own name for the orgs that may "
                          "use the node, unless the recipe maps that name",
    )
    timeout_s: float = Field(120, gt=0, description="per-attempt timeout for node targets, seconds")
    ttft_timeout_s: float = Field(60, gt=0, description="streams: max seconds to the first token from a node")
    connect_timeout_s: float = Field(3, gt=0, description="TCP connect timeout to a direct node, seconds")
    idle_timeout_s: float = Field(60, gt=0, description="streams: max silence between chunks from a node")
    allowed_networks: list[str] | None = Field(
        None, max_length=1000,
        description="CIDRs a direct node's URL may resolve into (unset: any but loopback, link-local, "
                    "unspecified, multicast; the gateway's own address is always refused)",
    )
    accept_shared: dict[str, list[NodeAcceptRule]] = Field(
        default_factory=dict,
        description="per consumer org: whose shared nodes it accepts, up to which price "
                    "({owner: <org>|'*', max_price: {input, output}}); org admins add theirs via the admin API",
    )

    @field_validator("allowed_networks")
    @classmethod
    def _check_networks(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        import ipaddress

        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not a CIDR network such as 10.0.0.0/8 or 127.0.0.1/32") from None
        return value
    request_id_header: str | None = Field(
        REQUEST_ID_HEADER,
        description='header carrying our request id to nodes (their agents pass it to the engine); "none" sends none',
    )

    @field_validator("request_id_header")
    @classmethod
    def _check_request_id_header(cls, value: str | None) -> str | None:
        return _request_id_header(value)


# --- console (asgi_llm.console) -------------------------------------------------------
class ConsoleConfig(BaseModel):
    """The web console at ``path`` (sign in with an admin key; see ``asgi_llm.console``)."""

    model_config = _MODEL_CONFIG

    enabled: bool = Field(True, description="serve the web console (it needs auth.admin_keys to sign in)")
    path: str = Field("/console", pattern=r"^/[A-Za-z0-9._~/-]{0,99}$", description="where the console is served")
    session_secret: str | None = Field(
        None, min_length=16, max_length=512,
        description="signs console sessions (else ASGI_LLM_CONSOLE_SECRET, else one generated and kept in the SQL store)",
    )
    session_ttl_s: float = Field(8 * 3600, gt=0, le=30 * 86400, description="how long a console session lasts, seconds")

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        value = "/" + value.strip("/")
        if value == "/" or value.split("/")[1] in ("v1", "admin", "nodes", "healthz", "readyz", "metrics"):
            raise ValueError("the console path must not be / or shadow the gateway's own paths")
        return value
# --- end console ------------------------------------------------------------------------


class GatewayConfig(BaseModel):
    """A whole recipe: providers, public models, stores, auth, limits, cache and server."""

    model_config = _MODEL_CONFIG

    providers: dict[str, ProviderConfig] = Field(default_factory=dict, description="upstreams by name")
    models: dict[str, ModelConfig] = Field(min_length=1, description="public model name -> routing")
    stores: StoresConfig = Field(default_factory=StoresConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    usage: UsageConfig = Field(default_factory=UsageConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    nodes: NodesConfig = Field(default_factory=NodesConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)

    def model_names(self) -> list[str]:
        """The public model names, sorted."""
        return sorted(self.models)

    @model_validator(mode="after")
    def _cross_check(self) -> GatewayConfig:
        problems = _reference_problems(self.model_dump(include={"providers", "models", "cache", "auth"}))
        if problems:
            raise _Problems(problems)
        return self


def _reference_problems(data: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    """Cross-references (public model names, target providers, models named by the cache
    rules and by keys), on plain data: the validated config dumped, or the raw recipe when
    its schema failed — so ``asgi-llm check`` reports both kinds at once. Parts of the
    wrong shape are skipped (the schema errors already name them)."""

    def mapping(value: Any) -> Mapping[Any, Any]:
        return value if isinstance(value, Mapping) else {}

    def items(value: Any) -> list[Any]:
        return value if isinstance(value, list) else []

    problems: list[tuple[Loc, str]] = []
    providers, models = mapping(data.get("providers")), mapping(data.get("models"))
    for name in models:
        if isinstance(name, str) and (not name or any(ch.isspace() for ch in name)):  # non-str: a schema error
            problems.append((("models",), f"invalid public model name {name!r}: "
                             "must be non-empty and contain no whitespace"))
    known_providers = ", ".join(sorted(str(p) for p in providers)) or "none configured"
    for name, model in models.items():
        for i, target in enumerate(items(mapping(model).get("targets"))):
            provider = mapping(target).get("provider")
            if isinstance(provider, str) and provider not in providers:
                problems.append((("models", name, "targets", i, "provider"),
                                 f"unknown provider {provider!r} (known: {known_providers})"))
    known_models = ", ".join(sorted(str(m) for m in models))
    for model_name in mapping(mapping(data.get("cache")).get("models")):
        if model_name not in models:
            problems.append((("cache", "models"), f"unknown model {model_name!r} (known: {known_models})"))
    for i, key in enumerate(items(mapping(data.get("auth")).get("keys"))):
        for j, model_name in enumerate(items(mapping(key).get("models"))):
            if isinstance(model_name, str) and model_name != "*" and model_name not in models:
                problems.append((("auth", "keys", i, "models", j),
                                 f"unknown model {model_name!r} (known: *, {known_models})"))
    return problems


# --------------------------------------------------------------------------- paths


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` down to the interesting type."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _walk(loc: Loc, root: Any = GatewayConfig) -> tuple[str, Any]:
    """Render ``loc`` as ``a.b[0].c`` and return the type found at its end (or None)."""
    out: list[str] = []
    tp: Any = root
    for part in loc:
        if part == "[key]":  # pydantic's marker for an error in a dict key
            continue
        tp = _unwrap(tp) if tp is not None else None
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            out.append(f".{part}")
            tp = tp.model_fields[str(part)].annotation
        elif origin is dict:
            out.append(f".{part}")
            tp = typing.get_args(tp)[1]
        elif origin is list and isinstance(part, int):
            out.append(f"[{part}]")
            tp = typing.get_args(tp)[0]
        else:
            out.append(f"[{part}]" if isinstance(part, int) else f".{part}")
            tp = None
    return "".join(out).lstrip("."), (_unwrap(tp) if tp is not None else None)


def _render_loc(loc: Loc, root: Any = None) -> str:
    """Render a loc; with ``root=None`` ints are list indexes and strs are keys."""
    return _walk(loc, root)[0]


def _yaml_type(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return type(value).__name__


def _unknown_key_message(key: Any, model: Any) -> str:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return f"unknown key {key!r}"
    allowed = sorted(model.model_fields)
    hint = ""
    close = difflib.get_close_matches(str(key), allowed, n=1)
    if close:
        hint = f", did you mean {close[0]!r}?"
    return f"unknown key {key!r}{hint} (allowed: {', '.join(allowed)})"


def _convert_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Turn pydantic errors into ``(path, message)`` pairs, never using the input value."""
    problems: list[tuple[str, str]] = []
    for err in exc.errors():
        loc: Loc = tuple(err["loc"])
        ctx = err.get("ctx") or {}
        cause = ctx.get("error")
        if isinstance(cause, _Problems):
            for rel, message in cause.problems:
                problems.append((_walk(loc + rel)[0], message))
            continue
        path, _ = _walk(loc)
        kind = err["type"]
        message = err["msg"]
        if kind == "extra_forbidden":
            _, parent = _walk(loc[:-1])
            message = _unknown_key_message(loc[-1], parent)
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            message = f"expected a mapping, got {_yaml_type(err.get('input'))}"
        elif kind == "list_type":
            message = f"expected a list, got {_yaml_type(err.get('input'))}"
        elif kind == "missing":
            message = "required key is missing"
        elif kind == "value_error":
            message = str(cause) if cause is not None else message.removeprefix("Value error, ")
        if loc and loc[-1] == "[key]":
            message = f"invalid key: {message}"
        problems.append((path, message))
    return problems
