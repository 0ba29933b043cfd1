"""What may be cached, for how long, and what the client asked for.

Policy (from the recipe): a default, then per-model and per-org :class:`CacheRule` s.
For each setting the most specific rule that sets it wins: org rule, then model rule,
then the default. So ``cache: {enabled: false, models: {faq: {enabled: true}}}`` caches
only ``faq``, and an org can opt out with ``orgs: {acme: {enabled: false}}``.

Determinism: a request whose answer may differ from call to call is not cached unless
the policy says ``cache_nondeterministic``: ``n > 1``, or a sampling temperature above
zero without a ``seed``. An absent ``temperature`` counts as OpenAI's default (1).
Embeddings are always deterministic.

Client controls (:func:`parse_controls`), in the dialects clients already speak:

* ``Cache-Control: no-cache`` -- do not answer from the cache; the fresh answer is
  stored (a refresh). ``max-age=N`` -- only accept an entry at most N seconds old
  (``max-age=0`` is ``no-cache``). ``no-store`` -- never store this answer (an existing
  entry may still be served, as RFC 9111 §5.2.1.5 allows).
* LiteLLM's body field ``cache: {"no-cache": true, "no-store": true, "ttl": 600,
  "s-maxage": 60}`` -- the same meanings; ``ttl`` is the lifetime of the stored answer.
* ``x-asgi-llm-cache-ttl: N`` -- the lifetime of the stored answer, seconds
  (``0`` = do not store).

A client TTL is capped by the policy's ``max_ttl_s``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from asgi_llm.errors import InvalidRequestError

__all__ = ["CachePolicy", "CacheRule", "Controls", "Resolved", "is_deterministic", "parse_controls"]

TTL_HEADER = b"x-asgi-llm-cache-ttl"


@dataclass(frozen=True, slots=True)
class CacheRule:
    """Overrides for one model or one org; ``None`` inherits."""

    enabled: bool | None = None
    ttl_s: float | None = None
    cache_nondeterministic: bool | None = None


@dataclass(frozen=True, slots=True)
class Resolved:
    """The policy that applies to one request."""

    enabled: bool
    ttl_s: float
    cache_nondeterministic: bool


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The cache policy of a gateway.

    Args:
        enabled: cache by default.
        ttl_s: default entry lifetime.
        max_ttl_s: upper bound on a lifetime a client asks for.
        cache_nondeterministic: also cache sampled (temperature > 0, no seed) or n > 1 requests.
        partition: ``org`` (entries shared by an org's keys) or ``key`` (per API key).
        wait_s: single flight -- how long an identical request waits for the one in flight.
        models, orgs: rules by public model name and by org.
    """

    enabled: bool = True
    ttl_s: float = 300.0
    max_ttl_s: float = 86_400.0
    cache_nondeterministic: bool = False
    partition: str = "org"
    wait_s: float = 30.0
    models: Mapping[str, CacheRule] = field(default_factory=dict)
    orgs: Mapping[str, CacheRule] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any) -> CachePolicy:
        """Build from a recipe's :class:`~asgi_llm.recipe.schema.CacheConfig`."""

        def rules(raw: Mapping[str, Any]) -> dict[str, CacheRule]:
            return {
                name: CacheRule(enabled=r.enabled, ttl_s=r.ttl_s, cache_nondeterministic=r.cache_nondeterministic)
                for name, r in raw.items()
            }

        return cls(
            enabled=config.enabled,
            ttl_s=config.ttl_s,
            max_ttl_s=config.max_ttl_s,
            cache_nondeterministic=config.cache_nondeterministic,
            partition=config.partition,
            wait_s=config.wait_s,
            models=rules(config.models),
            orgs=rules(config.orgs),
        )

    @property
    def may_cache_anything(self) -> bool:
        """False when no request could ever be cached (the layer need not be built)."""
        rules = [*self.models.values(), *self.orgs.values()]
        return self.enabled or any(r.enabled for r in rules)

    def resolve(self, *, model: str | None, org: str) -> Resolved:
        """The settings for a request to ``model`` by ``org`` (org rule > model rule > default)."""
        chain = [r for r in (self.orgs.get(org), self.models.get(model or "")) if r is not None]

        def pick(name: str, default: Any) -> Any:
            for rule in chain:
                value = getattr(rule, name)
                if value is not None:
                    return value
            return default

        return Resolved(
            enabled=pick("enabled", self.enabled),
            ttl_s=pick("ttl_s", self.ttl_s),
            cache_nondeterministic=pick("cache_nondeterministic", self.cache_nondeterministic),
        )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def is_deterministic(endpoint: str, payload: Mapping[str, Any]) -> bool:
    """Would the same request give the same answer again?

    Example:
        >>> is_deterministic("chat", {"temperature": 0})
        True
        >>> is_deterministic("chat", {"temperature": 0.7})
        False
        >>> is_deterministic("chat", {"temperature": 0.7, "seed": 1})
        True
    """
    if endpoint == "embeddings":
        return True
    n = _number(payload.get("n"))
    if n is not None and n > 1:
        return False
    temperature = _number(payload.get("temperature"))
    if temperature is None:
        temperature = 1.0  # OpenAI's default
    return temperature <= 0 or payload.get("seed") is not None


