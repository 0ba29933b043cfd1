"""Key stores: where API keys created through the admin API live.

:class:`KeyStore` is the seam; :class:`MemoryKeyStore` serves tests and single-process
embedding, :class:`SQLKeyStore` the ``api_keys`` table of the SQL store (SQLite or
PostgreSQL; schema in revision ``0001_keys``). Every replica of a gateway sharing one
database sees the same keys.

The SQL store also keeps the *persisted pepper* (``auth_settings``), used when neither
``auth.pepper`` nor ``ASGI_LLM_PEPPER`` is set — see :mod:`asgi_llm.auth.keyring`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import replace
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

from asgi_llm.auth.keys import KeyRecord
from asgi_llm.auth.limits import KeyLimits

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from asgi_llm.stores.sql import SQLDatabase

__all__ = ["KeyStore", "MemoryKeyStore", "SQLKeyStore"]


class KeyStore(Protocol):
    """Stored API keys, by hash and by id. Methods raise
    :class:`~asgi_llm.stores.StoreError` when the store fails.

    Example:
        >>> await store.create(record)
        >>> await store.get_by_hash(hash_key(pepper, presented_key))
    """

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        """The key whose hash is ``key_hash`` (revoked and expired ones included), or ``None``."""
        ...

    async def get(self, key_id: str) -> KeyRecord | None:
        """The key with this id, or ``None``."""
        ...

    async def create(self, record: KeyRecord) -> None:
        """Store a new key."""
        ...

    async def list(self, *, org: str | None = None) -> list[KeyRecord]:
        """Keys, oldest first; only ``org``'s when given."""
        ...

    async def revoke(self, key_id: str, *, at: float) -> KeyRecord | None:
        """Mark a key revoked (idempotent: the first time is kept); the updated record, or
        ``None`` if there is no such key."""
        ...

    async def pepper(self) -> bytes:
        """The persisted pepper, created on first use (same value for every replica)."""
        ...

    async def pepper_check(self, fingerprint: str) -> bool:
        """Record ``fingerprint`` of the pepper in use if none is; ``False`` when a
        different one is recorded (keys were hashed with another pepper)."""
        ...


class MemoryKeyStore:
    """Keys in this process's memory (tests, single-process embedding)."""

    def __init__(self) -> None:
        self._by_id: dict[str, KeyRecord] = {}
        self._pepper = secrets.token_bytes(32)
        self._fingerprint: str | None = None

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        return next((r for r in self._by_id.values() if secrets.compare_digest(r.hash, key_hash)), None)

    async def get(self, key_id: str) -> KeyRecord | None:
        return self._by_id.get(key_id)

    async def create(self, record: KeyRecord) -> None:
        self._by_id[record.id] = record

    async def list(self, *, org: str | None = None) -> list[KeyRecord]:
        return sorted((r for r in self._by_id.values() if org is None or r.org == org), key=lambda r: (r.created_at, r.id))

    async def revoke(self, key_id: str, *, at: float) -> KeyRecord | None:
        record = self._by_id.get(key_id)
        if record is not None and record.revoked_at is None:
            record = self._by_id[key_id] = replace(record, revoked_at=at)
        return record

    async def pepper(self) -> bytes:
        return self._pepper

    async def pepper_check(self, fingerprint: str) -> bool:
        if self._fingerprint is None:
            self._fingerprint = fingerprint
        return secrets.compare_digest(self._fingerprint, fingerprint)

    async def start(self, task_group: TaskGroup) -> None:
        return None

    async def aclose(self) -> None:
        return None


