"""The response cache's pure parts: keys, policy and client controls, stored entries.

The middleware (:mod:`asgi_llm.middleware.cache`) and the stores
(:mod:`asgi_llm.stores.cache`) build on these; nothing here does I/O.
"""

from __future__ import annotations

from asgi_llm.cache.capture import ResponseCapture
from asgi_llm.cache.entry import Entry, StreamAssembler, is_complete, replay_events
from asgi_llm.cache.cache_key import IGNORED_FIELDS, CacheKey, canonical_json, make_key
from asgi_llm.cache.policy import CachePolicy, CacheRule, Controls, is_deterministic, parse_controls

__all__ = [
    "IGNORED_FIELDS",
    "CacheKey",
    "CachePolicy",
    "CacheRule",
    "Controls",
    "Entry",
    "ResponseCapture",
    "StreamAssembler",
    "canonical_json",
    "is_complete",
    "is_deterministic",
    "make_key",
    "parse_controls",
    "replay_events",
]
