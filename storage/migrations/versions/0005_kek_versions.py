"""Create kek_versions: the state of each master-key (KEK) version.

Replicas and the retire check agree through this table: a record's insert refuses a
retired version in the same transaction (``storage.sql_metadata``), and a version is
retired only while no row uses it (``storage.kek``). Versions already referenced by
records are registered here; the newest of them is marked active until the service
syncs the table with the token.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``kek_versions`` and register the versions records use."""
    op.create_table(
        "kek_versions",
        sa.Column("version", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("version", name="pk_kek_versions"),
        sa.CheckConstraint(
            "state IN ('active', 'previous', 'retired')", name="ck_kek_versions_state"
        ),
    )
    # Plain SQL with no user input; CURRENT_TIMESTAMP is UTC on SQLite and zone-aware
    # on PostgreSQL, as the column expects.
    op.execute(
        "INSERT INTO kek_versions (version, state, created_at) "
        "SELECT DISTINCT kek_version, 'previous', CURRENT_TIMESTAMP FROM records"
    )
    op.execute(
        "UPDATE kek_versions SET state = 'active' "
        "WHERE version = (SELECT MAX(version) FROM kek_versions)"
    )


def downgrade() -> None:
    """Drop ``kek_versions`` (retired versions are forgotten; their keys are gone anyway)."""
    op.drop_table("kek_versions")
