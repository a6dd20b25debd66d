"""The record index: searchable fields of each record version (storage/index.py).

One row per field value, written with the record row in its transaction. It holds the
record's keyed blind index (never a patient identifier) and codes, UIDs, dates and
modality in clear, so that ListRecords filters, ListStudies and GetStudy can find
records without decrypting them (docs/formats.md). Rows stored before this revision
have no entries: they are found by the unfiltered ListRecords only.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``record_index`` and its indexes."""
    op.create_table(
        "record_index",
        sa.Column("record_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("patient_index", sa.LargeBinary(32), nullable=False),
        sa.Column("field", sa.String(32), nullable=False),
        sa.Column("value", sa.String(128), nullable=False),
        sa.Column("system", sa.String(255), nullable=True),
        sa.Column("quantity", sa.String(64), nullable=True),
        sa.Column("unit", sa.String(64), nullable=True),
        sa.Column("observed_at", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(
            ["record_id", "version"], ["records.id", "records.version"],
            name="fk_record_index_records",
        ),
    )
    op.create_index("ix_record_index_record", "record_index", ["record_id", "version"])
    op.create_index("ix_record_index_field_value", "record_index", ["field", "value"])
    op.create_index(
        "ix_record_index_patient_field", "record_index", ["patient_index", "field", "value"]
    )


def downgrade() -> None:
    """Drop ``record_index``."""
    op.drop_index("ix_record_index_patient_field", table_name="record_index")
    op.drop_index("ix_record_index_field_value", table_name="record_index")
    op.drop_index("ix_record_index_record", table_name="record_index")
    op.drop_table("record_index")
