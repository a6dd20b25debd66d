"""Work shared by replicas: the elected sweeper's last run, PutRecord request ids.

``scheduled_work`` holds, per kind of periodic work, when it last ran and on which
replica: a replica elected for a round skips it when another swept within the interval
(storage.work_ledger). ``put_requests`` remembers, per principal and client-chosen
request id, the record version a PutRecord made, so a retry returns it instead of a
duplicate (storage.put_requests). It holds no patient data and no digest.

Revision ID: 0012
Revises: 0009
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``scheduled_work`` and ``put_requests``."""
    op.create_table(
        "scheduled_work",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replica", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_scheduled_work"),
    )
    op.create_table(
        "put_requests",
        sa.Column("principal", sa.String(255), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("record_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("principal", "request_id", name="pk_put_requests"),
        sa.Index("ix_put_requests_created", "created_at"),
    )


def downgrade() -> None:
    """Drop both tables."""
    op.drop_table("put_requests")
    op.drop_table("scheduled_work")
