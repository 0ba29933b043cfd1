"""Query-parameter helpers shared by the usage and audit admin endpoints."""

from __future__ import annotations

import datetime as dt
import re

from starlette.requests import Request

from asgi_llm.context import get_context
from asgi_llm.errors import InvalidRequestError, PermissionDeniedError

__all__ = ["GLOBAL_ORG", "org_scope", "parse_time", "wants_csv"]

GLOBAL_ORG = "*"
_REL = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(value: str | None, name: str) -> dt.datetime | None:
    """ISO date/datetime (UTC unless it says otherwise), or a look-back like ``24h`` / ``7d``.

    Anything outside the calendar (``740000d``, a 5000-digit look-back, year 1 at
    ``+14:00``) is the same 400 as a malformed value.
    """
    if not value:
        return None
    problem = f"'{name}' must be an ISO date/datetime or a look-back like 24h, 7d"
    m = _REL.match(value.strip())
    try:
        if m:
            return dt.datetime.now(dt.UTC) - dt.timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
        t = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        t = t if t.tzinfo else t.replace(tzinfo=dt.UTC)
        t.astimezone(dt.UTC)  # an instant that exists in UTC too (stores compare in UTC)
    except (ValueError, OverflowError):
        raise InvalidRequestError(f"{problem}, within the years 1 to 9999.", param=name,
                                  code="invalid_value") from None
    return t


def org_scope(request: Request) -> str | None:
    """The org filter: an org-scoped admin key sees only its own org."""
    ctx = get_context(request.scope)
    assert ctx is not None
    own = ctx.principal.org
    asked = request.query_params.get("org") or None
    if own == GLOBAL_ORG:
        return asked
    if asked is not None and asked != own:
        raise PermissionDeniedError(f"This admin key may only read org '{own}'.")
    return own


def wants_csv(request: Request) -> bool:
    fmt = request.query_params.get("format", "").lower()
    if fmt:
        if fmt not in ("csv", "json"):
            raise InvalidRequestError("'format' must be json or csv.", param="format", code="invalid_value")
        return fmt == "csv"
    return "text/csv" in request.headers.get("accept", "")
