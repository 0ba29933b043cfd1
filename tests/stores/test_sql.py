"""The SQL store base, on SQLite and on real PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from asgi_llm.stores import StoreError
from asgi_llm.stores.sql import SQLDatabase

pytestmark = pytest.mark.anyio


class TestSQLDatabase:
    async def test_migrates_and_pings(self, anyio_backend: str, sql_url: str) -> None:
        """start() migrates to head (alembic_version recorded); ping says ready; migrating twice is a no-op."""
        db = SQLDatabase(sql_url)
        try:
            await db.start()
            await db.start()
            assert await db.ping() is None
            version = await db.run(lambda c: c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar(), "read")
            assert version is not None
        finally:
            await db.aclose()

    async def test_errors_are_mapped(self, anyio_backend: str, sql_url: str) -> None:
        """A failing statement raises StoreError naming the operation, with the driver error chained."""
        db = SQLDatabase(sql_url)
        try:
            await db.start()
            with pytest.raises(StoreError, match="bad query") as exc:
                await db.run(lambda c: c.execute(sa.text("SELECT * FROM no_such_table")), "bad query")
            assert exc.value.__cause__ is not None
        finally:
            await db.aclose()

    async def test_unreachable_database_is_store_error(self, anyio_backend: str) -> None:
        """An unreachable PostgreSQL gives StoreError on start and a reason from ping, never a driver exception."""
        from asgi_llm.testing.processes import free_port

        db = SQLDatabase(f"postgresql://postgres@127.0.0.1:{free_port()}/nope")
        try:
            with pytest.raises(StoreError):
                await db.start()
            assert "unreachable" in (await db.ping() or "")
        finally:
            await db.aclose()
