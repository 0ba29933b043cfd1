"""Accounting: token estimates, prices and charges — the one place money is computed.

Every layer that puts a price on a request asks this module, so their amounts agree to
the pico-dollar:

* the **router** — ``cheapest`` orders by :meth:`Accountant.estimate_cost`, and
  OpenRouter ``provider.max_price`` compares :meth:`Accountant.unit_price`;
* the **quota layer** — admission reserves :meth:`Accountant.reservation` (the most
  expensive target the request may reach), settlement charges
  :meth:`Accountant.charges` (every attempt);
* the **ledger** (:class:`~asgi_llm.middleware.usage.UsageMiddleware`) — one row per
  :class:`Charge`, so the quota's settled spend *is* the sum of the request's rows.

Prices, first match wins, and each charge records which one priced it:

1. ``recipe`` — the target's ``price`` (USD per 1M tokens); for a node target, the node
   owner's price when it set one (the router's node resolver puts it on the target);
2. ``override`` — ``usage.prices`` in the recipe, keyed by route (``provider/model``,
   ``node:<name>/model``) or by upstream model name;
3. ``genai-prices`` — the bundled table of the ``genai-prices`` package, looked up by
   upstream model (and the response model), **offline**: it is never updated at run time;
4. ``unpriced`` — cost 0, so reports show which traffic has no price.

Token semantics follow OpenAI: ``prompt_tokens`` includes ``cached_tokens`` and
``completion_tokens`` includes ``reasoning_tokens``; cached prompt tokens use the
cached-input price when there is one.

Estimates (never billed as reported usage; rows say ``estimated=True``):

* **admission** (:func:`estimate_request`): prompt ≈ ⌈request body bytes / 4⌉ (an
  over-estimate for JSON, which a reservation wants); completion = ``max_completion_tokens``
  / ``max_tokens`` × ``n``, or ``default_max_tokens`` when the request sets none;
* **a cut or usage-less answer** (:meth:`Accountant.charges`): completion tokens are the
  content pieces relayed to the client (OpenAI-compatible servers stream about one token
  per content chunk) or the words/characters of a non-streamed answer; prompt tokens a
  heuristic over the prompt's text, ``chars`` (⌈UTF-8 bytes / 4⌉ + 1 per message) or
  ``words`` (whitespace words + 1 per message, how the bundled fake upstream counts).
  An attempt that failed before the upstream sent anything used no tokens.

Reported usage is hostile input: :func:`plausible_usage` clamps what an upstream (a node
above all) reports to what the request and the answer make possible, and flags it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any, Protocol

from asgi_llm.context import Usage
from asgi_llm.schemas import ChatCompletionRequest
from asgi_llm.targets import Price, Target
from asgi_llm.usage.records import PICO, to_pico

if TYPE_CHECKING:
    from asgi_llm.context import Attempt, RequestContext


class ModelTable(Protocol):
    """What the accountant needs of the router: a public model's recipe targets."""

    def get(self, name: str) -> Any: ...

__all__ = [
    "Accountant",
    "Charge",
    "ESTIMATORS",
    "HIDDEN_TOKENS_MAX",
    "MAX_CHARGE_PICO",
    "PART_TOKENS",
    "PROMPT_SLACK",
    "PriceQuote",
    "Pricer",
    "PromptEstimator",
    "Seen",
    "USAGE_SLACK",
    "answer_bytes",
    "ceil_pico",
    "clamp_charge",
    "completion_cap",
    "cost_of",
    "count_content_pieces",
    "estimate_prompt_chars",
    "estimate_prompt_words",
    "estimate_request",
    "plausible_usage",
    "total_pico",
]

logger = logging.getLogger("asgi_llm.accounting")

MILLION = Decimal(1_000_000)
MAX_CHARGE_PICO = 2**53 - 1
"""Most pico-USD one request reserves or is charged in the state store (≈ $9,007): the
Redis scripts do their arithmetic in Lua doubles, exact only below 2⁵³."""
_MISSING = object()

# ------------------------------------------------------------------ token estimates

PromptEstimator = Callable[["RequestContext"], int]

