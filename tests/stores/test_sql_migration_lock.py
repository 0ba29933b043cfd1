"""Processes that migrate the same database at the same moment take turns.

Without the lock two of them both find no schema and one dies on "table alembic_version
already exists" (what `asgi-llm serve --workers 2` did on a fresh directory). Real
processes, released together, on SQLite and on real PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROCESSES = 3
ROUNDS = 2

_MIGRATE = """\
import os, sys, time
from asgi_llm.stores.sql import SQLDatabase
db = SQLDatabase(sys.argv[1])
go = sys.argv[2]
deadline = time.monotonic() + 30
while not os.path.exists(go):  # every process has imported everything; start together
    if time.monotonic() > deadline:
        sys.exit("never released")
    time.sleep(0.005)
db.upgrade()
db.dispose()
"""


def _fresh(url: str, tmp: Path, round_: int) -> str:
    """A database with no schema for this round."""
    if url.startswith("sqlite"):
        return f"sqlite:///{tmp / f'round-{round_}.db'}"
    import sqlalchemy as sa

    from asgi_llm.stores.sql import normalize_sql_url

    engine = sa.create_engine(normalize_sql_url(url))
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return url


def _tables(url: str) -> set[str]:
    import sqlalchemy as sa

    from asgi_llm.stores.sql import normalize_sql_url

    engine = sa.create_engine(normalize_sql_url(url))
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
            assert len(version) == 1, version  # one head recorded, not one per process
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


class TestConcurrentMigration:
    def test_processes_started_together_all_succeed(self, sql_url: str, tmp_path: Path) -> None:
        """3 processes upgrade a fresh database at once, 2 rounds: every one exits 0 and
        the schema is whole, with one alembic_version row."""
        for round_ in range(ROUNDS):
            url = _fresh(sql_url, tmp_path, round_)
            go = tmp_path / f"go-{round_}"
            procs = [subprocess.Popen([sys.executable, "-c", _MIGRATE, url, str(go)], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT) for _ in range(PROCESSES)]
            try:
                go.touch()  # the processes poll for it once imported: they start migrating together
                outputs = [p.communicate(timeout=90)[0].decode(errors="replace") for p in procs]
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait(5)
            failed = [(p.returncode, out) for p, out in zip(procs, outputs, strict=True) if p.returncode != 0]
            assert not failed, f"round {round_}: {len(failed)} of {PROCESSES} migrations failed: {failed[0][1][-2000:]}"
            tables = _tables(url)
            assert {"alembic_version"} < tables and len(tables) > 3, tables


@pytest.mark.anyio
async def test_upgrade_waits_for_a_held_lock_then_proceeds(tmp_path: Path, anyio_backend: str) -> None:
    """While another process holds the directory lock the upgrade waits; once it is
    released the upgrade runs (the wait is bounded by MIGRATION_LOCK_TIMEOUT_S)."""
    import fcntl
    import os

    from asgi_llm.stores import StoreError
    from asgi_llm.stores import sql as sqlmod

    db = sqlmod.SQLDatabase(f"sqlite:///{tmp_path / 'held.db'}")
    fd = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    old = sqlmod.MIGRATION_LOCK_TIMEOUT_S
    sqlmod.MIGRATION_LOCK_TIMEOUT_S = 0.3
    try:
        with pytest.raises(StoreError, match="another process held the migration lock"):
            db.upgrade()
        assert not (tmp_path / "held.db").exists()  # never connected while locked out
    finally:
        sqlmod.MIGRATION_LOCK_TIMEOUT_S = old
        os.close(fd)
    await db.start()
    assert (tmp_path / "held.db").exists()
    await db.aclose()
