"""Chain the audit checkpoints: each version 2 checkpoint names its predecessor.

Existing rows are version 1 (they signed no predecessor) and keep verifying as such;
``prev_sequence`` and ``prev_digest`` stay NULL for them.

Revision ID: 0008
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``version``, ``prev_sequence`` and ``prev_digest`` to ``audit_checkpoints``."""
    with op.batch_alter_table("audit_checkpoints") as batch:
        batch.add_column(
            sa.Column("version", sa.SmallInteger, nullable=False, server_default="1")
        )
        batch.add_column(sa.Column("prev_sequence", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("prev_digest", sa.LargeBinary(32), nullable=True))


def downgrade() -> None:
    """Drop the chain columns (version 2 checkpoints then no longer verify)."""
    with op.batch_alter_table("audit_checkpoints") as batch:
        batch.drop_column("prev_digest")
        batch.drop_column("prev_sequence")
        batch.drop_column("version")
