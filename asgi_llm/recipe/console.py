"""The recipe's ``console:`` section → the web console in front of the built gateway."""

from __future__ import annotations

import os

from asgi_llm.console import ConsoleApp, ConsoleResource
from asgi_llm.recipe.parts import BuildParts
from asgi_llm.stack import Gateway

__all__ = ["build_console"]


def build_console(parts: BuildParts, gateway: Gateway) -> None:
    """Mount the console in front of ``gateway.app`` as the recipe's ``console`` section says.

    The one call from :func:`~asgi_llm.recipe.build.build_gateway`, after ``compose()``.
    Needs the auth layer's key ring (``parts.services.keyring``); without one the console
    shows how to enable it.
    """
    cfg = parts.config.console
    if not cfg.enabled:
        return
    keys = parts.services.keyring
    writer = parts.services.audit_writer
    console = ConsoleApp(gateway.app, keys=keys, path=cfg.path, session_ttl_s=cfg.session_ttl_s,
                         audit=writer.put if writer is not None else None)
    if keys is not None:
        secret = cfg.session_secret or os.environ.get("ASGI_LLM_CONSOLE_SECRET") or None
        gateway.resources.append(ConsoleResource(console, secret=secret, keys=keys, ttl_s=cfg.session_ttl_s))
    gateway.app = console
    gateway.services.console = console
