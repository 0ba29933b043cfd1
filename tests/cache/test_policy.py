"""Cache policy resolution, determinism, and client controls in three dialects."""

from __future__ import annotations

import pytest

from asgi_llm.cache.policy import CachePolicy, CacheRule, Controls, is_deterministic, parse_controls
from asgi_llm.config import CacheConfig, ConfigError, config_from_dict
from asgi_llm.errors import InvalidRequestError


class TestResolve:
    def test_most_specific_wins(self) -> None:
        """Org rule over model rule over the default, field by field."""
        policy = CachePolicy(
            enabled=False, ttl_s=300,
            models={"faq": CacheRule(enabled=True, ttl_s=60)},
            orgs={"acme": CacheRule(ttl_s=5), "quiet": CacheRule(enabled=False)},
        )
        assert policy.resolve(model="chat", org="x").enabled is False
        faq = policy.resolve(model="faq", org="x")
        assert faq.enabled and faq.ttl_s == 60
        assert policy.resolve(model="faq", org="acme").ttl_s == 5
        assert policy.resolve(model="faq", org="quiet").enabled is False
        assert policy.may_cache_anything
        assert not CachePolicy(enabled=False).may_cache_anything

    def test_from_config(self) -> None:
        """A recipe's cache section becomes the policy, rules included."""
        cfg = CacheConfig(enabled=True, ttl_s=10, partition="key", wait_s=2,
                          models={"m": {"cache_nondeterministic": True}})
        policy = CachePolicy.from_config(cfg)
        assert (policy.ttl_s, policy.partition, policy.wait_s) == (10, "key", 2)
        assert policy.resolve(model="m", org="o").cache_nondeterministic is True


class TestDeterminism:
    @pytest.mark.parametrize(
        ("payload", "expected"),
        [
            ({}, False),  # OpenAI's default temperature is 1
            ({"temperature": 0}, True),
            ({"temperature": 0.0, "top_p": 0.3}, True),
            ({"temperature": 0.7}, False),
            ({"temperature": 0.7, "seed": 42}, True),
            ({"temperature": 0, "n": 2}, False),
            ({"temperature": 0, "n": 1}, True),
            ({"seed": 1}, True),
        ],
    )
    def test_chat(self, payload: dict, expected: bool) -> None:
        """temperature > 0 without seed, or n > 1, is not deterministic."""
        assert is_deterministic("chat", payload) is expected

    def test_embeddings_always(self) -> None:
        """Embeddings are deterministic whatever the body says."""
        assert is_deterministic("embeddings", {"input": "x"})


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


class TestControls:
    def test_none(self) -> None:
        """No controls: read and write, default TTL."""
        assert parse_controls([], {}) == Controls()

    def test_cache_control_header(self) -> None:
        """no-cache, no-store and max-age are read, case-insensitively, in any order."""
        c = parse_controls(h(("cache-control", "No-Store, max-age=60")), {})
        assert c == Controls(no_store=True, max_age_s=60)
        assert parse_controls(h(("cache-control", "no-cache")), {}).no_cache
        assert parse_controls(h(("cache-control", "max-age=0")), {}).no_cache
        assert parse_controls(h(("cache-control", "max-age=oops, private")), {}) == Controls()

    def test_litellm_body(self) -> None:
        """LiteLLM's cache object: no-cache, no-store, ttl, s-maxage."""
        c = parse_controls([], {"cache": {"no-cache": True, "ttl": 600, "s-maxage": 30}})
        assert c == Controls(no_cache=True, ttl_s=600, max_age_s=30)
        assert parse_controls([], {"cache": {"no-store": True}}).no_store
        assert parse_controls([], {"cache": {"ttl": 0}}).no_store

    def test_ttl_header(self) -> None:
        """x-asgi-llm-cache-ttl sets the stored lifetime; 0 means do not store."""
        assert parse_controls(h(("x-asgi-llm-cache-ttl", "90")), {}).ttl_s == 90
        assert parse_controls(h(("x-asgi-llm-cache-ttl", "0")), {}).no_store

    @pytest.mark.parametrize(
        ("headers", "payload"),
        [
            (h(("x-asgi-llm-cache-ttl", "soon")), {}),
            (h(("x-asgi-llm-cache-ttl", "-1")), {}),
            ([], {"cache": "no-cache"}),
            ([], {"cache": {"ttl": "forever"}}),
            ([], {"cache": {"s-maxage": -5}}),
        ],
    )
    def test_malformed_is_400(self, headers: list, payload: dict) -> None:
        """A malformed value of our header or of the cache object is a 400, not ignored."""
        with pytest.raises(InvalidRequestError) as exc:
            parse_controls(headers, payload)
        assert exc.value.status_code == 400 and exc.value.code == "invalid_cache_control"


MINIMAL = {"providers": {"a": {"base_url": "http://127.0.0.1:1/v1"}}, "models": {"chat": {"targets": [{"provider": "a", "model": "m"}]}}}


class TestCacheConfig:
    def test_new_fields_defaults(self) -> None:
        """The cache section's newer fields have safe defaults."""
        c = CacheConfig()
        assert (c.max_ttl_s, c.partition, c.cache_nondeterministic, c.wait_s, c.models, c.orgs) == (
            86_400, "org", False, 30, {}, {})

    def test_rules_parse(self) -> None:
        """Per-model and per-org rules are read from a recipe."""
        cfg = config_from_dict({**MINIMAL, "cache": {"enabled": False, "models": {"chat": {"enabled": True, "ttl_s": 60}},
                                                      "orgs": {"acme": {"cache_nondeterministic": True}}}}, environ={})
        assert cfg.cache.models["chat"].ttl_s == 60 and cfg.cache.orgs["acme"].cache_nondeterministic is True

    @pytest.mark.parametrize(
        ("cache", "path"),
        [
            ({"models": {"nope": {"enabled": True}}}, "cache.models"),
            ({"partition": "team"}, "cache.partition"),
            ({"wait_s": -1}, "cache.wait_s"),
            ({"models": {"chat": {"ttl_s": 0}}}, "cache.models.chat.ttl_s"),
            ({"models": {"chat": {"ttl": 5}}}, "cache.models.chat.ttl"),
        ],
    )
    def test_bad_values(self, cache: dict, path: str) -> None:
        """Unknown models, bad partitions and bad TTLs are reported at their path."""
        with pytest.raises(ConfigError) as exc:
            config_from_dict({**MINIMAL, "cache": cache}, environ={})
        assert path in {p for p, _ in exc.value.problems}, exc.value.problems
