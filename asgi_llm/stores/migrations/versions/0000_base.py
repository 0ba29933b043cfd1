"""The base revision: an empty schema that every capability's revision builds on.

Revision chain (linear; each capability owns its file):
    0000_base → 0001_keys (auth) → 0002_ledger_audit (usage/audit) → 0003_nodes (BYOI)
"""

from __future__ import annotations

revision = "0000_base"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