# A JSON string member named content/arguments/text whose value is not empty.
_CONTENT = re.compile(rb'"(?:content|arguments|text)"\s*:\s*"(?!")')


def count_content_pieces(body: bytes) -> int:
    """Content-bearing SSE chunks in ``body`` (one token each, by the estimate above)."""
    return len(_CONTENT.findall(body)) if body else 0


def _texts(payload: Mapping[str, Any]) -> tuple[list[str], int]:
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
    size = sum(_utf8_len(t) for t in texts)
    return -(-size // 4) + n


def estimate_prompt_words(ctx: RequestContext) -> int:
    """Whitespace-separated words of the prompt text, + 1 per message."""
    texts, n = _texts(ctx.payload)
    return sum(len(t.split()) for t in texts) + n


ESTIMATORS: dict[str, PromptEstimator] = {"chars": estimate_prompt_chars, "words": estimate_prompt_words}


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def completion_cap(payload: Mapping[str, Any], request: Any = None) -> int | None:
    """The completion tokens the request allows (``max_completion_tokens`` or
    ``max_tokens``, × ``n``), or None when it sets no cap.

    A validated chat request (``ctx.request``) is read as is: its fields are already
    positive ints or None. Otherwise the raw payload is checked by hand.
    """
    if isinstance(request, ChatCompletionRequest):
        typed = request.max_completion_tokens or request.max_tokens
        return None if typed is None else typed * (request.n or 1)
    cap = payload.get("max_completion_tokens")
    if not _positive_int(cap):
        cap = payload.get("max_tokens")
    if not _positive_int(cap):
        return None
    n = payload.get("n")
    return int(cap) * (int(n) if _positive_int(n) else 1)


def estimate_request(ctx: RequestContext, default_max_tokens: int = 4096) -> tuple[int, int]:
    """(prompt, completion) tokens a request may use, for reservations and ``cheapest``:
    ⌈body bytes / 4⌉, and the completion cap (``default_max_tokens`` × ``n`` without one)."""
    prompt = math.ceil(len(ctx.body) / 4)
    if ctx.endpoint == "embeddings":
        return prompt, 0
    cap = completion_cap(ctx.payload, ctx.request)
    if cap is None:
        n = ctx.payload.get("n")
        cap = default_max_tokens * (int(n) if _positive_int(n) else 1)
    return prompt, cap


# ------------------------------------------------------------------ plausibility

USAGE_SLACK = 64
"""Completion tokens of slack over the bounds below (special tokens, stop sequences)."""
PROMPT_SLACK = 256
"""Prompt tokens of slack over the body's bytes: a chat template and a default system
prompt the engine adds, on a request whose body is tiny."""
PART_TOKENS = 4096
"""Prompt tokens allowed per non-text content part (an image, audio, a file)."""
HIDDEN_TOKENS_MAX = 131_072
"""Completion tokens a provider may report beyond the answer's bytes when the request set
no cap: hosted reasoning models bill reasoning they never send. Nodes get none: their
engines stream reasoning as text."""


def _media_parts(payload: Mapping[str, Any]) -> int:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") not in (None, "text"))


def _utf8_len(text: str) -> int:
    """UTF-8 length of ``text``; a lone surrogate (an upstream may send ``"\\ud800"``)
    counts its 3 bytes instead of raising."""
    return len(text.encode("utf-8", "surrogatepass"))


def _str_bytes(v: Any) -> int:
    return _utf8_len(v) if isinstance(v, str) else 0


def answer_bytes(obj: Mapping[str, Any]) -> int:
    """UTF-8 bytes of the generated text in one response object or stream chunk: content,
    reasoning, refusals, tool-call names and arguments, completions ``text``. Every
    token of a byte-level tokenizer decodes to at least one byte, so the tokens an
    upstream generated visibly are at most these bytes."""
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return 0
    total = 0
    for c in choices:
        if not isinstance(c, dict):
            continue
        total += _str_bytes(c.get("text"))
        for part in (c.get("delta"), c.get("message")):
            if not isinstance(part, dict):
                continue
            for name in ("content", "reasoning_content", "reasoning", "refusal"):
                total += _str_bytes(part.get(name))
            calls = part.get("tool_calls")
            if isinstance(calls, list):
                for tc in calls:
                    fn = tc.get("function") if isinstance(tc, dict) else None
                    if isinstance(fn, dict):
                        total += _str_bytes(fn.get("name")) + _str_bytes(fn.get("arguments"))
    return total


def plausible_usage(usage: Usage, ctx: RequestContext, *, answer_size: int, hidden_ok: bool) -> Usage:
    """``usage`` as reported, or clamped to what is possible and flagged ``estimated``.

    Bounds: prompt tokens ≤ request body bytes + :data:`PROMPT_SLACK` (+
    :data:`PART_TOKENS` per image/audio/file part); completion tokens (+
    :data:`USAGE_SLACK`) ≤ the request's
    cap (``max_completion_tokens``/``max_tokens`` × ``n``) and ≤ ``answer_size`` (the
    generated text's bytes, :func:`answer_bytes`) — plus, for ``hidden_ok`` targets
    (hosted providers, which bill reasoning they do not send), the reported reasoning
    tokens, at most :data:`HIDDEN_TOKENS_MAX` (and the cap); cached ≤ prompt; reasoning ≤
    completion. Called where an attempt's reported usage is recorded.
    """
    prompt_max = len(ctx.body) + PROMPT_SLACK + PART_TOKENS * _media_parts(ctx.payload)
    cap = completion_cap(ctx.payload, ctx.request) if ctx.endpoint != "embeddings" else 0
    hidden = min(usage.reasoning_tokens, HIDDEN_TOKENS_MAX, cap if cap is not None else HIDDEN_TOKENS_MAX) if hidden_ok else 0
    completion_max = answer_size + hidden + USAGE_SLACK
    if cap is not None:
        completion_max = min(completion_max, cap + USAGE_SLACK)
    prompt = min(usage.prompt_tokens, prompt_max)
    completion = min(usage.completion_tokens, completion_max)
    cached = min(usage.cached_tokens, prompt)
    reasoning = min(usage.reasoning_tokens, completion)
    total = prompt + completion
    if (prompt, completion, cached, reasoning) == (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                                                   usage.reasoning_tokens) and usage.total_tokens <= total:
        return usage
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total, cached_tokens=cached,
                 reasoning_tokens=reasoning, estimated=True)


