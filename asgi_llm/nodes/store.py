"""Node records, enrollment tokens and consents in the SQL store (tables of revisions
``0003_nodes`` and ``0005_node_scope``).

Consuming an enrollment token is one conditional ``UPDATE … WHERE used_at IS NULL AND
expires_at > now``: of two concurrent joins with the same token (on any replica) exactly
one wins; a replay finds it used.

Node names are unique per org among nodes that are not revoked (a unique index on
``(org, name)``; a revoked node gives its name up by being renamed ``name#id``). The
node's identity everywhere else — the ledger's ``node`` column, reports — is its id, so
a reused name never inherits another node's history.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any, Literal, Protocol

from asgi_llm.nodes.records import EnrollmentToken, NodeRecord

if TYPE_CHECKING:
    from asgi_llm.stores.sql import SQLDatabase

__all__ = ["NodeStore", "SQLNodeStore", "TokenProblem"]

TokenProblem = Literal["unknown", "used", "expired"]


class NodeStore(Protocol):
    """Enrollment tokens, node records and consents, shared by every replica.

    The contract every backend keeps (``tests/nodes/test_store_contract.py``): a token
    is consumed once, also under concurrency, never at or after its expiry; a record
    round-trips every field; names are unique per org among nodes that are not revoked
    (a revoked node gives its name up as ``name#id``); listings are ordered by creation
    and org-scoped; driver failures leave as :class:`~asgi_llm.stores.StoreError`.
    """

    async def create_token(self, token: EnrollmentToken) -> None:
        """Store a new token (its hash only)."""
        ...

    async def consume_token(self, token_hash: str, *, node_id: str, at: float) -> tuple[EnrollmentToken | None, TokenProblem | None]:
        """Mark the token used by ``node_id`` — once: ``(token, None)`` or ``(None, problem)``."""
        ...

    async def token_org(self, token_hash: str) -> str | None:
        """The org of a token (used or not), without consuming it."""
        ...

    async def list_tokens(self, *, org: str | None = None) -> list[EnrollmentToken]:
        """Tokens by creation time, optionally of one org."""
        ...

    async def create_node(self, record: NodeRecord) -> None:
        """Insert a node; ``ValueError`` when an active node of its org holds its name."""
        ...

    async def get(self, node_id: str) -> NodeRecord | None:
        """The node with this id."""
        ...

    async def get_by_credential(self, credential_hash: str) -> NodeRecord | None:
        """The node holding this credential (its hash)."""
        ...

    async def list(self, *, org: str | None = None) -> list[NodeRecord]:
        """Nodes by creation time, optionally of one org."""
        ...

    async def update(self, record: NodeRecord) -> None:
        """Write every field of ``record`` (by id)."""
        ...

    async def list_consents(self) -> dict[str, list[dict[str, Any]]]:
        """Every org's own acceptance rules (raw JSON, validated by the caller)."""
        ...

    async def set_consent(self, org: str, rules: list[dict[str, Any]], *, at: float, by: str | None) -> None:
        """Replace ``org``'s acceptance rules (``[]`` withdraws them)."""
        ...


@cache
def _tables() -> Any:
    import sqlalchemy as sa

    md = sa.MetaData()
    tokens = sa.Table(
        "node_enrollment_tokens", md,
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("org", sa.String(200), nullable=False),
        sa.Column("defaults", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float),
        sa.Column("node_id", sa.String(40)),
        sa.Column("created_by", sa.String(200)),
    )
    nodes = sa.Table(
        "nodes", md,
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("org", sa.String(200), nullable=False),
        sa.Column("credential_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("url", sa.Text),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("models", sa.Text, nullable=False),
        sa.Column("price", sa.Text),
        sa.Column("shared_with", sa.Text, nullable=False),
        sa.Column("availability", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("rotated_at", sa.Float),
        sa.Column("revoked_at", sa.Float),
        sa.Column("last_seen_at", sa.Float),
        sa.Column("created_by", sa.String(200)),
        sa.UniqueConstraint("org", "name", name="ix_nodes_org_name"),
    )
    return tokens, nodes


@cache
def _consents() -> Any:
    import sqlalchemy as sa

    return sa.Table(
        "node_consents", sa.MetaData(),
        sa.Column("org", sa.String(200), primary_key=True),
        sa.Column("rules", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("updated_by", sa.String(200)),
    )


def _token(row: Any) -> EnrollmentToken:
    return EnrollmentToken(
        id=row.id, hash=row.token_hash, org=row.org, expires_at=row.expires_at, defaults=json.loads(row.defaults),
        created_at=row.created_at, used_at=row.used_at, node_id=row.node_id, created_by=row.created_by,
    )


def _node(row: Any) -> NodeRecord:
    return NodeRecord(
        id=row.id, name=row.name, org=row.org, credential_hash=row.credential_hash, mode=row.mode, url=row.url,
        labels=json.loads(row.labels), models=json.loads(row.models),
        price=json.loads(row.price) if row.price else None, shared_with=tuple(json.loads(row.shared_with)),
        availability=json.loads(row.availability), state=row.state, created_at=row.created_at,
        rotated_at=row.rotated_at, revoked_at=row.revoked_at, last_seen_at=row.last_seen_at, created_by=row.created_by,
    )


def _node_row(r: NodeRecord) -> dict[str, Any]:
    return {
        "id": r.id, "name": r.name, "org": r.org, "credential_hash": r.credential_hash, "mode": r.mode, "url": r.url,
        "labels": json.dumps(r.labels), "models": json.dumps(r.models),
        "price": json.dumps(r.price) if r.price else None, "shared_with": json.dumps(list(r.shared_with)),
        "availability": json.dumps(r.availability), "state": r.state, "created_at": r.created_at,
        "rotated_at": r.rotated_at, "revoked_at": r.revoked_at, "last_seen_at": r.last_seen_at, "created_by": r.created_by,
    }


class SQLNodeStore:
    """Enrollment tokens and node records in the shared :class:`SQLDatabase`.

    Example:
        >>> store = SQLNodeStore(db)
        >>> await store.create_token(token)
        >>> token, problem = await store.consume_token(token_hash, node_id="node_…", at=time.time())
    """

    def __init__(self, db: SQLDatabase) -> None:
        self.db = db

    # ----------------------------------------------------------------- tokens

    async def create_token(self, token: EnrollmentToken) -> None:
        """Store a new token (its hash only)."""
        tokens, _ = _tables()
        row = {"id": token.id, "token_hash": token.hash, "org": token.org, "defaults": json.dumps(token.defaults),
               "created_at": token.created_at, "expires_at": token.expires_at, "created_by": token.created_by}
        await self.db.run(lambda c: c.execute(tokens.insert().values(**row)), "enrollment token create", write=True)

    async def consume_token(self, token_hash: str, *, node_id: str, at: float) -> tuple[EnrollmentToken | None, TokenProblem | None]:
        """Mark the token used by ``node_id`` — once. Returns ``(token, None)`` on success,
        else ``(None, "unknown" | "used" | "expired")``."""
        tokens, _ = _tables()

        def q(conn: Any) -> Any:
            done = conn.execute(
                tokens.update()
                .where(tokens.c.token_hash == token_hash, tokens.c.used_at.is_(None), tokens.c.expires_at > at)
                .values(used_at=at, node_id=node_id)
            ).rowcount
            return done, conn.execute(tokens.select().where(tokens.c.token_hash == token_hash)).first()

        done, row = await self.db.run(q, "enrollment token use", write=True)
        if row is None:
            return None, "unknown"
        if done != 1:
            return None, "used" if row.used_at is not None else "expired"
        return _token(row), None

    async def token_problem(self, token_hash: str, *, at: float) -> TokenProblem | None:
        """Why the token cannot enroll a node now (``"unknown" | "used" | "expired"``), or
        ``None`` when it can; the token is not consumed."""
        tokens, _ = _tables()
        row = await self.db.run(
            lambda c: c.execute(tokens.select().where(tokens.c.token_hash == token_hash)).first(), "enrollment token read")
        if row is None:
            return "unknown"
        if row.used_at is not None:
            return "used"
        return "expired" if row.expires_at <= at else None

    async def token_org(self, token_hash: str) -> str | None:
        """The org of a token (used or not), without consuming it."""
        tokens, _ = _tables()
        row = await self.db.run(
            lambda c: c.execute(tokens.select().where(tokens.c.token_hash == token_hash)).first(), "enrollment token read")
        return None if row is None else str(row.org)

    async def list_tokens(self, *, org: str | None = None) -> list[EnrollmentToken]:
        tokens, _ = _tables()
        stmt = tokens.select().order_by(tokens.c.created_at, tokens.c.id)
        if org is not None:
            stmt = stmt.where(tokens.c.org == org)
        rows: Sequence[Any] = await self.db.run(lambda c: c.execute(stmt).all(), "enrollment token list")
        return [_token(r) for r in rows]

    # ----------------------------------------------------------------- nodes

    async def create_node(self, record: NodeRecord) -> None:
        """Insert a node. A revoked node of the same org holding the same name gives it up
        (renamed ``name#id``); an active one keeps it (``ValueError``). Names of other
        orgs never collide."""
        import sqlalchemy as sa

        _, nodes = _tables()

        def q(conn: Any) -> None:
            old = conn.execute(nodes.select().where(nodes.c.org == record.org, nodes.c.name == record.name)).first()
            if old is not None:
                if old.revoked_at is None:
                    raise ValueError(f"a node named {record.name!r} is already enrolled in org {record.org!r}")
                conn.execute(nodes.update().where(nodes.c.id == old.id).values(name=f"{old.name}#{old.id}"))
            try:
                conn.execute(nodes.insert().values(**_node_row(record)))
            except sa.exc.IntegrityError:  # a concurrent enrollment took the name first
                raise ValueError(f"a node named {record.name!r} is already enrolled in org {record.org!r}") from None

        await self.db.run(q, "node create", write=True)

    async def get(self, node_id: str) -> NodeRecord | None:
        _, nodes = _tables()
        row = await self.db.run(lambda c: c.execute(nodes.select().where(nodes.c.id == node_id)).first(), "node read")
        return None if row is None else _node(row)

    async def get_by_credential(self, credential_hash: str) -> NodeRecord | None:
        _, nodes = _tables()
        row = await self.db.run(
            lambda c: c.execute(nodes.select().where(nodes.c.credential_hash == credential_hash)).first(), "node lookup"
        )
        return None if row is None else _node(row)

    async def list(self, *, org: str | None = None) -> list[NodeRecord]:
        _, nodes = _tables()
        stmt = nodes.select().order_by(nodes.c.created_at, nodes.c.id)
        if org is not None:
            stmt = stmt.where(nodes.c.org == org)
        rows: Sequence[Any] = await self.db.run(lambda c: c.execute(stmt).all(), "node list")
        return [_node(r) for r in rows]

    async def update(self, record: NodeRecord) -> None:
        """Write every field of ``record`` (by id)."""
        _, nodes = _tables()
        row = _node_row(record)
        row.pop("id")
        await self.db.run(lambda c: c.execute(nodes.update().where(nodes.c.id == record.id).values(**row)),
                          "node update", write=True)

    # ----------------------------------------------------------------- consents

    async def list_consents(self) -> dict[str, list[dict[str, Any]]]:
        """Every org's own acceptance rules (raw JSON, validated by the caller)."""
        table = _consents()
        rows: Sequence[Any] = await self.db.run(lambda c: c.execute(table.select()).all(), "node consent list")
        out: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            try:
                rules = json.loads(r.rules)
            except ValueError:
                continue
            if isinstance(rules, list):
                out[str(r.org)] = rules
        return out

    async def set_consent(self, org: str, rules: list[dict[str, Any]], *, at: float, by: str | None) -> None:
        """Replace ``org``'s acceptance rules (an empty list withdraws every consent)."""
        table = _consents()
        text = json.dumps(rules)

        def q(conn: Any) -> None:
            done = conn.execute(table.update().where(table.c.org == org).values(rules=text, updated_at=at, updated_by=by)).rowcount
            if done != 1:
                conn.execute(table.insert().values(org=org, rules=text, updated_at=at, updated_by=by))

        await self.db.run(q, "node consent write", write=True)
