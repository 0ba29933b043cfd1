"""Tests for asgi_llm.config: recipe schema, ${VAR} expansion and error reporting."""

from __future__ import annotations

import pickle
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from asgi_llm.config import (
    AuthConfig,
    CacheConfig,
    ConfigError,
    GatewayConfig,
    KeyLimits,
    LimitsConfig,
    ModelConfig,
    Price,
    ProviderConfig,
    ServerConfig,
    StaticKey,
    StoresConfig,
    TargetConfig,
    config_from_dict,
    load_config,
    parse_config,
)

CONTRACT_RECIPE = """
providers:
  provider-a:
    kind: openai                 # OpenAI-compatible wire format; also: anthropic
    base_url: http://127.0.0.1:9001/v1
    api_keys: ["${PROVIDER_A_KEY:-sk-none}"]   # a pool, rotated
    timeout_s: 60                # per attempt
    ttft_timeout_s: 15           # streams: time to first token
models:
  chat:                          # the public model name clients send
    strategy: priority           # priority | weighted | cheapest | fastest | least-busy
    targets:
      - {provider: provider-a, model: gpt-4o-mini, price: {input: 0.15, output: 0.60}}  # USD / 1M tokens
      - {provider: provider-b, model: llama-3.1-8b, price: {input: 0.05, output: 0.08}}
      - {nodes: any, model: "llama3.1:8b"}       # any enrolled node that serves it
stores:
  state: memory://               # or redis://127.0.0.1:6379/0
  cache: memory://               # or redis://…
  ledger: sqlite:///asgi-llm.db  # or postgresql://…
auth:
  admin_keys: ["${ASGI_LLM_ADMIN_KEY}"]
  keys:
    - {key: "${TEAM_KEY}", org: team-a, models: ["*"], limits: {rpm: 60, tpm: 100000}}
limits:
  org: {rpm: 600, tpm: 1000000, spend_usd_per_day: 50}
cache: {enabled: true, ttl_s: 300}
"""

# The contract's example references provider-b without defining it; a runnable recipe
# needs it, so the test adds it (the rest is verbatim).
PROVIDER_B = """
  provider-b:
    base_url: http://127.0.0.1:9002/v1
"""
CONTRACT_RECIPE_RUNNABLE = CONTRACT_RECIPE.replace("\nmodels:", PROVIDER_B.rstrip("\n") + "\nmodels:", 1)

ENV = {"ASGI_LLM_ADMIN_KEY": "admin-secret-123", "TEAM_KEY": "team-secret-456"}

MINIMAL = {"models": {"chat": {"targets": [{"nodes": "any", "model": "m"}]}}}