# ------------------------------------------------------------------ prices


@dataclass(frozen=True, slots=True)
class PriceQuote:
    """A cost and the source that priced it."""

    cost: Decimal
    source: str


def cost_of(price: Price, usage: Usage) -> Decimal:
    """Cost in USD of ``usage`` at ``price`` (USD per 1M tokens)."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cached_price = price.cached_input if price.cached_input is not None else price.input
    total = (
        (usage.prompt_tokens - cached) * price.input
        + cached * cached_price
        + usage.completion_tokens * price.output
    )
    return total / MILLION


class Pricer:
    """Prices usage for a target (the sources in the module docstring).

    Args:
        overrides: ``usage.prices`` from the recipe: route or model name → :class:`Price`.
        use_genai_prices: fall back to the bundled ``genai-prices`` table.

    Example:
        >>> Pricer().quote(target_price=Price(Decimal("0.15"), Decimal("0.6")), route="a/m",
        ...                model="m", usage=Usage(prompt_tokens=10, completion_tokens=5))
        PriceQuote(cost=Decimal('0.0000045'), source='recipe')
    """

    def __init__(self, overrides: Mapping[str, Price] | None = None, *, use_genai_prices: bool = True) -> None:
        self.overrides = dict(overrides or {})
        self.use_genai_prices = use_genai_prices
        self._lookups: dict[tuple[str, str | None], Any] = {}

    def quote(
        self,
        *,
        target_price: Price | None,
        route: str,
        model: str,
        usage: Usage | None,
        response_model: str | None = None,
        provider: str | None = None,
    ) -> PriceQuote:
        """The cost of ``usage`` on this target, and which source priced it."""
        if usage is None or (usage.prompt_tokens == 0 and usage.completion_tokens == 0):
            source = "recipe" if target_price is not None else ("override" if self._override(route, model) else "unpriced")
            return PriceQuote(Decimal(0), source)
        if target_price is not None:
            return PriceQuote(cost_of(target_price, usage), "recipe")
        override = self._override(route, model)
        if override is not None:
            return PriceQuote(cost_of(override, usage), "override")
        if self.use_genai_prices:
            for name in dict.fromkeys(n for n in (model, response_model) if n):
                cost = self._genai_price(name, provider, usage)
                if cost is not None:
                    return PriceQuote(cost, "genai-prices")
        return PriceQuote(Decimal(0), "unpriced")

    def _override(self, route: str, model: str) -> Price | None:
        return self.overrides.get(route) or self.overrides.get(model)

    def _genai_price(self, model: str, provider: str | None, usage: Usage) -> Decimal | None:
        key = (model, provider)
        found = self._lookups.get(key, _MISSING)
        if found is _MISSING:
            if len(self._lookups) >= 10_000:  # response models come from upstreams: bound the cache
                self._lookups.clear()
            found = self._lookups[key] = _lookup(model, provider)
        if found is None:
            return None
        gp_provider, gp_model = found
        from genai_prices import Usage as GPUsage

        gp_usage = GPUsage(
            input_tokens=usage.prompt_tokens,
            cache_read_tokens=min(usage.cached_tokens, usage.prompt_tokens) or None,
            output_tokens=usage.completion_tokens,
        )
        try:
            return Decimal(gp_model.calc_price(gp_usage, gp_provider).total_price)
        except Exception:  # noqa: BLE001 - an odd price entry must not break metering
            return None


def _lookup(model: str, provider: str | None) -> tuple[Any, Any] | None:
    try:
        from genai_prices import data_snapshot
    except ImportError:  # pragma: no cover - genai-prices is a dependency
        return None
    snapshot = data_snapshot.get_snapshot()
    for provider_id in ([provider, None] if provider else [None]):
        try:
            return snapshot.find_provider_model(model, None, provider_id, None)  # type: ignore[no-any-return]
        except (LookupError, ValueError):
            continue
    return None


def ceil_pico(usd: Decimal) -> int:
    """USD → pico-USD rounded up (reservations round to the safe side)."""
    return int((usd * PICO).to_integral_value(rounding=ROUND_CEILING)) if usd else 0


# ------------------------------------------------------------------ charges


@dataclass(frozen=True, slots=True)
class Charge:
    """What one attempt is billed: the usage (reported, clamped or estimated), its cost
    in USD, the same in pico-USD as the ledger stores it, and the price source."""

    attempt: Attempt
    target: Target | None
    usage: Usage
    cost: Decimal
    pico: int
    source: str


class Seen:
    """What reached the client (the usage layer watches): content pieces and bytes of a
    stream, or a non-stream body."""

    __slots__ = ("body", "pieces", "stream_bytes")

    def __init__(self) -> None:
        self.pieces = 0
        self.stream_bytes = 0
        self.body = b""

    def answer_size(self) -> int:
        """An upper bound of the generated text's bytes in what was sent (for streams,
        the SSE bytes themselves)."""
        if self.body:
            try:
                obj = json.loads(self.body)
            except ValueError:
                return len(self.body)
            return answer_bytes(obj) if isinstance(obj, dict) else len(self.body)
        return self.stream_bytes




class Accountant:
    """Prices targets and charges attempts, for the router, the quota layer and the ledger.

    Args:
        pricer: the price sources (default: recipe prices, then genai-prices).
        router: finds an attempt's target when the plan does not hold it.
        prompt_estimator: prompt tokens of an answer that came without usage.
        default_max_tokens: completion tokens estimated for a request that sets no cap.

    Example:
        >>> acct = Accountant(Pricer({"node:box/llama3": Price(Decimal(1), Decimal(2))}))
        >>> acct.reservation([target], prompt=100, completion=50)  # pico-USD
    """

    def __init__(self, pricer: Pricer | None = None, *, router: ModelTable | None = None,
                 prompt_estimator: PromptEstimator = estimate_prompt_chars, default_max_tokens: int = 4096) -> None:
        self.pricer = pricer or Pricer()
        self.router = router
        self.prompt_estimator = prompt_estimator
        self.default_max_tokens = default_max_tokens
        self._unpriced_warned: set[str] = set()
        self._units: dict[tuple[Any, ...], tuple[Decimal, Decimal] | None] = {}

    # ---- one target

    def quote(self, target: Target | None, usage: Usage | None, *, route: str, model: str, provider: str | None,
              response_model: str | None = None) -> PriceQuote:
        """The cost of ``usage`` on ``target`` (or on the route, when the target is unknown):
        the target's own price (recipe, or a node owner's), else the sources after it.

        A price that cannot be applied (``Infinity`` × 0 tokens is an InvalidOperation)
        quotes a NaN cost with source ``invalid``: the ledger keeps the row, its cost set to
        0 and flagged ``cost_invalid`` by :func:`~asgi_llm.usage.records.bounded` — the row
        itself is never lost."""
        try:
            return self.pricer.quote(target_price=target.price if target is not None else None, route=route,
                                     model=model, usage=usage, response_model=response_model, provider=provider)
        except (ArithmeticError, ValueError, TypeError) as exc:
            logger.warning("usage: could not price route %s (%s); the row is kept, its cost flagged invalid",
                        route, type(exc).__name__)
            return PriceQuote(Decimal("NaN"), "invalid")

    def target_cost(self, target: Target, prompt: int, completion: int) -> PriceQuote:
        """The cost of ``prompt`` + ``completion`` tokens on ``target``."""
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        return self.quote(target, usage, route=target.route, model=target.model, provider=target.provider)

    def estimate_cost(self, target: Target, prompt: int, completion: int) -> Decimal | None:
        """What ``cheapest`` and ``/admin/explain`` show: ``prompt`` + ``completion`` tokens
        at :meth:`unit_price`, or None when the target is unpriced."""
        unit = self.unit_price(target)
        if unit is None:
            return None
        return (max(prompt, 1) * unit[0] + completion * unit[1]) / MILLION

    def unit_price(self, target: Target) -> tuple[Decimal, Decimal] | None:
        """USD per 1M prompt and per 1M completion tokens on ``target`` (what
        ``provider.max_price`` compares and reservations use), or None when unpriced.

        Computed once per target. The prompt price is the dearer of uncached and cached
        input; a genai-prices entry is read at 1M tokens, its top tier (the output price
        next to 1M prompt tokens, for tiers keyed on the prompt's size), so that tokens
        at these prices never cost less than the ledger bills for them.
        """
        key = (target.route, target.model, target.provider, target.price)
        found = self._units.get(key, _MISSING)
        if found is _MISSING:
            if len(self._units) >= 10_000:  # node targets come and go: bound the cache
                self._units.clear()
            found = self._units[key] = self._unit_price(target)
        return found  # type: ignore[return-value]

    def _unit_price(self, target: Target) -> tuple[Decimal, Decimal] | None:
        prompt = self.target_cost(target, 1_000_000, 0)
        if prompt.source == "unpriced":
            return None
        cached = self.quote(target, Usage(prompt_tokens=1_000_000, cached_tokens=1_000_000, total_tokens=1_000_000),
                            route=target.route, model=target.model, provider=target.provider)
        both = self.target_cost(target, 1_000_000, 1_000_000).cost
        return max(prompt.cost, cached.cost), max(both - prompt.cost, self.target_cost(target, 0, 1_000_000).cost)

    # ---- admission

    def reservation(self, targets: Iterable[Target], prompt: int, completion: int) -> tuple[int, list[str]]:
        """Pico-USD to reserve: the most ``prompt`` + ``completion`` tokens may cost on any
        of ``targets`` at :meth:`unit_price` (rounded up, at most :data:`MAX_CHARGE_PICO`),
        and the routes that have no price.

        An unpriced target is charged 0 by the ledger and by settlement alike, so it
        adds nothing to the worst case; it is reported (and logged once) instead, since
        spend budgets cannot limit it.
        """
        worst, unpriced = Decimal(0), []
        for t in targets:
            unit = self.unit_price(t)
            if unit is None:
                unpriced.append(t.route)
                if t.route not in self._unpriced_warned and len(self._unpriced_warned) < 1000:
                    self._unpriced_warned.add(t.route)
                    logger.warning("accounting: route %s has no price (recipe, usage.prices or genai-prices); "
                                   "spend budgets do not limit its traffic", t.route)
            else:
                worst = max(worst, prompt * unit[0] + completion * unit[1])
        return min(ceil_pico(worst / MILLION), MAX_CHARGE_PICO), unpriced

    # ---- settlement and the ledger

    def find_target(self, ctx: RequestContext, route: str) -> Target | None:
        """The target an attempt on ``route`` went to: the plan's (node targets carry
        their owner's price there), else the model's recipe target."""
        for t in (ctx.target, *ctx.plan):
            if t is not None and t.route == route:
                return t
        if self.router is not None and ctx.model:
            model = self.router.get(ctx.model)
            if model is not None:
                for t in model.targets:
                    if t.route == route:
                        return t  # type: ignore[return-value]
        return None

    def charges(self, ctx: RequestContext, seen: Seen | None = None) -> list[Charge]:
        """One :class:`Charge` per attempt, computed once per request: the ledger (which
        knows what reached the client, ``seen``) computes them first, the quota layer's
        settlement reuses them, so both bill the same amounts."""
        cached = ctx.charges
        if cached is not None and len(cached) == len(ctx.attempt_log):
            return cached
        out: list[Charge] = []
        log = ctx.attempt_log
        for a in log:
            usage = self.attempt_usage(ctx, a, is_last=a is log[-1], seen=seen)
            target = self.find_target(ctx, a.route)
            q = self.quote(target, usage, route=a.route, model=a.model, provider=a.provider, response_model=a.response_model)
            # A cost that is not a finite number (a price that could not be applied) bills
            # nothing here; the ledger keeps the row with cost 0, flagged cost_invalid.
            out.append(Charge(a, target, usage, q.cost, to_pico(q.cost) if q.cost.is_finite() else 0, q.source))
        ctx.charges = out
        return out

    def attempt_usage(self, ctx: RequestContext, a: Attempt, *, is_last: bool, seen: Seen | None) -> Usage:
        """The attempt's usage: reported (already plausibility-checked where it was
        recorded), or estimated when the upstream answered without reporting any."""
        if a.usage is not None:
            return a.usage
        pieces = seen.pieces if seen is not None else (a.content_chunks if ctx.stream else 0)
        answered = a.response_model is not None or a.content_chunks > 0 or (is_last and pieces > 0)
        if not answered:
            return Usage()
        if is_last and ctx.stream:
            completion = pieces
        elif is_last and seen is not None:
            completion = self._estimate_body(seen)
        else:
            completion = 0
        prompt = self.prompt_estimator(ctx)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion, estimated=True)

    def replayed_usage(self, ctx: RequestContext, usage: Usage | None, route: str, seen: Seen) -> Usage | None:
        """A cache hit's usage (what the stored answer reported when it was captured),
        plausibility-checked against this request and the replayed answer, as a live
        attempt's is: an entry from a lying upstream must not inflate ``saved_usd``."""
        if usage is None:
            return None
        return plausible_usage(usage, ctx, answer_size=seen.answer_size(), hidden_ok=not route.startswith("node:"))

    def _estimate_body(self, seen: Seen) -> int:
        """Completion tokens of a non-streamed answer that came without usage."""
        if not seen.body:
            return 0
        try:
            obj = json.loads(seen.body)
            texts = []
            for c in obj.get("choices") or []:
                msg = c.get("message") or {}
                texts.append(c.get("text") or msg.get("content") or "")
                for tc in msg.get("tool_calls") or []:
                    texts.append((tc.get("function") or {}).get("arguments") or "")
            text = " ".join(t for t in texts if isinstance(t, str))
        except (ValueError, AttributeError, TypeError):
            return 0
        if self.prompt_estimator is ESTIMATORS["words"]:
            return len(text.split())
        return -(-_utf8_len(text) // 4)


def clamp_charge(pico: int) -> int:
    """A settled amount the state store can hold exactly (see :data:`MAX_CHARGE_PICO`)."""
    return min(max(pico, 0), MAX_CHARGE_PICO)


def total_pico(charges: Sequence[Charge]) -> int:
    """The request's cost in pico-USD: the sum of its ledger rows'."""
    return sum(c.pico for c in charges)

