"""structlog setup and per-request binding.

The gateway binds ``request_id``, ``endpoint``, ``model`` (and, once known, ``org`` and
``route``) with :func:`structlog.contextvars.bind_contextvars` and restores the previous
values afterwards with the returned tokens — it never calls ``clear_contextvars()``, so a
host app's own bound context survives.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["bind", "configure_logging", "prepare", "unbind"]


def prepare() -> None:
    """Import structlog now (when the gateway is built), not on the first request:
    importing it costs ~60 ms, which request one would otherwise pay."""
    import structlog.contextvars  # noqa: F401


def configure_logging(*, json: bool = True, level: int | str = logging.INFO) -> None:
    """Configure structlog to print one JSON object per line (merging bound contextvars)."""
    import structlog

    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            level if isinstance(level, int) else logging.getLevelNamesMapping()[level.upper()]
        ),
        cache_logger_on_first_use=True,
    )


def bind(**values: Any) -> Any:
    """Bind values to the current context; returns tokens for :func:`unbind`."""
    from structlog.contextvars import bind_contextvars

    return bind_contextvars(**{k: v for k, v in values.items() if v is not None})


def unbind(tokens: Any) -> None:
    """Restore what was bound before :func:`bind`."""
    from structlog.contextvars import reset_contextvars

    reset_contextvars(**tokens)