def problems_of(exc_info: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    """Map path -> message (the last message when a path repeats)."""
    return dict(exc_info.value.problems)


def with_(base: dict[str, Any], **top: Any) -> dict[str, Any]:
    out = dict(base)
    out.update(top)
    return out


def provider(**fields: Any) -> dict[str, Any]:
    return {"base_url": "https://api.example.com/v1", **fields}


class TestContractExample:
    """The YAML from CONTRACT.md loads as documented."""

    def test_contract_example_loads(self) -> None:
        """The contract example (plus provider-b) loads with env vars applied."""
        cfg = parse_config(CONTRACT_RECIPE_RUNNABLE, environ=ENV)
        a = cfg.providers["provider-a"]
        assert a.kind == "openai"
        assert a.base_url == "http://127.0.0.1:9001/v1"
        assert a.api_keys == ["sk-none"]
        assert a.timeout_s == 60 and a.ttft_timeout_s == 15
        chat = cfg.models["chat"]
        assert chat.strategy == "priority"
        assert [t.model for t in chat.targets] == ["gpt-4o-mini", "llama-3.1-8b", "llama3.1:8b"]
        assert chat.targets[0].price == Price(input=Decimal("0.15"), output=Decimal("0.60"))
        assert chat.targets[2].nodes == "any" and chat.targets[2].provider is None
        assert cfg.stores == StoresConfig()
        assert cfg.auth.admin_keys == ["admin-secret-123"]
        key = cfg.auth.keys[0]
        assert (key.key, key.org, key.models) == ("team-secret-456", "team-a", ["*"])
        assert key.limits.rpm == 60 and key.limits.tpm == 100000
        assert cfg.limits.org.spend_usd_per_day == Decimal(50)
        assert cfg.cache.enabled is True and cfg.cache.ttl_s == 300
        assert cfg.model_names() == ["chat"]

    def test_contract_example_verbatim_flags_provider_b(self) -> None:
        """Verbatim, the example's undefined provider-b is reported with known names."""
        with pytest.raises(ConfigError) as exc_info:
            parse_config(CONTRACT_RECIPE, environ=ENV)
        assert exc_info.value.problems == [
            ("models.chat.targets[1].provider", "unknown provider 'provider-b' (known: provider-a)")
        ]

    def test_provider_key_env_overrides_default(self) -> None:
        """A set PROVIDER_A_KEY replaces the default."""
        cfg = parse_config(CONTRACT_RECIPE_RUNNABLE, environ={**ENV, "PROVIDER_A_KEY": "sk-real"})
        assert cfg.providers["provider-a"].api_keys == ["sk-real"]

    def test_missing_admin_key_env(self) -> None:
        """An unset ${ASGI_LLM_ADMIN_KEY} names the path and the variable."""
        with pytest.raises(ConfigError) as exc_info:
            parse_config(CONTRACT_RECIPE_RUNNABLE, environ={"TEAM_KEY": "team-secret-456"})
        assert exc_info.value.problems == [
            (
                "auth.admin_keys[0]",
                "environment variable ASGI_LLM_ADMIN_KEY is not set "
                "(use ${ASGI_LLM_ADMIN_KEY:-default} for a default)",
            )
        ]

    def test_config_is_frozen(self) -> None:
        """Config models are immutable."""
        cfg = parse_config(CONTRACT_RECIPE_RUNNABLE, environ=ENV)
        with pytest.raises(ValidationError):
            cfg.cache = CacheConfig()  # type: ignore[misc]


class TestDefaults:
    """Every field's default value."""

    def test_top_level_defaults(self) -> None:
        """Only models is required; the rest default."""
        cfg = config_from_dict(MINIMAL, environ={})
        assert cfg.providers == {}
        assert cfg.stores == StoresConfig()
        assert cfg.auth == AuthConfig()
        assert cfg.limits == LimitsConfig()
        assert cfg.cache == CacheConfig()
        assert cfg.server == ServerConfig()

    def test_provider_defaults(self) -> None:
        """ProviderConfig defaults match the spec."""
        p = ProviderConfig(base_url="https://x.example/v1")
        assert p.kind == "openai"
        assert p.api_keys == []
        assert p.timeout_s == 60
        assert p.ttft_timeout_s == 15
        assert p.connect_timeout_s == 5
        assert p.idle_timeout_s == 30
        assert p.max_connections == 256
        assert p.headers == {}

    def test_target_and_model_defaults(self) -> None:
        """TargetConfig and ModelConfig defaults match the spec."""
        t = TargetConfig(nodes="any", model="m")
        assert t.provider is None and t.price is None and t.context_window is None
        assert t.weight == 1.0
        m = ModelConfig(targets=[t])
        assert m.strategy == "priority"

    def test_price_defaults(self) -> None:
        """Price.cached_input defaults to None."""
        assert Price(input=1, output=2).cached_input is None

    def test_stores_defaults(self) -> None:
        """Stores default to memory + SQLite."""
        s = StoresConfig()
        assert (s.state, s.cache, s.ledger) == ("memory://", "memory://", "sqlite:///asgi-llm.db")

    def test_auth_and_key_defaults(self) -> None:
        """AuthConfig, StaticKey and KeyLimits defaults."""
        a = AuthConfig()
        assert a.admin_keys == [] and a.keys == [] and a.pepper is None
        k = StaticKey(key="12345678", org="o")
        assert k.name is None
        assert k.models == ["*"]
        assert k.scopes == ["inference"]
        assert k.limits == KeyLimits()
        limits = KeyLimits()
        assert limits.model_dump() == {
            "rpm": None,
            "tpm": None,
            "concurrency": None,
            "spend_usd_per_day": None,
            "spend_usd_per_month": None,
        }
        assert LimitsConfig().org == KeyLimits()

    def test_cache_and_server_defaults(self) -> None:
        """CacheConfig and ServerConfig defaults."""
        c = CacheConfig()
        assert (c.enabled, c.ttl_s, c.max_entries, c.max_bytes) == (False, 300, 10000, 256 * 1024 * 1024)
        s = ServerConfig()
        assert (s.max_body_bytes, s.request_timeout_s) == (16 * 1024 * 1024, 600)

    def test_mutable_defaults_not_shared(self) -> None:
        """List defaults are fresh per instance."""
        a, b = StaticKey(key="12345678", org="o"), StaticKey(key="87654321", org="o")
        assert a.models is not b.models

    def test_model_names_sorted(self) -> None:
        """model_names() returns the public names sorted."""
        target = [{"nodes": "any", "model": "m"}]
        cfg = config_from_dict({"models": {"zeta": {"targets": target}, "alpha": {"targets": target}}}, environ={})
        assert cfg.model_names() == ["alpha", "zeta"]


class TestExpansion:
    """${VAR}, ${VAR:-default} and $$ expansion on the parsed tree."""

    def recipe(self, value: str) -> str:
        return f'models: {{chat: {{targets: [{{nodes: any, model: "{value}"}}]}}}}\n'

    def model_of(self, value: str, environ: dict[str, str]) -> str:
        return parse_config(self.recipe(value), environ=environ).models["chat"].targets[0].model

    def test_var(self) -> None:
        """${VAR} is replaced by its value."""
        assert self.model_of("${M}", {"M": "gpt"}) == "gpt"

    def test_var_inside_text(self) -> None:
        """References can be embedded in longer strings, several per string."""
        assert self.model_of("pre-${A}-${B}-post", {"A": "1", "B": "2"}) == "pre-1-2-post"

    def test_default_when_unset(self) -> None:
        """${VAR:-d} uses d when VAR is unset."""
        assert self.model_of("${M:-fallback}", {}) == "fallback"

    def test_default_when_empty(self) -> None:
        """${VAR:-d} uses d when VAR is set but empty, like the shell."""
        assert self.model_of("${M:-fallback}", {"M": ""}) == "fallback"

    def test_value_wins_over_default(self) -> None:
        """${VAR:-d} uses VAR when it is non-empty."""
        assert self.model_of("${M:-fallback}", {"M": "real"}) == "real"

    def test_empty_default(self) -> None:
        """${VAR:-} expands to the empty string when unset."""
        cfg = config_from_dict(with_(MINIMAL, auth={"pepper": "${P:-}"}), environ={})
        assert cfg.auth.pepper == ""

    def test_nested_default(self) -> None:
        """A default may itself reference another variable."""
        assert self.model_of("${A:-${B:-deep}}", {}) == "deep"
        assert self.model_of("${A:-${B:-deep}}", {"B": "b"}) == "b"

    def test_unused_default_not_evaluated(self) -> None:
        """An unset variable inside an unused default is not an error."""
        assert self.model_of("${A:-${UNSET}}", {"A": "a"}) == "a"

    def test_dollar_dollar(self) -> None:
        """$$ becomes a literal $ and is not expanded further."""
        assert self.model_of("cost$$5", {}) == "cost$5"
        assert self.model_of("$${M}", {"M": "x"}) == "${M}"

    def test_lone_dollar_kept(self) -> None:
        """A $ not followed by { or $ is kept as is."""
        assert self.model_of("pa$word$", {}) == "pa$word$"

    def test_unset_is_error_with_path(self) -> None:
        """An unset ${VAR} without default is a ConfigError at the value's path."""
        with pytest.raises(ConfigError) as exc_info:
            parse_config(self.recipe("${NOPE}"), environ={})
        assert exc_info.value.problems == [
            (
                "models.chat.targets[0].model",
                "environment variable NOPE is not set (use ${NOPE:-default} for a default)",
            )
        ]

    def test_unset_does_not_cascade(self) -> None:
        """The empty placeholder for an unset variable causes no second error."""
        data = with_(MINIMAL, auth={"admin_keys": ["${ADMIN}"]})
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert [p for p, _ in exc_info.value.problems] == ["auth.admin_keys[0]"]

    def test_malformed_reference(self) -> None:
        """${} and unterminated references are errors, not silently kept."""
        for bad in ("${}", "${1X}", "${A:?x}"):
            with pytest.raises(ConfigError, match="invalid variable reference"):
                parse_config(self.recipe(bad), environ={})
        with pytest.raises(ConfigError, match="unterminated"):
            parse_config(self.recipe("${A:-abc"), environ={})

    def test_number_from_env_is_coerced(self) -> None:
        """A numeric string from the environment validates for numeric fields."""
        data = with_(
            MINIMAL,
            cache={"enabled": "${CACHE_ON}", "ttl_s": "${TTL}", "max_entries": "${N:-20}"},
        )
        cfg = config_from_dict(data, environ={"CACHE_ON": "true", "TTL": "60"})
        assert cfg.cache.enabled is True
        assert cfg.cache.ttl_s == 60.0
        assert cfg.cache.max_entries == 20

    def test_value_cannot_inject_yaml(self) -> None:
        """A value containing YAML syntax stays a plain string."""
        injected = "x\nauth: {admin_keys: [hacked123]}"
        cfg = parse_config(self.recipe("${M}"), environ={"M": injected})
        assert cfg.models["chat"].targets[0].model == injected
        assert cfg.auth.admin_keys == []

    def test_keys_not_expanded(self) -> None:
        """Mapping keys are never expanded."""
        text = 'models: {"${NAME}": {targets: [{nodes: any, model: m}]}}\n'
        cfg = parse_config(text, environ={"NAME": "chat"})
        assert cfg.model_names() == ["${NAME}"]

    def test_non_strings_untouched(self) -> None:
        """Numbers and booleans pass through expansion unchanged."""
        cfg = config_from_dict(with_(MINIMAL, cache={"enabled": True, "ttl_s": 5}), environ={})
        assert cfg.cache.ttl_s == 5

    def test_defaults_to_os_environ(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without environ=, os.environ is used."""
        monkeypatch.setenv("ASGI_LLM_TEST_MODEL", "from-os")
        assert parse_config(self.recipe("${ASGI_LLM_TEST_MODEL}")).models["chat"].targets[0].model == "from-os"

    def test_input_not_mutated(self) -> None:
        """config_from_dict does not modify the caller's dict."""
        data = {"models": {"chat": {"targets": [{"nodes": "any", "model": "${M}"}]}}}
        config_from_dict(data, environ={"M": "x"})
        assert data["models"]["chat"]["targets"][0]["model"] == "${M}"


class TestUnknownKeys:
    """extra="forbid": unknown keys are reported with their path and the allowed keys."""

    def test_top_level(self) -> None:
        """An unknown top-level key lists the allowed top-level keys."""
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(with_(MINIMAL, frobnicate=1), environ={})
        allowed = ", ".join(sorted(GatewayConfig.model_fields))  # every section, as the schema grows
        assert "models" in allowed and "providers" in allowed
        assert exc_info.value.problems == [("frobnicate", f"unknown key 'frobnicate' (allowed: {allowed})")]

    def test_deep_in_target_price(self) -> None:
        """An unknown key deep in a target's price names the full path."""
        data = {"models": {"chat": {"targets": [{"nodes": "any", "model": "m", "price": {"input": 1, "output": 1, "x": 2}}]}}}
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        msg = problems_of(exc_info)["models.chat.targets[0].price.x"]
        assert msg == "unknown key 'x' (allowed: cached_input, input, output)"

    def test_provider_typo_suggests(self) -> None:
        """A near-miss key suggests the intended one and lists all allowed keys."""
        data = with_(MINIMAL, providers={"p": provider(api_key="sk-1")})
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        msg = problems_of(exc_info)["providers.p.api_key"]
        assert msg.startswith("unknown key 'api_key', did you mean 'api_keys'?")
        for allowed in ProviderConfig.model_fields:
            assert allowed in msg
        assert "sk-1" not in str(exc_info.value)

    def test_in_key_limits(self) -> None:
        """An unknown limit under auth.keys[i].limits is located precisely."""
        data = with_(MINIMAL, auth={"keys": [{"key": "12345678", "org": "o", "limits": {"rps": 1}}]})
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert "auth.keys[0].limits.rps" in problems_of(exc_info)


class TestTypes:
    """Wrong types and out-of-range values, reported with their path."""

    def test_wrong_scalar_type(self) -> None:
        """A non-number timeout names its path."""
        data = with_(MINIMAL, providers={"p": provider(timeout_s="soon")})
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert "providers.p.timeout_s" in problems_of(exc_info)

    def test_decimal_price(self) -> None:
        """A bad price names models.<m>.targets[i].price.input."""
        data = {"models": {"chat": {"targets": [{"nodes": "any", "model": "m", "price": {"input": "cheap", "output": 1}}]}}}
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert problems_of(exc_info) == {"models.chat.targets[0].price.input": "Input should be a valid decimal"}

    def test_negative_price(self) -> None:
        """Prices must be >= 0."""
        data = {"models": {"chat": {"targets": [{"nodes": "any", "model": "m", "price": {"input": -1, "output": 1}}]}}}
        with pytest.raises(ConfigError, match=r"price\.input"):
            config_from_dict(data, environ={})

    def test_prices_are_exact_decimals(self) -> None:
        """YAML floats become exact Decimals (0.15, not a binary approximation)."""
        cfg = parse_config(CONTRACT_RECIPE_RUNNABLE, environ=ENV)
        assert cfg.models["chat"].targets[0].price is not None
        assert cfg.models["chat"].targets[0].price.input == Decimal("0.15")

    def test_mapping_expected(self) -> None:
        """A list where a mapping belongs says so."""
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(with_(MINIMAL, cache=[1, 2]), environ={})
        assert problems_of(exc_info) == {"cache": "expected a mapping, got a list"}

    def test_list_expected(self) -> None:
        """A string where a list belongs says so."""
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(with_(MINIMAL, providers={"p": provider(api_keys="sk-123")}), environ={})
        assert problems_of(exc_info) == {"providers.p.api_keys": "expected a list, got a string"}

    def test_missing_required(self) -> None:
        """A missing required key names its path."""
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict({"models": {"chat": {"targets": [{"nodes": "any"}]}}}, environ={})
        assert problems_of(exc_info) == {"models.chat.targets[0].model": "required key is missing"}

    def test_models_required_and_non_empty(self) -> None:
        """models is required and needs at least one entry."""
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict({"providers": {}}, environ={})
        assert "models" in problems_of(exc_info)
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict({"models": {}}, environ={})
        assert "models" in problems_of(exc_info)

    def test_targets_non_empty(self) -> None:
        """A model needs at least one target."""
        with pytest.raises(ConfigError, match=r"models\.chat\.targets"):
            config_from_dict({"models": {"chat": {"targets": []}}}, environ={})

    def test_bad_strategy(self) -> None:
        """Unknown strategies are rejected with the allowed ones."""
        data = {"models": {"chat": {"strategy": "random", "targets": [{"nodes": "any", "model": "m"}]}}}
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert "least-busy" in problems_of(exc_info)["models.chat.strategy"]

    def test_all_strategies_accepted(self) -> None:
        """Every documented strategy is accepted."""
        for strategy in ("priority", "weighted", "cheapest", "fastest", "least-busy"):
            ModelConfig(strategy=strategy, targets=[TargetConfig(nodes="any", model="m")])

    def test_bad_kind(self) -> None:
        """Provider kind must be openai or anthropic."""
        with pytest.raises(ConfigError, match=r"providers\.p\.kind"):
            config_from_dict(with_(MINIMAL, providers={"p": provider(kind="azure")}), environ={})
        cfg = config_from_dict(with_(MINIMAL, providers={"p": provider(kind="anthropic")}), environ={})
        assert cfg.providers["p"].kind == "anthropic"

    @pytest.mark.parametrize(
        ("section", "field", "value"),
        [
            ("providers.p", "timeout_s", 0),
            ("providers.p", "ttft_timeout_s", -1),
            ("providers.p", "connect_timeout_s", 0),
            ("providers.p", "idle_timeout_s", 0),
            ("providers.p", "max_connections", 0),
            ("providers.p", "timeout_s", float("inf")),
            ("cache", "ttl_s", 0),
            ("cache", "max_entries", 0),
            ("cache", "max_bytes", 0),
            ("server", "max_body_bytes", 1023),
            ("server", "request_timeout_s", 0),
            ("limits.org", "rpm", 0),
            ("limits.org", "spend_usd_per_month", 0),
        ],
    )
    def test_ranges(self, section: str, field: str, value: Any) -> None:
        """Out-of-range numbers are rejected at their path."""
        data: dict[str, Any] = dict(MINIMAL)
        if section == "providers.p":
            data["providers"] = {"p": provider(**{field: value})}
        elif section == "limits.org":
            data["limits"] = {"org": {field: value}}
        else:
            data[section] = {field: value}
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert f"{section}.{field}" in problems_of(exc_info)

    def test_target_ranges(self) -> None:
        """weight and context_window must be positive; model non-empty."""
        data = {"models": {"chat": {"targets": [{"nodes": "any", "model": "", "weight": 0, "context_window": 0}]}}}
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert set(problems_of(exc_info)) == {
            "models.chat.targets[0].model",
            "models.chat.targets[0].weight",
            "models.chat.targets[0].context_window",
        }

    def test_bad_scope(self) -> None:
        """Scopes are limited to inference, admin and node."""
        data = with_(MINIMAL, auth={"keys": [{"key": "12345678", "org": "o", "scopes": ["root"]}]})
        with pytest.raises(ConfigError, match=r"auth\.keys\[0\]\.scopes\[0\]"):
            config_from_dict(data, environ={})

    def test_int_dict_key_rendered_as_key(self) -> None:
        """A non-string model name is reported as a mapping key, not a list index."""
        with pytest.raises(ConfigError) as exc_info:
            parse_config("models: {4: {targets: [{nodes: any, model: m}]}}", environ={})
        assert problems_of(exc_info) == {"models.4": "invalid key: Input should be a valid string"}


class TestProviderURL:
    """base_url must be an absolute http(s) URL."""

    @pytest.mark.parametrize(
        "url", ["api.openai.com/v1", "ftp://x.example", "http://", "/v1", "", "http://exa mple.com", "http://h:99999"]
    )
    def test_bad_url(self, url: str) -> None:
        """Non-absolute or non-http URLs are rejected at the provider's base_url."""
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(with_(MINIMAL, providers={"p": {"base_url": url}}), environ={})
        assert "absolute http(s) URL" in problems_of(exc_info)["providers.p.base_url"]

    def test_trailing_slash_stripped(self) -> None:
        """A trailing / is removed."""
        assert ProviderConfig(base_url="https://api.example.com/v1/").base_url == "https://api.example.com/v1"

    def test_url_credentials_not_echoed(self) -> None:
        """A rejected URL is not echoed (it may carry credentials)."""
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(with_(MINIMAL, providers={"p": {"base_url": "ftp://u:hunter22@h"}}), environ={})
        assert "hunter22" not in str(exc_info.value)

    def test_base_url_required(self) -> None:
        """base_url has no default."""
        with pytest.raises(ConfigError, match=r"providers\.p\.base_url"):
            config_from_dict(with_(MINIMAL, providers={"p": {}}), environ={})


class TestTargets:
    """Exactly one of provider/nodes, and provider references."""

    def test_neither(self) -> None:
        """A target with neither provider nor nodes is rejected at its path."""
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict({"models": {"chat": {"targets": [{"model": "m"}]}}}, environ={})
        assert problems_of(exc_info) == {
            "models.chat.targets[0]": "exactly one of 'provider' or 'nodes' must be set"
        }

    def test_both(self) -> None:
        """A target with both provider and nodes is rejected at its path."""
        data = with_(
            MINIMAL,
            providers={"p": provider()},
            models={"chat": {"targets": [{"nodes": "any", "model": "m"}, {"provider": "p", "nodes": "any", "model": "m"}]}},
        )
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert problems_of(exc_info) == {
            "models.chat.targets[1]": "exactly one of 'provider' or 'nodes' must be set"
        }

    def test_unknown_provider_lists_known(self) -> None:
        """An unknown provider reference lists the known providers."""
        data = {
            "providers": {"b": provider(), "a": provider()},
            "models": {"chat": {"targets": [{"provider": "c", "model": "m"}]}},
        }
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, source="recipes/x.yaml", environ={})
        assert exc_info.value.problems == [
            ("models.chat.targets[0].provider", "unknown provider 'c' (known: a, b)")
        ]

    def test_unknown_provider_with_none_defined(self) -> None:
        """With no providers at all, the message says so."""
        with pytest.raises(ConfigError, match="none configured"):
            config_from_dict({"models": {"chat": {"targets": [{"provider": "c", "model": "m"}]}}}, environ={})


class TestStores:
    """Store URLs must use a scheme valid for their role."""

    @pytest.mark.parametrize(
        ("role", "url"),
        [
            ("state", "memory://"),
            ("state", "redis://127.0.0.1:6379/0"),
            ("state", "rediss://h:6380/0"),
            ("cache", "memory://"),
            ("cache", "redis://h/1"),
            ("ledger", "sqlite:///asgi-llm.db"),
            ("ledger", "sqlite://"),
            ("ledger", "postgresql://u@h/db"),
            ("ledger", "postgresql+psycopg://u@h/db"),
        ],
    )
    def test_valid(self, role: str, url: str) -> None:
        """Each role accepts its schemes."""
        cfg = config_from_dict(with_(MINIMAL, stores={role: url}), environ={})
        assert getattr(cfg.stores, role) == url

    @pytest.mark.parametrize(
        ("role", "url", "allowed"),
        [
            ("state", "sqlite:///x.db", "memory://, redis://, rediss://"),
            ("cache", "postgresql://h/db", "memory://, redis://, rediss://"),
            ("ledger", "memory://", "sqlite://, postgresql://, postgresql+psycopg://"),
            ("ledger", "redis://h", "sqlite://, postgresql://, postgresql+psycopg://"),
            ("state", "mysql://h", "memory://, redis://, rediss://"),
            ("ledger", "just-a-path.db", "sqlite://, postgresql://, postgresql+psycopg://"),
        ],
    )
    def test_invalid_for_role(self, role: str, url: str, allowed: str) -> None:
        """A scheme wrong for the role names the role and the allowed schemes."""
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(with_(MINIMAL, stores={role: url}), environ={})
        msg = problems_of(exc_info)[f"stores.{role}"]
        assert f"{role} store" in msg
        assert f"allowed schemes: {allowed}" in msg

    def test_store_password_not_echoed(self) -> None:
        """A rejected store URL reveals only its scheme."""
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(with_(MINIMAL, stores={"ledger": "mysql://u:s3cretpw@h/db"}), environ={})
        text = str(exc_info.value)
        assert "s3cretpw" not in text
        assert "mysql://" in text


class TestAuth:
    """Keys: lengths, duplicates, model references, and never leaking secrets."""

    def test_duplicate_admin_and_static_key(self) -> None:
        """A key repeated across admin_keys and keys is reported at its second occurrence."""
        data = with_(
            MINIMAL,
            auth={"admin_keys": ["supersecret-1"], "keys": [{"key": "supersecret-1", "org": "o"}]},
        )
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert exc_info.value.problems == [
            ("auth.keys[0].key", "duplicate key (same value as auth.admin_keys[0])")
        ]
        assert "supersecret-1" not in str(exc_info.value)

    def test_duplicate_static_keys(self) -> None:
        """Two static keys with the same value: the second is reported."""
        data = with_(
            MINIMAL,
            auth={"keys": [{"key": "supersecret-2", "org": "a"}, {"key": "supersecret-2", "org": "b"}]},
        )
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert exc_info.value.problems == [
            ("auth.keys[1].key", "duplicate key (same value as auth.keys[0].key)")
        ]
        assert "supersecret-2" not in str(exc_info.value)

    def test_duplicate_via_env_not_leaked(self) -> None:
        """Duplicates coming from env vars are reported without the value."""
        text = 'models: {chat: {targets: [{nodes: any, model: m}]}}\nauth: {admin_keys: ["${A}", "${B}"]}\n'
        with pytest.raises(ConfigError) as exc_info:
            parse_config(text, environ={"A": "same-secret-xyz", "B": "same-secret-xyz"})
        assert exc_info.value.problems == [("auth.admin_keys[1]", "duplicate key (same value as auth.admin_keys[0])")]
        assert "same-secret-xyz" not in str(exc_info.value)

    def test_short_keys_not_leaked(self) -> None:
        """Too-short keys are rejected without echoing them."""
        data = with_(
            MINIMAL,
            auth={"admin_keys": ["short1"], "keys": [{"key": "short2", "org": "o"}]},
        )
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert set(problems_of(exc_info)) == {"auth.admin_keys[0]", "auth.keys[0].key"}
        assert "short1" not in str(exc_info.value) and "short2" not in str(exc_info.value)

    def test_secret_wrong_type_not_leaked(self) -> None:
        """A non-string secret is rejected without echoing it, even in a raw ValidationError."""
        data = with_(MINIMAL, auth={"pepper": 987654321987}, providers={"p": provider(api_keys=[123456789123])})
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert set(problems_of(exc_info)) == {"auth.pepper", "providers.p.api_keys[0]"}
        assert "987654321987" not in str(exc_info.value)
        assert "123456789123" not in str(exc_info.value)
        with pytest.raises(ValidationError) as raw:
            AuthConfig(pepper=987654321987)  # type: ignore[arg-type]
        assert "987654321987" not in str(raw.value)

    def test_org_required_non_empty(self) -> None:
        """A static key needs a non-empty org."""
        data = with_(MINIMAL, auth={"keys": [{"key": "12345678", "org": ""}]})
        with pytest.raises(ConfigError, match=r"auth\.keys\[0\]\.org"):
            config_from_dict(data, environ={})

    def test_unknown_model_in_key(self) -> None:
        """A key's model that is neither * nor configured lists known models."""
        data = with_(MINIMAL, auth={"keys": [{"key": "12345678", "org": "o", "models": ["chat", "gpt-5"]}]})
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert exc_info.value.problems == [
            ("auth.keys[0].models[1]", "unknown model 'gpt-5' (known: *, chat)")
        ]

    def test_key_fields(self) -> None:
        """A fully specified static key loads."""
        data = with_(
            MINIMAL,
            auth={
                "pepper": "pep",
                "keys": [
                    {
                        "key": "12345678",
                        "org": "o",
                        "name": "ci",
                        "models": ["chat"],
                        "scopes": ["inference", "admin", "node"],
                        "limits": {"rpm": 1, "tpm": 2, "concurrency": 3, "spend_usd_per_day": "1.5",
                                   "spend_usd_per_month": 30},
                    }
                ],
            },
        )
        key = config_from_dict(data, environ={}).auth.keys[0]
        assert key.name == "ci" and key.scopes == ["inference", "admin", "node"]
        assert key.limits.spend_usd_per_day == Decimal("1.5")
        assert key.limits.concurrency == 3


class TestModelNames:
    """Public model names."""

    @pytest.mark.parametrize("name", ["", "my model", "tab\tname"])
    def test_bad_names(self, name: str) -> None:
        """Empty names and names with whitespace are rejected."""
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict({"models": {name: {"targets": [{"nodes": "any", "model": "m"}]}}}, environ={})
        path, message = exc_info.value.problems[0]
        assert path == "models"
        assert "no whitespace" in message and repr(name) in message


class TestYamlAndShape:
    """YAML syntax errors, empty files and non-mapping documents."""

    def test_syntax_error_has_line(self) -> None:
        """A YAML syntax error reports line and column, without quoting the line."""
        text = "models:\n  chat: {targets: [\n    {nodes: any, model: m}\n  secret-value-here: : :\n"
        with pytest.raises(ConfigError) as exc_info:
            parse_config(text, source="r.yaml", environ={})
        msg = str(exc_info.value)
        assert msg.startswith("r.yaml: 1 problem\n")
        assert "YAML syntax error at line 4" in msg
        assert "secret-value-here" not in msg

    def test_tab_indentation(self) -> None:
        """Tabs in indentation are a syntax error with a line number."""
        with pytest.raises(ConfigError, match=r"line 2, column 1"):
            parse_config("models:\n\tchat: 1\n", environ={})

    def test_duplicate_yaml_key(self) -> None:
        """A key repeated in one mapping is an error (YAML would silently keep the last)."""
        with pytest.raises(ConfigError, match=r"line 3, column 1: duplicate key 'models'"):
            parse_config("models: {a: {targets: [{nodes: any, model: m}]}}\n# x\nmodels: {}\n", environ={})

    def test_merge_keys_allowed(self) -> None:
        """YAML merge keys may be overridden without a duplicate error."""
        text = (
            "providers:\n"
            "  a: &d {base_url: 'https://a.example', timeout_s: 10}\n"
            "  b: {<<: *d, timeout_s: 20}\n"
            "models: {chat: {targets: [{provider: b, model: m}]}}\n"
        )
        cfg = parse_config(text, environ={})
        assert cfg.providers["b"].timeout_s == 20
        assert cfg.providers["b"].base_url == "https://a.example"

    @pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "---\n"])
    def test_empty(self, text: str) -> None:
        """An empty recipe is a ConfigError."""
        with pytest.raises(ConfigError, match="empty"):
            parse_config(text, environ={})

    @pytest.mark.parametrize(("text", "got"), [("- a\n- b\n", "a list"), ("hello\n", "a string"), ("42\n", "a number")])
    def test_non_mapping_top_level(self, text: str, got: str) -> None:
        """The top level must be a mapping."""
        with pytest.raises(ConfigError) as exc_info:
            parse_config(text, environ={})
        assert exc_info.value.problems == [("", f"the top level must be a mapping, got {got}")]

    def test_config_from_dict_non_mapping(self) -> None:
        """config_from_dict rejects non-dicts too."""
        with pytest.raises(ConfigError, match="top level must be a mapping"):
            config_from_dict([1, 2], environ={})  # type: ignore[arg-type]

    def test_multiple_documents_rejected(self) -> None:
        """A stream with several YAML documents is a syntax error."""
        with pytest.raises(ConfigError, match="YAML syntax error"):
            parse_config("models: {}\n---\nmodels: {}\n", environ={})

    def test_unsafe_tags_rejected(self) -> None:
        """Python object tags are not constructed (safe loading)."""
        with pytest.raises(ConfigError, match="YAML syntax error"):
            parse_config("models: !!python/object/apply:os.system ['true']\n", environ={})


