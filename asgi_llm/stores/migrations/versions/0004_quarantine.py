"""Quarantine for rows the database refused, and the ledger's ``flags`` column.

* ``quarantine`` — one row per ledger row / audit event a batch writer could not store
  (a data error, not an outage): the writer's name, the row's org, the error, and the row
  as JSON text, so it can be inspected (``GET /admin/quarantine``) and re-inserted by hand.
* ``usage_ledger.flags`` — what bounding a row before it was queued had to change
  (``truncated``, ``tokens_clamped``, ``cost_invalid``, ``value_fixed``); ``NULL`` when
  nothing did.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_quarantine"
down_revision = "0003_nodes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quarantine",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("ts", sa.DateTime(), nullable=False),
        sa.Column("writer", sa.String(32), nullable=False),
        sa.Column("org", sa.String(200), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
    )
    op.create_index("ix_quarantine_org_id", "quarantine", ["org", "id"])
    op.create_index("ix_quarantine_writer_id", "quarantine", ["writer", "id"])
    with op.batch_alter_table("usage_ledger") as batch:
        batch.add_column(sa.Column("flags", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("flags")
    op.drop_index("ix_quarantine_writer_id", table_name="quarantine")
    op.drop_index("ix_quarantine_org_id", table_name="quarantine")
    op.drop_table("quarantine")
