"""Node names per org, consents to shared capacity, no credentials in node URLs.

* ``nodes``: the global unique index on ``name`` becomes a unique index on
  ``(org, name)`` — two orgs may both have a node called ``gpu-1``.
* ``node_consents``: per consuming org, whose shared nodes it accepts and up to which
  price (JSON rules, see ``asgi_llm.nodes.consent``).
* Stored node URLs lose any ``user:password@`` (the gateway never needed them: it
  authenticates to agents with the call secret) and any query string or fragment.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import sqlalchemy as sa
from alembic import op

revision = "0005_node_scope"
down_revision = "0004_quarantine"
branch_labels = None
depends_on = None


def _clean(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "http://invalid"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def upgrade() -> None:
    op.drop_index("ix_nodes_name", table_name="nodes")
    op.create_index("ix_nodes_org_name", "nodes", ["org", "name"], unique=True)
    op.create_table(
        "node_consents",
        sa.Column("org", sa.String(200), primary_key=True),
        sa.Column("rules", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("updated_by", sa.String(200)),
    )
    conn = op.get_bind()
    nodes = sa.table("nodes", sa.column("id", sa.String), sa.column("url", sa.Text))
    for row in conn.execute(sa.select(nodes.c.id, nodes.c.url).where(nodes.c.url.isnot(None))).all():
        clean = _clean(row.url)
        if clean != row.url:
            conn.execute(nodes.update().where(nodes.c.id == row.id).values(url=clean))


def downgrade() -> None:
    op.drop_table("node_consents")
    op.drop_index("ix_nodes_org_name", table_name="nodes")
    op.create_index("ix_nodes_name", "nodes", ["name"], unique=True)