class TestErrorReporting:
    """Several problems are collected and formatted together."""

    def test_many_problems_at_once(self) -> None:
        """Problems from different sections are all reported in one error."""
        data = {
            "providers": {"p": {"base_url": "nope", "timeout_s": -1, "bogus": 1}},
            "models": {"chat": {"targets": [{"model": "m"}]}},
            "stores": {"ledger": "memory://"},
            "cache": {"ttl_s": "x"},
            "auth": {"admin_keys": ["${UNSET_ADMIN}"]},
        }
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, source="recipes/x.yaml", environ={})
        paths = [p for p, _ in exc_info.value.problems]
        assert paths == [
            "auth.admin_keys[0]",
            "providers.p.base_url",
            "providers.p.timeout_s",
            "providers.p.bogus",
            "models.chat.targets[0]",
            "stores.ledger",
            "cache.ttl_s",
        ]
        text = str(exc_info.value)
        assert text.splitlines()[0] == "recipes/x.yaml: 7 problems"
        assert all(line.startswith("  ") for line in text.splitlines()[1:])

    def test_cross_check_problems_together(self) -> None:
        """Unknown providers and unknown key models are reported together."""
        data = {
            "providers": {"a": provider()},
            "models": {
                "chat": {"targets": [{"provider": "x", "model": "m"}, {"provider": "y", "model": "m"}]},
                "bad name": {"targets": [{"provider": "a", "model": "m"}]},
            },
            "auth": {"keys": [{"key": "12345678", "org": "o", "models": ["nope"]}]},
        }
        with pytest.raises(ConfigError) as exc_info:
            config_from_dict(data, environ={})
        assert [p for p, _ in exc_info.value.problems] == [
            "models",
            "models.chat.targets[0].provider",
            "models.chat.targets[1].provider",
            "auth.keys[0].models[0]",
        ]

    def test_str_format(self) -> None:
        """str() is a header with the source then one indented line per problem."""
        err = ConfigError(
            [("models.chat.targets[0].provider", "unknown provider 'c' (known: a, b)"), ("x", "y")],
            source="recipes/x.yaml",
        )
        assert str(err) == (
            "recipes/x.yaml: 2 problems\n"
            "  models.chat.targets[0].provider: unknown provider 'c' (known: a, b)\n"
            "  x: y"
        )

    def test_str_without_source(self) -> None:
        """Without a source, str() is just the problem lines; an empty path shows the message only."""
        err = ConfigError([("a.b", "bad"), ("", "whole file")])
        assert str(err) == "a.b: bad\nwhole file"

    def test_singular_header(self) -> None:
        """One problem says '1 problem'."""
        assert str(ConfigError([("a", "b")], source="f.yaml")) == "f.yaml: 1 problem\n  a: b"

    def test_pickle_roundtrip(self) -> None:
        """ConfigError survives pickling (e.g. across worker processes)."""
        err = pickle.loads(pickle.dumps(ConfigError([("a", "b")], source="f.yaml")))
        assert err.problems == [("a", "b")] and err.source == "f.yaml"

    def test_default_sources(self) -> None:
        """parse_config and config_from_dict name their default sources."""
        with pytest.raises(ConfigError, match=r"^<string>: "):
            parse_config("[]", environ={})
        with pytest.raises(ConfigError, match=r"^<dict>: "):
            config_from_dict({}, environ={})


