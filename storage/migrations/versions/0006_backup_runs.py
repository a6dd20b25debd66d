"""Create backup_runs: one row per scheduled slot, so each slot runs exactly once.

Every replica's scheduler computes the same slots from the same cron expression. The
elected replica inserts ``(slot, kind)`` before it starts; a replica that comes later
(a slow clock, a lock released just before it looked) hits the primary key and skips
that slot. ``finished_at`` stays NULL for a run that died midway.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``backup_runs``."""
    op.create_table(
        "backup_runs",
        sa.Column("slot", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("replica", sa.String(255), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("backup_id", sa.String(64), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.String(1000), nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("slot", "kind", name="pk_backup_runs"),
        sa.CheckConstraint("kind IN ('backup', 'drill')", name="ck_backup_runs_kind"),
        sa.CheckConstraint("outcome IN ('running', 'ok', 'failed')", name="ck_backup_runs_outcome"),
    )


def downgrade() -> None:
    """Drop ``backup_runs`` (the history of scheduled runs; backups themselves stay)."""
    op.drop_table("backup_runs")
