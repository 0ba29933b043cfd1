"""Recipes shipped inside the package, so an installed ``asgi-llm`` has a default.

``standalone.yaml`` is a byte-for-byte copy of the repository's
``recipes/standalone.yaml`` (a test keeps the two equal): ``asgi-llm serve`` falls back
to it when the current directory has no ``recipes/standalone.yaml``, and
``asgi-llm init`` writes it out as a starter to edit.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["STANDALONE"]

STANDALONE = Path(__file__).with_name("standalone.yaml")
"""The packaged standalone recipe (one process, memory + SQLite stores)."""
