"""One ledger row per attempt (and one per cache hit).

Money is kept as an integer number of **pico-dollars** (1e-12 USD) in the database, so
sums are exact in SQLite and PostgreSQL alike (SQLite has no decimal type); in Python it
is a :class:`~decimal.Decimal` of USD. A price with at most six decimals per 1M tokens is
exact at this unit; finer prices are rounded half-even per row.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field, fields
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from asgi_llm._ids import new_id

__all__ = ["PICO", "LedgerRow", "from_pico", "to_pico", "usd_text"]

PICO = Decimal(10) ** 12


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
    ``price_source``: ``recipe`` | ``override`` | ``genai-prices`` | ``unpriced``.
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
