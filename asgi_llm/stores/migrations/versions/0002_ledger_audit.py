"""The usage ledger and the hash-chained audit log.

* ``usage_ledger`` — one row per attempt (and per cache hit); ``attempt_id`` is the
  primary key, so a batch retried after an outage never duplicates. Money is integer
  pico-dollars (exact sums on SQLite and PostgreSQL). Indexes serve the report queries:
  time window first, then the group/filter columns.
* ``audit_events`` — one event per inference/admin request; ``seq`` is the chain order,
  ``prev_hash``/``hash`` the chain links.
* ``audit_head`` — one row: the chain's last ``seq`` and ``hash``. Writers lock it
  (``UPDATE … SET seq = seq``) so replicas append to one chain, one batch at a time.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_ledger_audit"
down_revision = "0001_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_ledger",
        sa.Column("attempt_id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("ts", sa.DateTime(), nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("org", sa.String(200), nullable=False),
        sa.Column("key_id", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("route", sa.String(400), nullable=False),
        sa.Column("provider", sa.String(200), nullable=False),
        sa.Column("node", sa.String(200), nullable=True),
        sa.Column("upstream_model", sa.String(200), nullable=False),
        sa.Column("response_model", sa.String(200), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("estimated", sa.Boolean(), nullable=False),
        sa.Column("cost_pico", sa.BigInteger(), nullable=False),
        sa.Column("saved_pico", sa.BigInteger(), nullable=False),
        sa.Column("price_source", sa.String(32), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error_code", sa.String(100), nullable=True),
        sa.Column("cache_status", sa.String(16), nullable=False),
        sa.Column("prompt_hash", sa.String(64), nullable=True),
        sa.Column("prompt_text", sa.Text(), nullable=True),
    )
    op.create_index("ix_usage_ledger_ts", "usage_ledger", ["ts"])
    op.create_index("ix_usage_ledger_org_ts", "usage_ledger", ["org", "ts"])
    op.create_index("ix_usage_ledger_model_ts", "usage_ledger", ["model", "ts"])
    op.create_index("ix_usage_ledger_route_ts", "usage_ledger", ["route", "ts"])
    op.create_index("ix_usage_ledger_key_ts", "usage_ledger", ["key_id", "ts"])
    op.create_index("ix_usage_ledger_prompt_hash", "usage_ledger", ["prompt_hash", "ts"])
    op.create_index("ix_usage_ledger_request_id", "usage_ledger", ["request_id"])

    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("ts", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("org", sa.String(200), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(400), nullable=False),
        sa.Column("target", sa.String(400), nullable=True),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("route", sa.String(400), nullable=True),
        sa.Column("verdict", sa.String(32), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_events_ts", "audit_events", ["ts"])
    op.create_index("ix_audit_events_org_ts", "audit_events", ["org", "ts"])
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.execute(sa.text("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '" + "0" * 64 + "')"))


def downgrade() -> None:
    op.drop_table("audit_head")
    op.drop_index("ix_audit_events_org_ts", table_name="audit_events")
    op.drop_index("ix_audit_events_ts", table_name="audit_events")
    op.drop_table("audit_events")
    for name in ("request_id", "prompt_hash", "key_ts", "route_ts", "model_ts", "org_ts", "ts"):
        op.drop_index(f"ix_usage_ledger_{name}", table_name="usage_ledger")
    op.drop_table("usage_ledger")
