"""Create the records table: one row per stored version of a record.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``records`` with its lookup indexes."""
    op.create_table(
        "records",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("patient_index", sa.LargeBinary(32), nullable=False),
        sa.Column("sealed_meta", sa.LargeBinary, nullable=False),
        sa.Column("object_key", sa.String(255), nullable=False),
        sa.Column("kek_version", sa.Integer, nullable=False),
        sa.Column("wrapped_dek", sa.LargeBinary, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("stored_size", sa.BigInteger, nullable=False),
        sa.Column("ciphertext_sha256", sa.LargeBinary(32), nullable=False),
        sa.Column("segment_size", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("supersedes_version", sa.Integer, nullable=True),
        sa.PrimaryKeyConstraint("id", "version", name="pk_records"),
        sa.UniqueConstraint("object_key", name="uq_records_object_key"),
    )
    # Listing a patient's records newest first.
    op.create_index("ix_records_patient_created", "records", ["patient_index", "created_at"])
    # Key rotation rewraps data keys one KEK version at a time.
    op.create_index("ix_records_kek_version", "records", ["kek_version"])


def downgrade() -> None:
    """Drop ``records``."""
    op.drop_index("ix_records_kek_version", table_name="records")
    op.drop_index("ix_records_patient_created", table_name="records")
    op.drop_table("records")