@dataclass(frozen=True, slots=True)
class Controls:
    """What the client asked of the cache for one request."""

    no_cache: bool = False  # do not answer from the cache
    no_store: bool = False  # do not store the answer
    max_age_s: float | None = None  # accept entries at most this old
    ttl_s: float | None = None  # lifetime of the stored answer


def _non_negative(value: Any, what: str, param: str | None) -> float:
    number = _number(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number < 0:
        raise InvalidRequestError(f"{what} must be a non-negative number of seconds.", param=param, code="invalid_cache_control")
    return number


def parse_controls(headers: list[tuple[bytes, bytes]], payload: Mapping[str, Any]) -> Controls:
    """Read ``Cache-Control``, ``x-asgi-llm-cache-ttl`` and the body's ``cache`` object.

    Unknown ``Cache-Control`` directives are ignored (as HTTP caches do); a malformed
    value of our own header or of the ``cache`` object is a 400.
    """
    no_cache = no_store = False
    max_age: float | None = None
    ttl: float | None = None
    for name, value in headers:
        if name == b"cache-control":
            for directive in value.decode("latin-1").split(","):
                token, _, arg = directive.strip().partition("=")
                token = token.strip().lower()
                if token == "no-cache":
                    no_cache = True
                elif token == "no-store":
                    no_store = True
                elif token == "max-age":
                    try:
                        seconds = float(arg.strip().strip('"'))
                    except ValueError:
                        continue  # a malformed directive is ignored, per RFC 9111
                    if math.isfinite(seconds) and seconds >= 0:
                        max_age = seconds if max_age is None else min(max_age, seconds)
        elif name == TTL_HEADER:
            ttl = _non_negative(value.decode("latin-1"), "The x-asgi-llm-cache-ttl header", None)
    body = payload.get("cache")
    if body is not None:
        if not isinstance(body, Mapping):
            raise InvalidRequestError("`cache` must be an object such as {\"no-cache\": true}.", param="cache",
                                      code="invalid_cache_control")
        no_cache = no_cache or body.get("no-cache") is True
        no_store = no_store or body.get("no-store") is True
        if body.get("ttl") is not None:
            ttl = _non_negative(body["ttl"], "cache.ttl", "cache.ttl")
        if body.get("s-maxage") is not None:
            seconds = _non_negative(body["s-maxage"], "cache.s-maxage", "cache.s-maxage")
            max_age = seconds if max_age is None else min(max_age, seconds)
    if max_age == 0:
        no_cache = True
    if ttl == 0:
        no_store = True
    return Controls(no_cache=no_cache, no_store=no_store, max_age_s=max_age, ttl_s=ttl)
