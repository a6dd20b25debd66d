"""Create access_grants: care-team and break-the-glass grants with their review.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``access_grants`` with the indexes of its three queries."""
    op.create_table(
        "access_grants",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("patient_index", sa.LargeBinary(32), nullable=False),
        sa.Column("principal", sa.String(255), nullable=False),
        sa.Column("granted_by", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(255), nullable=True),
        sa.Column("break_glass", sa.Boolean, nullable=False),
        # Free text from the clinician, stored in clear because the review reads it;
        # sensitive: never logged.
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reviewed_by", sa.String(255), nullable=True),
        sa.Column("review_comment", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_access_grants"),
        # An emergency access always expires and always says why.
        sa.CheckConstraint(
            "NOT break_glass OR (reason IS NOT NULL AND expires_at IS NOT NULL)",
            name="ck_access_grants_break_glass",
        ),
    )
    # has_access, on the path of every read; also listing a principal's grants.
    op.create_index(
        "ix_access_grants_principal_patient", "access_grants", ["principal", "patient_index"]
    )
    # Listing a patient's grants.
    op.create_index("ix_access_grants_patient", "access_grants", ["patient_index"])
    # The security officer's break-the-glass review queue.
    op.create_index(
        "ix_access_grants_break_glass_reviewed", "access_grants", ["break_glass", "reviewed_at"]
    )


def downgrade() -> None:
    """Drop ``access_grants``."""
    op.drop_index("ix_access_grants_break_glass_reviewed", table_name="access_grants")
    op.drop_index("ix_access_grants_patient", table_name="access_grants")
    op.drop_index("ix_access_grants_principal_patient", table_name="access_grants")
    op.drop_table("access_grants")
