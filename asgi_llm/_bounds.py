"""Bounded, storable forms of values bound for a SQL column (ledger rows, audit events).

Whatever a row carries (a client's model name, a node's usage report, an upstream's
``model`` field, a price an org admin typed) must fit its column in SQLite *and*
PostgreSQL before it is queued, or one row refuses to insert and takes its batch with
it. These helpers say whether a value had to be changed, so the caller can flag the row:

* :func:`bounded_text` — text cut to the column length with a visible ``…`` marker; NUL
  (PostgreSQL refuses it) and lone surrogates (neither driver can encode them) become
  U+FFFD.
* :func:`bounded_int` — an integer within ``[lo, hi]`` (booleans, floats, strings and
  absurd values are not integers a column can take).
* :func:`finite_float` — a finite float within ``[lo, hi]`` (NaN breaks SQLite's NOT NULL,
  infinities are nonsense latencies).

Each returns ``(value, changed)``; the fast path (a value that already fits) allocates
nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["MARK", "bound_text_fields", "bounded_int", "bounded_text", "clean_text", "finite_float"]

MARK = "…"
"""Ends a value that was cut to fit its column."""

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean_text(value: str) -> str:
    """``value`` with NUL and lone surrogates replaced by U+FFFD (same length)."""
    if value.isascii():
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    return _UNSTORABLE.sub("\ufffd", value)


def bounded_text(value: Any, limit: int, *, nullable: bool = True) -> tuple[str | None, bool]:
    """``value`` as text of at most ``limit`` characters, storable by SQLite and PostgreSQL.

    ``None`` stays ``None`` when ``nullable`` (else becomes ``""``); a non-string becomes
    its ``str()``. A value longer than ``limit`` keeps its first ``limit - 1`` characters
    and ends with :data:`MARK`.
    """
    if value is None:
        return (None, False) if nullable else ("", True)
    changed = False
    if type(value) is not str:
        try:
            value = str(value)
        except Exception:  # noqa: BLE001 - a hostile __str__ must not take the writer down
            value = f"<unprintable {type(value).__name__}>"
        changed = True
    cleaned = clean_text(value)
    if cleaned is not value:
        value, changed = cleaned, True
    if len(value) > limit:
        value, changed = value[: max(limit - 1, 0)] + MARK[:limit], True
    return value, changed


def bound_text_fields(obj: Any, values: Iterable[Any], limits: Sequence[tuple[str, int, bool]]) -> list[str]:
    """Bound ``obj``'s text fields in place: ``values`` are the current values of the
    fields named in ``limits`` (``(name, column length, nullable)``), in that order.
    Returns the names of the fields it changed.

    Plain ASCII that already fits (nearly every value) is checked without a copy; anything
    else goes through :func:`bounded_text`.
    """
    changed_names: list[str] = []
    for v, (name, limit, nullable) in zip(values, limits, strict=True):
        if v is None:
            if nullable:
                continue
        elif type(v) is str and len(v) <= limit and v.isascii() and "\x00" not in v:
            continue
        nv, changed = bounded_text(v, limit, nullable=nullable)
        if changed:
            setattr(obj, name, nv)
            changed_names.append(name)
    return changed_names


def bounded_int(value: Any, lo: int, hi: int, *, default: int = 0) -> tuple[int, bool]:
    """``value`` as an int within ``[lo, hi]``: clamped when out of range, ``default``
    when it is not a number (or not a finite one)."""
    if type(value) is int:
        if lo <= value <= hi:
            return value, False
        return (lo if value < lo else hi), True
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return default, True
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        return default, True
    return min(max(n, lo), hi), True


def finite_float(value: Any, lo: float, hi: float, *, default: float | None = 0.0) -> tuple[float | None, bool]:
    """``value`` as a finite float within ``[lo, hi]`` (``default`` when it is not one)."""
    if type(value) is float or type(value) is int:
        if lo <= value <= hi:  # NaN fails both comparisons
            return float(value), False
        if value != value:  # NaN
            return default, True
        return float(min(max(value, lo), hi)), True
    return default, True
