"""One ledger row per attempt (and one per cache hit).

Money is kept as an integer number of **pico-dollars** (1e-12 USD) in the database, so
sums are exact in SQLite and PostgreSQL alike (SQLite has no decimal type); in Python it
is a :class:`~decimal.Decimal` of USD. A price with at most six decimals per 1M tokens is
exact at this unit; finer prices are rounded half-even per row.

Every row is :func:`bounded` before it is queued (the ledger writer's ``normalise``
step): text fits its column, token counts, costs and times are numbers the database
takes, and ``flags`` says what had to change. One absurd value (a node reporting
``2**70`` prompt tokens, a 300-character model name, a price of ``NaN``) then costs one
flagged row, not the ledger.
"""

from __future__ import annotations

import datetime as dt
import json
import operator
from dataclasses import dataclass, field, fields
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from asgi_llm._bounds import bound_text_fields, bounded_int, finite_float
from asgi_llm._ids import new_id

__all__ = ["MAX_COST_USD", "MAX_TOKENS", "PICO", "LedgerRow", "bounded", "from_pico", "to_pico", "usd_text"]

PICO = Decimal(10) ** 12

MAX_TOKENS = 2**32
"""The most tokens one attempt may record per count (~4.3e9: hundreds of times any context
window). Larger reports are clamped and the row flagged; the cap also keeps SQLite's
integer ``SUM`` in reports from overflowing short of ~2e9 such rows."""

MAX_COST_USD = Decimal(1_000_000)
"""The most one row may cost or save (1e18 pico-dollars: fits BIGINT with room)."""

_INT32 = 2**31 - 1
_MAX_MS = 1e12  # ~31 years


def to_pico(usd: Decimal) -> int:
    """USD → integer pico-dollars (half-even)."""
    if not usd:  # most rows' saved_usd, and every unpriced row
        return 0
    return int((usd * PICO).to_integral_value(rounding=ROUND_HALF_EVEN))


def from_pico(pico: int | Decimal | None) -> Decimal:
    """Integer pico-dollars → USD."""
    return (Decimal(pico or 0) / PICO).normalize() if pico else Decimal(0)


def usd_text(usd: Decimal) -> str:
    """A USD amount as plain decimal text (never ``9.7E-7``)."""
    return format(usd.normalize(), "f") if usd else "0"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(slots=True)
class LedgerRow:
    """What one attempt used and cost. ``attempt_id`` makes inserts idempotent.

    ``outcome``: ``ok`` | ``error`` | ``aborted`` (client gone / cancelled) | ``cache_hit``.
    ``estimated``: some token count was estimated (the upstream reported no usage).
    ``price_source``: ``recipe`` | ``override`` | ``genai-prices`` | ``unpriced`` |
    ``invalid`` (the price could not be applied; the row is flagged ``cost_invalid``).
    ``flags``: what :func:`bounded` had to change, comma-separated (``None``: nothing):
    ``truncated`` (text cut to its column or unstorable characters replaced),
    ``tokens_clamped`` (a token count out of ``[0, MAX_TOKENS]`` or not an integer; the
    row is also ``estimated``), ``cost_invalid`` (a cost that was not a finite number in
    ``[0, MAX_COST_USD]``: NaN or negative → 0, above the cap or +Infinity → the cap),
    ``value_fixed`` (another number or time the column could not take).
    """

    request_id: str
    org: str
    key_id: str
    model: str
    route: str
    provider: str
    upstream_model: str
    attempt: int = 1
    attempt_id: str = field(default_factory=new_id)
    ts: dt.datetime = field(default_factory=_utcnow)
    endpoint: str = "chat"
    stream: bool = False
    node: str | None = None
    response_model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    cost_usd: Decimal = Decimal(0)
    saved_usd: Decimal = Decimal(0)
    price_source: str = "unpriced"
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    status: int = 0
    outcome: str = "ok"
    error_code: str | None = None
    cache_status: str = "BYPASS"
    prompt_hash: str | None = None
    prompt_text: str | None = None
    flags: str | None = None

    @property
    def day(self) -> str:
        """The UTC day of ``ts``, ``YYYY-MM-DD`` (the ledger's ``day`` column)."""
        return self.ts.astimezone(dt.UTC).date().isoformat()

    def to_db(self) -> dict[str, Any]:
        """The row as the ledger table's columns."""
        d = {name: getattr(self, name) for name in _FIELDS}  # not asdict(): it deep-copies (~200 µs/row)
        d["ts"] = self.ts.astimezone(dt.UTC).replace(tzinfo=None)
        d["day"] = self.day
        d["cost_pico"] = to_pico(d.pop("cost_usd"))
        d["saved_pico"] = to_pico(d.pop("saved_usd"))
        return d

    def to_json(self) -> str:
        """One line for the spill file."""
        d = {name: getattr(self, name) for name in _FIELDS}
        d["ts"] = self.ts.isoformat()
        d["cost_usd"] = str(self.cost_usd)
        d["saved_usd"] = str(self.saved_usd)
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> LedgerRow:
        d = json.loads(line)
        d = {k: v for k, v in d.items() if k in _FIELDS}
        d["ts"] = dt.datetime.fromisoformat(d["ts"])
        d["cost_usd"] = Decimal(d["cost_usd"])
        d["saved_usd"] = Decimal(d["saved_usd"])
        return cls(**d)