@cache
def _tables() -> Any:
    import sqlalchemy as sa

    md = sa.MetaData()
    keys = sa.Table(
        "api_keys", md,
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("org", sa.String(200), nullable=False),
        sa.Column("name", sa.String(200)),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("models", sa.Text, nullable=False),
        sa.Column("limits", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float),
        sa.Column("revoked_at", sa.Float),
        sa.Column("created_by", sa.String(200)),
    )
    settings = sa.Table(
        "auth_settings", md,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    return keys, settings


def _row_to_record(row: Any) -> KeyRecord:
    limits = json.loads(row.limits)
    return KeyRecord(
        id=row.id,
        org=row.org,
        hash=row.key_hash,
        prefix=row.prefix,
        name=row.name,
        scopes=frozenset(json.loads(row.scopes)),
        models=tuple(json.loads(row.models)),
        limits=KeyLimits.model_validate(limits.get("key", {})),
        model_limits={m: KeyLimits.model_validate(v) for m, v in limits.get("models", {}).items()},
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        created_by=row.created_by,
    )


def _record_to_row(r: KeyRecord) -> dict[str, Any]:
    limits = {
        "key": r.limits.model_dump(mode="json", exclude_none=True),
        "models": {m: v.model_dump(mode="json", exclude_none=True) for m, v in r.model_limits.items()},
    }
    return {
        "id": r.id, "key_hash": r.hash, "prefix": r.prefix, "org": r.org, "name": r.name,
        "scopes": json.dumps(sorted(r.scopes)), "models": json.dumps(list(r.models)), "limits": json.dumps(limits),
        "created_at": r.created_at, "expires_at": r.expires_at, "revoked_at": r.revoked_at, "created_by": r.created_by,
    }


class SQLKeyStore:
    """Keys in the SQL store's ``api_keys`` table.

    Args:
        db: the shared :class:`~asgi_llm.stores.sql.SQLDatabase` (its owner starts it).
    """

    def __init__(self, db: SQLDatabase) -> None:
        self.db = db

    async def get_by_hash(self, key_hash: str) -> KeyRecord | None:
        keys, _ = _tables()

        def q(conn: Any) -> Any:
            return conn.execute(keys.select().where(keys.c.key_hash == key_hash)).first()

        row = await self.db.run(q, "API key lookup")
        if row is None or not secrets.compare_digest(row.key_hash, key_hash):
            return None
        return _row_to_record(row)

    async def get(self, key_id: str) -> KeyRecord | None:
        keys, _ = _tables()
        row = await self.db.run(lambda c: c.execute(keys.select().where(keys.c.id == key_id)).first(), "API key read")
        return None if row is None else _row_to_record(row)

    async def create(self, record: KeyRecord) -> None:
        keys, _ = _tables()
        await self.db.run(lambda c: c.execute(keys.insert().values(**_record_to_row(record))), "API key create", write=True)

    async def list(self, *, org: str | None = None) -> list[KeyRecord]:
        keys, _ = _tables()
        stmt = keys.select().order_by(keys.c.created_at, keys.c.id)
        if org is not None:
            stmt = stmt.where(keys.c.org == org)
        rows: Sequence[Any] = await self.db.run(lambda c: c.execute(stmt).all(), "API key list")
        return [_row_to_record(r) for r in rows]

    async def revoke(self, key_id: str, *, at: float) -> KeyRecord | None:
        keys, _ = _tables()

        def q(conn: Any) -> Any:
            conn.execute(keys.update().where(keys.c.id == key_id, keys.c.revoked_at.is_(None)).values(revoked_at=at))
            return conn.execute(keys.select().where(keys.c.id == key_id)).first()

        row = await self.db.run(q, "API key revoke", write=True)
        return None if row is None else _row_to_record(row)

    async def _setting(self, name: str, proposed: str) -> str:
        """Insert ``name = proposed`` unless present; return the stored value (race-free)."""
        _, settings = _tables()
        dialect = self.db.dialect

        def q(conn: Any) -> Any:
            if dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert
            else:
                from sqlalchemy.dialects.sqlite import insert
            conn.execute(insert(settings).values(name=name, value=proposed).on_conflict_do_nothing())
            return conn.execute(settings.select().where(settings.c.name == name)).first().value

        return str(await self.db.run(q, "auth settings", write=True))

    async def pepper(self) -> bytes:
        return bytes.fromhex(await self._setting("pepper", secrets.token_hex(32)))

    async def pepper_check(self, fingerprint: str) -> bool:
        return secrets.compare_digest(await self._setting("pepper_fingerprint", fingerprint), fingerprint)
