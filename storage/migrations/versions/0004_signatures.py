"""Create record_signatures: detached CMS signatures of record versions, sealed.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``record_signatures`` and the index of its one query (by record version)."""
    op.create_table(
        "record_signatures",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("record_id", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("signer", sa.String(128), nullable=False),
        sa.Column("certificate_subject", sa.String(1024), nullable=False),
        sa.Column("algorithm", sa.String(32), nullable=False),
        sa.Column("signing_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        # The .p7s sealed under a key derived from the record's data key (AES-256-GCM).
        sa.Column("sealed_p7s", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_record_signatures"),
        sa.ForeignKeyConstraint(
            ["record_id", "version"],
            ["records.id", "records.version"],
            name="fk_record_signatures_record",
        ),
    )
    op.create_index("ix_record_signatures_record", "record_signatures", ["record_id", "version"])


def downgrade() -> None:
    """Drop ``record_signatures``."""
    op.drop_index("ix_record_signatures_record", table_name="record_signatures")
    op.drop_table("record_signatures")
