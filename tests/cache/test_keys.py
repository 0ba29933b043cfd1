"""Cache keys: answer-relevant differences always split a key; formatting never does."""

from __future__ import annotations

import json
import random
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from asgi_llm.cache.cache_key import IGNORED_FIELDS, CacheKey, canonical_json, make_key

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-10**6, max_value=10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)
field_names = st.text(min_size=1, max_size=12).filter(lambda k: k not in IGNORED_FIELDS and k != "model")
payloads = st.builds(
    lambda extra, content: {"model": "chat", "messages": [{"role": "user", "content": content}], **extra},
    st.dictionaries(field_names, json_values, max_size=5),
    st.text(max_size=20),
)


def key(payload: dict[str, Any], **kw: Any) -> str:
    kw.setdefault("org", "acme")
    kw.setdefault("targets", ["provider-a/gpt-4o-mini"])
    return make_key(endpoint="chat", payload=payload, **kw).digest


def shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's keys in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


def differs(a: Any, b: Any) -> bool:
    return canonical_json(a) != canonical_json(b)


class TestKeyProperties:
    @settings(max_examples=150)
    @given(payloads, st.randoms(use_true_random=False), st.sampled_from([None, 0, 2, "\t"]), st.booleans())
    def test_order_and_whitespace_never_split(self, payload: dict, rng: random.Random, indent: Any, spaced: bool) -> None:
        """Re-ordering fields at any depth and re-formatting the JSON body give the same key."""
        seps = (", ", ": ") if spaced else (",", ":")
        text = json.dumps(shuffled(payload, rng), indent=indent, separators=seps)
        assert key(json.loads(text)) == key(payload)

    @settings(max_examples=150)
    @given(payloads, field_names, json_values, json_values)
    def test_any_answer_relevant_field_splits(self, payload: dict, field: str, a: Any, b: Any) -> None:
        """Two requests differing in any non-ignored field (known or not) never share a key."""
        assume(differs(a, b))
        assert key({**payload, field: a}) != key({**payload, field: b})

    @settings(max_examples=100)
    @given(payloads, field_names, json_values)
    def test_an_unknown_field_is_keyed(self, payload: dict, field: str, value: Any) -> None:
        """Adding a field this version has never heard of changes the key."""
        assume(field not in payload)
        assert key({**payload, field: value}) != key(payload)

    @settings(max_examples=100)
    @given(payloads, st.sampled_from(sorted(IGNORED_FIELDS)), json_values)
    def test_ignored_fields_never_split(self, payload: dict, field: str, value: Any) -> None:
        """user, metadata, stream, stream_options, cache … do not change the key."""
        assert key({**payload, field: value}) == key(payload)

    @settings(max_examples=100)
    @given(payloads, st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=8))
    def test_orgs_never_share(self, payload: dict, org_a: str, org_b: str) -> None:
        """The same request by two orgs (or two keys under partition=key) gets two keys."""
        assume(org_a != org_b)
        assert key(payload, org=org_a) != key(payload, org=org_b)
        assert key(payload, key_id="k1") != key(payload, key_id="k2")
        assert key(payload, key_id="k1") != key(payload)


class TestKeyExamples:
    def test_numbers_normalised(self) -> None:
        """1 and 1.0 share a key; true and 1 do not; 0.5 and 0.50 do."""
        base = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
        assert key({**base, "temperature": 1}) == key({**base, "temperature": 1.0})
        assert key({**base, "temperature": -0.0}) == key({**base, "temperature": 0})
        assert key({**base, "logprobs": True}) != key({**base, "logprobs": 1})
        assert key(json.loads('{"model": "chat", "top_p": 0.50}')) == key(json.loads('{"model": "chat", "top_p": 0.5}'))

    def test_string_whitespace_is_content(self) -> None:
        """Whitespace inside a prompt is part of the prompt."""
        a = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        b = {"model": "chat", "messages": [{"role": "user", "content": "hi "}]}
        assert key(a) != key(b)

    def test_targets_endpoint_and_model(self) -> None:
        """A different target set, endpoint or public model gives a different key."""
        p = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
        assert key(p) != key(p, targets=["provider-b/llama"])
        assert key(p) != key(p, targets=["provider-a/gpt-4o-mini", "provider-b/llama"])
        assert key(p) != make_key(endpoint="completions", payload=p, org="acme", targets=["provider-a/gpt-4o-mini"]).digest
        assert key(p) != key({**p, "model": "chat-2"})

    def test_storage_id_escapes(self) -> None:
        """Org and model are percent-encoded in the storage id, so ':' and '*' cannot collide or glob."""
        k = CacheKey(org="a:b*", model="m?[x]", digest="d")
        assert k.storage_id == "a%3Ab%2A:m%3F%5Bx%5D:d"
        assert CacheKey("a", "b:c", "d").storage_id != CacheKey("a:b", "c", "d").storage_id
        assert make_key(endpoint="chat", payload={"model": "m"}, org="o").model == "m"
