"""Scheduled-run ledger rows authenticated: ``backup_runs.mac`` (storage.backup.run_seal).

Each row the service writes from now on carries a MAC under a key derived in the token,
over every column but itself, slot and kind included. Rows already there keep a NULL
``mac`` and are not adopted, even when the token is at hand: a database writer may have
written any of them, and a MAC would make a forged ``ok`` count. They stay as history,
listed as legacy (``ScheduledRun.auth``), never counted as a result by the gauges; a
claim that meets one for its slot replaces it (docs/security.md, "The run ledger").

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-14
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``backup_runs.mac`` (nullable: rows written before have none)."""
    with op.batch_alter_table("backup_runs") as batch:
        batch.add_column(sa.Column("mac", sa.LargeBinary(32), nullable=True))


def downgrade() -> None:
    """Drop ``backup_runs.mac`` (the rows stay, unauthenticated)."""
    with op.batch_alter_table("backup_runs") as batch:
        batch.drop_column("mac")