class TestLoadConfig:
    """load_config reads a file and names it in errors."""

    def test_loads_file(self, tmp_path: Path) -> None:
        """A recipe file loads (str and PathLike paths)."""
        path = tmp_path / "recipe.yaml"
        path.write_text(CONTRACT_RECIPE_RUNNABLE, encoding="utf-8")
        assert load_config(path, environ=ENV).model_names() == ["chat"]
        assert load_config(str(path), environ=ENV).cache.enabled is True

    def test_source_in_message(self, tmp_path: Path) -> None:
        """Errors are prefixed with the file name."""
        path = tmp_path / "x.yaml"
        path.write_text("models: {chat: {targets: [{provider: c, model: m}]}}\nfoo: 1\n", encoding="utf-8")
        with pytest.raises(ConfigError) as exc_info:
            load_config(path, environ={})
        assert exc_info.value.source == str(path)
        # The unknown provider 'c' is reported alongside (it was hidden by the schema error).
        assert str(exc_info.value).startswith(f"{path}: 2 problems\n  foo: unknown key 'foo'")

    def test_empty_file(self, tmp_path: Path) -> None:
        """An empty file is a ConfigError naming the file."""
        path = tmp_path / "empty.yaml"
        path.write_text("", encoding="utf-8")
        with pytest.raises(ConfigError, match=r"empty\.yaml: 1 problem\n  the recipe is empty"):
            load_config(path, environ={})

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file is a ConfigError, not a traceback."""
        path = tmp_path / "nope.yaml"
        with pytest.raises(ConfigError, match="cannot read the recipe"):
            load_config(path, environ={})

    def test_bom_tolerated(self, tmp_path: Path) -> None:
        """A UTF-8 byte-order mark is ignored."""
        path = tmp_path / "bom.yaml"
        path.write_bytes(b"\xef\xbb\xbfmodels: {chat: {targets: [{nodes: any, model: m}]}}\n")
        assert load_config(path, environ={}).model_names() == ["chat"]

    def test_syntax_error_line_in_file(self, tmp_path: Path) -> None:
        """YAML syntax errors in a file carry the file name and line."""
        path = tmp_path / "bad.yaml"
        path.write_text("models:\n  chat: [\n", encoding="utf-8")
        with pytest.raises(ConfigError) as exc_info:
            load_config(path, environ={})
        assert str(exc_info.value).startswith(f"{path}: 1 problem\n  YAML syntax error at line 3")


class TestDirectConstruction:
    """The models also validate when built in code."""

    def test_cross_checks_in_code(self) -> None:
        """GatewayConfig(...) runs the cross-checks too."""
        with pytest.raises(ValidationError, match="unknown provider"):
            GatewayConfig(models={"chat": ModelConfig(targets=[TargetConfig(provider="x", model="m")])})

    def test_valid_in_code(self) -> None:
        """A config built in code works like a parsed one."""
        cfg = GatewayConfig(
            providers={"p": ProviderConfig(base_url="http://h/v1/")},
            models={"chat": ModelConfig(targets=[TargetConfig(provider="p", model="m")])},
        )
        assert cfg.providers["p"].base_url == "http://h/v1"