_FIELDS = tuple(f.name for f in fields(LedgerRow))

# (field, column length, nullable): the usage_ledger columns (tests pin them to the table).
TEXT_LIMITS: tuple[tuple[str, int, bool], ...] = (
    ("attempt_id", 64, False), ("request_id", 128, False), ("org", 200, False), ("key_id", 200, False),
    ("model", 200, False), ("route", 400, False), ("provider", 200, False), ("node", 200, True),
    ("upstream_model", 200, False), ("response_model", 200, True), ("endpoint", 32, False),
    ("price_source", 32, False), ("outcome", 16, False), ("error_code", 100, True), ("cache_status", 16, False),
    ("prompt_hash", 64, True), ("prompt_text", 16_000, True), ("flags", 64, True),
)
_TOKENS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
_text_values = operator.attrgetter(*(name for name, _, _ in TEXT_LIMITS))
_token_values = operator.attrgetter(*_TOKENS)
_FLAG_ORDER = ("truncated", "tokens_clamped", "cost_invalid", "value_fixed")


def _bounded_cost(value: Any) -> tuple[Decimal, bool]:
    """``(cost, invalid)``: ``value`` as a Decimal in ``[0, MAX_COST_USD]``."""
    if isinstance(value, Decimal):
        d = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        d = Decimal(str(value))
    else:
        return Decimal(0), True
    if d.is_nan() or d < 0:
        return Decimal(0), True
    if d > MAX_COST_USD:  # +Infinity included: the most a row may cost, never nothing
        return MAX_COST_USD, True
    return d, False


def bounded(row: LedgerRow) -> LedgerRow:
    """Make ``row`` storable as it is (in place; returned for chaining), flagging changes.

    The ledger writer calls this on every row it queues (``put``) and replays, so no
    value can make the database refuse the row: text fits its column (cut with a
    trailing ``…``; NUL and lone surrogates replaced), token counts are integers in
    ``[0, MAX_TOKENS]``, costs finite in ``[0, MAX_COST_USD]``, ``attempt``/``status``
    fit a 32-bit column, latencies are finite. A row is never dropped for its values.
    """
    flags: set[str] = set()
    if any(name != "flags" for name in bound_text_fields(row, _text_values(row), TEXT_LIMITS)):
        flags.add("truncated")
    p, c, k, r = tokens = _token_values(row)
    if not (type(p) is int and type(c) is int and type(k) is int and type(r) is int  # noqa: E721 - bool is not a count
            and 0 <= p <= MAX_TOKENS and 0 <= c <= MAX_TOKENS and 0 <= k <= MAX_TOKENS and 0 <= r <= MAX_TOKENS):
        for v, name in zip(tokens, _TOKENS, strict=True):
            n, changed = bounded_int(v, 0, MAX_TOKENS)
            if changed:
                setattr(row, name, n)
                flags.add("tokens_clamped")
                row.estimated = True
    for name in ("cost_usd", "saved_usd"):
        v = getattr(row, name)
        if type(v) is Decimal and v.is_finite() and not v.is_signed() and v <= MAX_COST_USD:
            continue
        cost, invalid = _bounded_cost(v)
        setattr(row, name, cost)
        if invalid:
            flags.add("cost_invalid")
    for name in ("attempt", "status"):
        v = getattr(row, name)
        if type(v) is int and -_INT32 <= v <= _INT32:
            continue
        n, changed = bounded_int(v, -_INT32 - 1, _INT32)
        if changed:
            setattr(row, name, n)
            flags.add("value_fixed")
    latency = row.latency_ms
    if not (type(latency) is float and 0.0 <= latency <= _MAX_MS):
        fixed, changed = finite_float(latency, 0.0, _MAX_MS)
        if changed:
            row.latency_ms = fixed or 0.0
            flags.add("value_fixed")
    ttft = row.ttft_ms
    if ttft is not None and not (type(ttft) is float and 0.0 <= ttft <= _MAX_MS):
        fixed, changed = finite_float(ttft, 0.0, _MAX_MS, default=None)
        if changed:
            row.ttft_ms = fixed
            flags.add("value_fixed")
    if type(row.stream) is not bool:
        row.stream = bool(row.stream)
    if type(row.estimated) is not bool:
        row.estimated = bool(row.estimated)
    if not isinstance(row.ts, dt.datetime):
        row.ts = _utcnow()
        flags.add("value_fixed")
    if flags:
        known = set((row.flags or "").split(",")) | flags
        row.flags = ",".join(f for f in _FLAG_ORDER if f in known)
    return row
