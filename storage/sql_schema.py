"""The metadata database's record tables as queries see them (SQLAlchemy Core).

``storage/migrations/versions/`` is how they came to be. Every SQL store puts its tables
on the one ``metadata`` here, so that Alembic compares one schema with the database.
"""

from __future__ import annotations

import sqlalchemy as sa

from storage.sqlite_text import StoredTime

metadata = sa.MetaData()

# The schema as queries see it; storage/migrations/versions/ is how it came to be.
records = sa.Table(
    "records",
    metadata,
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
    sa.Column("created_at", StoredTime(), nullable=False),
    sa.Column("created_by", sa.String(255), nullable=False),
    sa.Column("supersedes_version", sa.Integer, nullable=True),
    sa.PrimaryKeyConstraint("id", "version", name="pk_records"),
    sa.UniqueConstraint("object_key", name="uq_records_object_key"),
    sa.Index("ix_records_patient_created", "patient_index", "created_at"),
    sa.Index("ix_records_kek_version", "kek_version"),
)


# Searchable fields of each record version (migration 0013; storage/index.py says what
# they are). Written with the record row, in its transaction. ``patient_index`` is the
# record's keyed blind index; the other columns are codes, UIDs, dates and modality in
# clear (docs/formats.md). Searches return only record rows that verify.
record_index = sa.Table(
    "record_index",
    metadata,
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
    sa.Index("ix_record_index_record", "record_id", "version"),
    sa.Index("ix_record_index_field_value", "field", "value"),
    sa.Index("ix_record_index_patient_field", "patient_index", "field", "value"),
)  # fmt: skip


# Master-key versions and their state (migration 0005; storage/kek.py manages it). The
# records insert checks it in the same transaction (storage.kek_state), so no row can
# reference a retired version.
kek_versions = sa.Table(
    "kek_versions",
    metadata,
    sa.Column("version", sa.Integer, nullable=False, autoincrement=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", StoredTime(), nullable=False),
    sa.Column("retired_at", StoredTime(), nullable=True),
    sa.PrimaryKeyConstraint("version", name="pk_kek_versions"),
    sa.CheckConstraint("state IN ('active', 'previous', 'retired')", name="ck_kek_versions_state"),
)
