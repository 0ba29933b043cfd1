"""BYOI nodes: ``node_enrollment_tokens`` and ``nodes``.

Enrollment tokens and node credentials are stored as ``HMAC-SHA256(pepper, secret)``
hex (the API keys' pepper), never in clear. JSON text columns keep the schema portable
between SQLite and PostgreSQL; times are seconds since the epoch.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_nodes"
down_revision = "0002_ledger_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_enrollment_tokens",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("org", sa.String(200), nullable=False),
        sa.Column("defaults", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("used_at", sa.Float),
        sa.Column("node_id", sa.String(40)),
        sa.Column("created_by", sa.String(200)),
    )
    op.create_index("ix_node_enrollment_tokens_hash", "node_enrollment_tokens", ["token_hash"], unique=True)
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("org", sa.String(200), nullable=False),
        sa.Column("credential_hash", sa.String(64), nullable=False),
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
    )
    op.create_index("ix_nodes_credential_hash", "nodes", ["credential_hash"], unique=True)
    op.create_index("ix_nodes_name", "nodes", ["name"], unique=True)
    op.create_index("ix_nodes_org", "nodes", ["org"])


def downgrade() -> None:
    op.drop_index("ix_nodes_org", table_name="nodes")
    op.drop_index("ix_nodes_name", table_name="nodes")
    op.drop_index("ix_nodes_credential_hash", table_name="nodes")
    op.drop_table("nodes")
    op.drop_index("ix_node_enrollment_tokens_hash", table_name="node_enrollment_tokens")
    op.drop_table("node_enrollment_tokens")
