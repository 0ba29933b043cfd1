"""Token estimates for attempts whose upstream reported no usage (rows flagged ``estimated``).

When does that happen? A stream cut or abandoned (client gone, upstream died) before the
final usage chunk, or an upstream that never sends usage. What the gateway knows then:

* **completion tokens** — the content pieces relayed to the client. OpenAI-compatible
  servers stream about one token per content chunk, so each chunk whose delta carries
  non-empty ``content`` / ``arguments`` / ``text`` counts one token. (The fake upstream
  bills exactly that, so test totals match to the token.)
* **prompt tokens** — a heuristic over the prompt's text: ``chars`` (default:
  ⌈UTF-8 bytes / 4⌉ + 1 per message) or ``words`` (whitespace words + 1 per message,
  which is how the bundled fake upstream counts). Neither equals a real tokenizer's
  count; the row says ``estimated=True`` so finance can tell.

An attempt that failed before the upstream sent anything (HTTP error, connection
refused, timeout before the first byte) used no tokens: it is recorded with zeros and
``estimated=False``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from asgi_llm.context import RequestContext

__all__ = ["ESTIMATORS", "PromptEstimator", "count_content_pieces", "estimate_prompt_chars", "estimate_prompt_words"]

PromptEstimator = Callable[[RequestContext], int]

# A JSON string member named content/arguments/text whose value is not empty.
_CONTENT = re.compile(rb'"(?:content|arguments|text)"\s*:\s*"(?!")')


def count_content_pieces(body: bytes) -> int:
    """Content-bearing SSE chunks in ``body`` (one token each, by the estimate above)."""
    return len(_CONTENT.findall(body)) if body else 0


def _texts(payload: dict[str, Any]) -> tuple[list[str], int]:
    """The prompt's texts and its number of messages/items."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        out = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                out.append(content)
            elif isinstance(content, list):
                out.append(" ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)))
            else:
                out.append("")
        return out, len(messages)
    for name in ("prompt", "input"):
        value = payload.get(name)
        if isinstance(value, str):
            return [value], 0
        if isinstance(value, list):
            return [v if isinstance(v, str) else " ".join(map(str, v)) if isinstance(v, list) else str(v) for v in value], 0
    return [], 0


def estimate_prompt_chars(ctx: RequestContext) -> int:
    """⌈UTF-8 bytes / 4⌉ of the prompt text, + 1 per message."""
    texts, n = _texts(ctx.payload)
    size = sum(len(t.encode()) for t in texts)
    return -(-size // 4) + n


def estimate_prompt_words(ctx: RequestContext) -> int:
    """Whitespace-separated words of the prompt text, + 1 per message."""
    texts, n = _texts(ctx.payload)
    return sum(len(t.split()) for t in texts) + n


ESTIMATORS: dict[str, PromptEstimator] = {"chars": estimate_prompt_chars, "words": estimate_prompt_words}
