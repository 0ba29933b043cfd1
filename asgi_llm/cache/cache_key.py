"""Cache keys that are correct by construction.

A key is the sha256 of a canonical JSON document made of:

* ``v`` -- the key format version (bumped when this function changes);
* ``endpoint`` -- ``chat``, ``completions`` or ``embeddings``;
* ``partition`` -- ``[org]`` (default) or ``[org, key id]``: tenants never share entries;
* ``targets`` -- the public model's resolved target routes, in order
  (``provider-a/gpt-4o-mini|provider-b/llama``): changing a recipe invalidates entries;
* ``request`` -- the *whole* request body minus :data:`IGNORED_FIELDS`.

Everything not explicitly ignored is part of the key, so a parameter this version has
never heard of (a new OpenAI field, a vendor extension) can never be silently dropped
and make two different requests share an answer. Canonicalisation removes what does
not change meaning: object key order and JSON formatting whitespace (the body is parsed
first), and the integer/float spelling of the same number (``1`` and ``1.0``).
String contents are kept byte for byte: ``"hi"`` and ``"hi "`` are different prompts.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

__all__ = ["IGNORED_FIELDS", "KEY_VERSION", "CacheKey", "canonical_json", "make_key", "normalise"]

KEY_VERSION = 1

IGNORED_FIELDS: frozenset[str] = frozenset(
    {
        "user",  # end-user id for abuse monitoring
        "safety_identifier",  # OpenAI's successor of ``user``
        "metadata",  # tags for the caller's own bookkeeping
        "stream",  # a stored answer is replayed either way
        "stream_options",  # only shapes the stream (usage chunk), not the answer
        "cache",  # LiteLLM-style cache controls (read by the cache layer)
        "prompt_cache_key",  # upstream prompt-cache routing hint
        "prompt_cache_retention",  # upstream prompt-cache lifetime
    }
)
"""Top-level request fields that never change the answer. Everything else is keyed."""


def normalise(value: Any) -> Any:
    """The canonical form of a parsed JSON value.

    Integral floats become ints (``1.0`` → ``1``, ``-0.0`` → ``0``) so both spellings of
    a number share a key; booleans stay booleans (``true`` is not ``1``).

    Example:
        >>> normalise({"b": [1.0, 2.5], "a": True})
        {'b': [1, 2.5], 'a': True}
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        return {str(k): normalise(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [normalise(v) for v in value]
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, numbers normalised, unicode kept as is."""
    return json.dumps(normalise(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Where one cached answer lives: its org and public model (for purges) and digest.

    ``digest`` alone identifies the answer (org and model are inside the hash);
    ``org`` and ``model`` are kept beside it so entries can be purged by either.
    """

    org: str
    model: str
    digest: str

    @property
    def storage_id(self) -> str:
        """``<org>:<model>:<digest>`` with org and model percent-encoded (no ``:`` or glob chars)."""
        return f"{quote(self.org, safe='')}:{quote(self.model, safe='')}:{self.digest}"

    @property
    def short(self) -> str:
        """The digest prefix shown in the ``x-asgi-llm-cache-key`` header."""
        return self.digest[:16]


def make_key(
    *,
    endpoint: str,
    payload: Mapping[str, Any],
    org: str,
    key_id: str | None = None,
    targets: Sequence[str] = (),
) -> CacheKey:
    """Build the key for a request.

    Args:
        endpoint: ``chat``, ``completions`` or ``embeddings``.
        payload: the parsed request body (every field; ignored ones are dropped here).
        org: the caller's organisation.
        key_id: set to partition by API key as well as by org.
        targets: the public model's target routes, in order.

    Example:
        >>> make_key(endpoint="chat", payload={"model": "m", "messages": [...]}, org="acme",
        ...          targets=["provider-a/gpt-4o-mini"]).digest
        '3f1c…'
    """
    request = {k: v for k, v in payload.items() if k not in IGNORED_FIELDS}
    partition = [org] if key_id is None else [org, key_id]
    doc = {"v": KEY_VERSION, "endpoint": endpoint, "partition": partition, "targets": list(targets), "request": request}
    digest = hashlib.sha256(canonical_json(doc)).hexdigest()
    model = payload.get("model")
    return CacheKey(org=org, model=model if isinstance(model, str) else "", digest=digest)
