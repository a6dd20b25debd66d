"""Scheduled-work ledger rows authenticated: ``scheduled_work.mac`` (storage.work_seal).

Each row the service writes from now on carries a MAC under a key derived in the token,
over the row's name, time and replica. Rows already there keep a NULL ``mac`` and are
not adopted: a database writer may have written any of them (dated to now, it would
skip the next round). A claim that meets one treats it as no run on record and replaces
it, with a log line (docs/security.md, "The scheduled-work ledger"): after the upgrade
each kind of work runs at its next round, once, whenever it last ran.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-15
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``scheduled_work.mac`` (nullable: rows written before have none)."""
    with op.batch_alter_table("scheduled_work") as batch:
        batch.add_column(sa.Column("mac", sa.LargeBinary(32), nullable=True))


def downgrade() -> None:
    """Drop ``scheduled_work.mac`` (the rows stay, unauthenticated)."""
    with op.batch_alter_table("scheduled_work") as batch:
        batch.drop_column("mac")
