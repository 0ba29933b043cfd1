"""structlog setup and per-request binding.

The gateway binds ``request_id``, ``endpoint``, ``model`` (and, once known, ``org`` and
``key_id``) into structlog's context-local context and restores the previous values
afterwards — it never calls ``clear_contextvars()``, so a host app's own bound context
survives.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar, Token
from typing import Any

__all__ = ["LogBinding", "configure_logging", "prepare"]


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


class LogBinding:
    """Binds a fixed set of keys per request, as ``bind_contextvars`` / ``reset_contextvars`` do.

    The ContextVars are structlog's own (``merge_contextvars`` and a host app's
    ``bind_contextvars`` see the same ones), looked up once here: structlog's helpers
    format each key's name and build keyword dicts on every call, twice per request.

    Example:
        >>> binding = LogBinding("org", "key_id")
        >>> tokens = binding.bind(ctx.principal.org, ctx.principal.key_id)
        >>> binding.unbind(tokens)  # restores what was bound before
    """

    __slots__ = ("_vars",)

    def __init__(self, *keys: str) -> None:
        from structlog.contextvars import bind_contextvars, reset_contextvars

        tokens = bind_contextvars(**dict.fromkeys(keys))
        reset_contextvars(**tokens)
        self._vars: tuple[ContextVar[Any], ...] = tuple(tokens[k].var for k in keys)

    def bind(self, *values: Any) -> list[Token[Any]]:
        """Bind one value per key, in order (``None``: left as it is); returns tokens for :meth:`unbind`."""
        return [var.set(v) for var, v in zip(self._vars, values, strict=True) if v is not None]

    def unbind(self, tokens: list[Token[Any]]) -> None:
        """Restore what was bound before :meth:`bind`."""
        for token in tokens:
            token.var.reset(token)
