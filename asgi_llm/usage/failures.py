"""What a batch writer does with a failed batch: tell an outage from a data error, and
describe a refused row for the quarantine.

* :func:`failure_kind` — ``outage`` (keep the batch, retry), ``data`` (bisect, quarantine
  the refused rows) or ``unknown``.
* :class:`QuarantineEntry` — one refused row, bounded so that storing it cannot fail in turn.
* :func:`error_text` — one line naming an error and its cause, never the SQL or its parameters.

No SQLAlchemy or driver import here: errors are recognised by their class names.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from asgi_llm._bounds import bounded_text, clean_text

__all__ = ["PAYLOAD_MAX", "QuarantineEntry", "error_text", "failure_kind"]

PAYLOAD_MAX = 1_000_000
"""The longest quarantined payload kept (characters); a longer one is cut and ends with ``…``."""
_ERROR_MAX = 4000


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@dataclass(slots=True)
class QuarantineEntry:
    """One refused row: which writer, whose org, the row as JSON, and why (naive UTC ``ts``)."""

    writer: str
    org: str | None
    payload: str
    error: str
    ts: dt.datetime = field(default_factory=_utcnow)

    def bounded(self) -> QuarantineEntry:
        """Every value storable (the entry must not be refused in turn); in place."""
        self.writer = bounded_text(self.writer, 32, nullable=False)[0] or "?"
        self.org = bounded_text(self.org, 200)[0] if isinstance(self.org, str) else None
        self.payload = bounded_text(self.payload, PAYLOAD_MAX, nullable=False)[0] or ""
        self.error = bounded_text(self.error, _ERROR_MAX, nullable=False)[0] or ""
        return self

    def to_api(self, entry_id: int | None = None) -> dict[str, Any]:
        """JSON-ready, with its table ``id`` when it has one."""
        return {"id": entry_id, "ts": self.ts.isoformat(timespec="microseconds"), "writer": self.writer,
                "org": self.org, "error": self.error, "payload": self.payload}


# What a failed batch says about itself. Names, not classes: SQLAlchemy and the drivers
# are not imported here (the sinks map their errors to StoreError with the cause chained).
_DATA_NAMES = frozenset({"DataError", "IntegrityError"})
_OUTAGE_NAMES = frozenset({"OperationalError", "InterfaceError", "DisconnectionError", "ProgrammingError",
                           "InternalError", "TimeoutError", "ConnectionError", "RedisError"})
_DATA_TYPES = (ValueError, TypeError, ArithmeticError)  # UnicodeError, OverflowError, decimal errors


def failure_kind(exc: BaseException) -> Literal["data", "outage", "unknown"]:
    """Why a batch failed: ``data`` (the store refused these values: bisect and
    quarantine), ``outage`` (the store is unreachable or locked: keep and retry), or
    ``unknown``.

    The exception and its causes are read from the outside in; the first one that says
    which decides. A :class:`~asgi_llm.stores.StoreError` with no cause is an outage.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        names = {t.__name__ for t in type(e).__mro__}
        if names & _DATA_NAMES:
            return "data"
        if isinstance(e, OSError) or names & _OUTAGE_NAMES:
            return "outage"
        if isinstance(e, _DATA_TYPES):
            return "data"
        for nxt in (getattr(e, "orig", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    if "StoreError" in {t.__name__ for t in type(exc).__mro__}:
        return "outage"
    return "unknown"


def error_text(exc: BaseException) -> str:
    """One line naming the error and its cause (never the SQL or its parameters)."""
    first = (str(exc).strip().splitlines() or [""])[0][:1000]
    text = f"{type(exc).__name__}: {first}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        text += f" (from {type(cause).__module__}.{type(cause).__name__})"
    return clean_text(text)
