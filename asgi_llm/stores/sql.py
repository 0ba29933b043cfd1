"""The SQL store: one SQLAlchemy Core engine per database, used from worker threads.

SQLite (stdlib ``sqlite3``) is the embedded default, PostgreSQL (psycopg 3) the shared
one; both go through the *sync* engine in ``anyio.to_thread`` so the same code runs
under asyncio and trio. Writes that matter for latency (ledger, audit) are batched off
the hot path by their owners; this module only gives them a connection and a schema.

The schema is managed with Alembic: :meth:`SQLDatabase.start` upgrades to ``head``,
so a new replica or a new version migrates on start. Processes that start together
(``asgi-llm serve --workers N``, replicas) take turns: the upgrade runs under a lock
(see :meth:`SQLDatabase.upgrade`), so the second finds the schema made. Revisions live in
``asgi_llm/stores/migrations/versions`` as a linear chain; each capability owns its
revision file.

Foreign exceptions are mapped at this seam: any ``sqlalchemy`` error leaves as
:class:`~asgi_llm.stores.StoreError` (``raise ... from exc``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from asgi_llm.stores import StoreError

if TYPE_CHECKING:
    from anyio.abc import TaskGroup
    from sqlalchemy.engine import Connection, Engine

__all__ = ["SQLDatabase", "normalize_sql_url"]

T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

MIGRATION_LOCK_TIMEOUT_S = 120.0
"""How long a start waits for another process's migration before it gives up."""

_PG_MIGRATION_LOCK = int.from_bytes(b"asgi-llm", "big")
"""The PostgreSQL advisory lock key that serializes migrations (fits a signed bigint)."""


def normalize_sql_url(url: str) -> str:
    """Map recipe URLs to SQLAlchemy ones: ``postgresql://`` uses psycopg 3."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url[len("postgres://"):]
    return url


@contextlib.contextmanager
def map_sql_errors(what: str) -> Iterator[None]:
    """Turn SQLAlchemy/driver errors into :class:`StoreError` naming the operation."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
        raise StoreError(f"SQL store failed during {what}: {detail}") from exc


class SQLDatabase:
    """A SQL database for the ledger, audit log, keys and nodes.

    Args:
        url: ``sqlite:///path.db`` (``sqlite://`` = in memory, one shared connection)
            or ``postgresql://user@host/db``.
        migrate: upgrade the schema to the newest revision on :meth:`start`.

    Example:
        >>> db = SQLDatabase("sqlite:///asgi-llm.db")
        >>> await db.start(task_group)
        >>> rows = await db.run(lambda conn: conn.execute(select(...)).all(), "usage report")
    """

    def __init__(self, url: str, *, migrate: bool = True, pool_size: int = 5) -> None:
        self.url = normalize_sql_url(url)
        self.migrate = migrate
        self.pool_size = pool_size
        self._engine: Engine | None = None
        self._lock = anyio.Lock()

    @property
    def dialect(self) -> str:
        return self.url.split(":", 1)[0].split("+", 1)[0]

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self._create_engine()
        return self._engine

    def _create_engine(self) -> Engine:
        from sqlalchemy import create_engine, event
        from sqlalchemy.pool import StaticPool

        if self.dialect == "sqlite":
            memory = self.url in ("sqlite://", "sqlite:///:memory:")
            kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
            if memory:
                kwargs["poolclass"] = StaticPool  # one shared connection, or each thread sees an empty db
            engine = create_engine(self.url, **kwargs)

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                if not memory:
                    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            return engine
        return create_engine(
            self.url,
            pool_size=self.pool_size,
            max_overflow=self.pool_size,
            pool_pre_ping=True,  # a restarted server's dead connections are replaced, not raised
            pool_recycle=1800,
        )

    async def start(self, task_group: TaskGroup | None = None) -> None:
        """Connect and migrate. Raises :class:`StoreError` if the database is unreachable."""
        if self.migrate:
            await self.run_sync(self.upgrade, "schema migration")

    def dispose(self) -> None:
        """Close the connection pool now (sync); the next use opens a new one."""
        if self._engine is not None:
            engine, self._engine = self._engine, None
            engine.dispose()

    async def aclose(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await anyio.to_thread.run_sync(engine.dispose)

    def upgrade(self, revision: str = "head") -> None:
        """Upgrade the schema (sync; call from a worker thread).

        Serialized across processes, or two that start together both find no schema and
        one dies on "table ... already exists": on PostgreSQL by a transaction-scoped
        advisory lock; on a SQLite file by an exclusive ``flock`` on the database's
        directory, taken before the first connection (which also switches the file to
        WAL) and held until the migration committed. Waits at most
        :data:`MIGRATION_LOCK_TIMEOUT_S`, then raises :class:`StoreError`.
        """
        from alembic import command
        from alembic.config import Config
        from sqlalchemy import text

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self._sqlite_migration_lock(), map_sql_errors("schema migration"), self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text(f"SET LOCAL lock_timeout = '{int(MIGRATION_LOCK_TIMEOUT_S)}s'"))
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    @contextlib.contextmanager
    def _sqlite_migration_lock(self) -> Iterator[None]:
        """Hold an exclusive ``flock`` on a SQLite database file's directory (a no-op for
        other databases, in-memory ones and platforms without ``fcntl``).

        The directory, not a lock file beside the database: nothing is left behind, and
        opening the database file itself would let a close of our descriptor drop
        SQLite's own POSIX locks in this process.
        """
        directory = self._sqlite_directory()
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: serve migrates before forking
            directory = None
        if directory is None:
            yield
            return
        fd = os.open(directory, os.O_RDONLY)
        try:
            deadline = time.monotonic() + MIGRATION_LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(
                            f"SQL store failed during schema migration: another process held the migration lock "
                            f"on {directory} for {MIGRATION_LOCK_TIMEOUT_S:g} s"
                        ) from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _sqlite_directory(self) -> str | None:
        """The existing directory of a SQLite database file, or ``None``."""
        if self.dialect != "sqlite":
            return None
        from sqlalchemy.engine import make_url

        database = make_url(self.url).database
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        directory = os.path.dirname(os.path.abspath(database))
        return directory if os.path.isdir(directory) else None

    async def run_sync(self, fn: Callable[[], T], what: str) -> T:
        """Run a sync function in a worker thread, mapping SQL errors."""

        def call() -> T:
            with map_sql_errors(what):
                return fn()

        return await anyio.to_thread.run_sync(call)

    async def run(self, fn: Callable[[Connection], T], what: str, *, write: bool = False) -> T:
        """Run ``fn(connection)`` in a worker thread, in a transaction when ``write``.

        ``what`` names the operation in errors ("ledger insert", "usage report").
        """

        def call() -> T:
            with map_sql_errors(what):
                if write:
                    with self.engine.begin() as conn:
                        return fn(conn)
                with self.engine.connect() as conn:
                    return fn(conn)

        return await anyio.to_thread.run_sync(call)

    async def ping(self) -> str | None:
        """Readiness check: ``None`` when reachable, else a short reason."""
        from sqlalchemy import text

        try:
            await self.run(lambda c: c.execute(text("SELECT 1")).scalar(), "ping")
        except StoreError as exc:
            return f"sql store unreachable: {exc.message}"
        return None
