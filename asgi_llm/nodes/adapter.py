"""The adapter for node targets: OpenAI-compatible, with the node's usage report bounded.

A node is another tenant's machine: the token counts it reports feed the consumer's
bill, the ledger and token quotas. Counts above :data:`MAX_REPORTED_TOKENS` (or
negative, or not integers) are clamped before anything reads them — the bytes relayed to
the caller are the node's own; only what the gateway accounts is bounded — and the
clamp is logged with the node's name.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from asgi_llm.providers.base import Chunk, UpstreamReply
from asgi_llm.providers.openai import OpenAIAdapter

__all__ = ["MAX_REPORTED_TOKENS", "NodeAdapter", "bound_usage"]

logger = logging.getLogger("asgi_llm.nodes")

MAX_REPORTED_TOKENS = 10_000_000
"""The most tokens one response of a node may account for, per field."""

_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
_DETAILS = (("prompt_tokens_details", "cached_tokens"), ("completion_tokens_details", "reasoning_tokens"))


def _clamp(value: Any) -> tuple[Any, bool]:
    if isinstance(value, bool) or not isinstance(value, int):
        return (0, True) if value is not None else (None, False)
    if value < 0:
        return 0, True
    if value > MAX_REPORTED_TOKENS:
        return MAX_REPORTED_TOKENS, True
    return value, False


def bound_usage(obj: dict[str, Any]) -> bool:
    """Clamp ``obj["usage"]`` in place; True when something was out of bounds."""
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return False
    changed = False
    for name in _FIELDS:
        if name in usage:
            usage[name], bad = _clamp(usage[name])
            changed = changed or bad
    for outer, inner in _DETAILS:
        details = usage.get(outer)
        if isinstance(details, dict) and inner in details:
            details[inner], bad = _clamp(details[inner])
            changed = changed or bad
    if changed:
        usage["total_tokens"] = min(MAX_REPORTED_TOKENS * 2, (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0))
    return changed


class _NodeReply(UpstreamReply):
    """A node's reply whose usage objects are bounded as they are read."""

    def _check(self, obj: dict[str, Any]) -> None:
        if bound_usage(obj):
            logger.warning("%s reported out-of-range token counts; clamped for accounting", self.target)

    async def body(self) -> tuple[bytes, dict[str, Any]]:
        raw, obj = await super().body()
        self._check(obj)
        return raw, obj

    async def chunks(self) -> AsyncIterator[Chunk]:
        async for raw, obj in super().chunks():
            self._check(obj)
            yield raw, obj


class NodeAdapter(OpenAIAdapter):
    """:class:`OpenAIAdapter` whose replies have bounded usage (see the module docstring)."""

    async def send(self, ctx: Any, target: Any, *, api_key: str | None = None) -> UpstreamReply:
        reply = await super().send(ctx, target, api_key=api_key)
        return _NodeReply(reply.response, target=reply.target, timeouts=reply.timeouts, sent_at=reply.sent_at)
