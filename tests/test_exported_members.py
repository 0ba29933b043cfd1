"""The public API: a curated, sorted __all__ whose names all exist."""

from __future__ import annotations

import asgi_llm


class TestExports:
    def test_all_sorted_and_present(self) -> None:
        """__all__ is sorted, unique, and every name is importable from the package."""
        names = asgi_llm.__all__
        assert names == sorted(names)
        assert len(set(names)) == len(names)
        for name in names:
            assert hasattr(asgi_llm, name), name

    def test_import_needs_no_optional_driver(self) -> None:
        """Importing asgi_llm pulls in no store driver (redis, SQL) and no test tooling."""
        import subprocess
        import sys

        code = "import sys, asgi_llm; bad = [m for m in ('redis', 'sqlalchemy', 'psycopg', 'openai', 'pytest') if m in sys.modules]; print(bad)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        assert out == "[]"
