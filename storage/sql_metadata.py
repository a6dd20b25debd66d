"""``MetadataStore`` on SQL with SQLAlchemy 2 Core: SQLite (embedded) or PostgreSQL.

Times are stored in UTC. SQLite keeps no zone, so every datetime is converted to UTC
before it is written or compared and made UTC-aware again when it is read. The tables
are ``storage.sql_schema``'s; engines, transactions and the translation of database
errors (``BackendUnavailableError`` naming the host, never a row's data; duplicate
version -> ``RecordConflictError``) ``storage.sql_engine``'s; migrations
``storage.sql_upgrade``'s. Those names are re-exported here, where the other SQL stores,
the backups and the tests import them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row

from storage.errors import (
    InvalidRecordError,
    KekRetiredError,
    RecordNotFoundError,
)
from storage.index import STUDY_UID, IndexEntry
from storage.interfaces import IndexFilter, ListCursor, StoredRecord
from storage.kek_state import kek_insert_ignoring_duplicates, kek_state
from storage.model import RecordKind
from storage.row_values import RowValues
from storage.sql_engine import (
    connect,
    make_engine,
    pinned_session_options,
    run_in_transaction,
    translated,
    translated_change,
)
from storage.sql_schema import kek_versions, metadata, record_index, records
from storage.sql_upgrade import SCHEMA_HEAD, alembic_config, at_head, upgrade

__all__ = [
    "SCHEMA_HEAD",
    "SqlMetadataStore",
    "alembic_config",
    "at_head",
    "connect",
    "from_db_time",
    "kek_insert_ignoring_duplicates",
    "kek_state",
    "kek_versions",
    "make_engine",
    "metadata",
    "pinned_session_options",
    "record_index",
    "records",
    "run_in_transaction",
    "to_stored_record",
    "to_utc",
    "translated",
    "translated_change",
    "upgrade",
]

_IN_BATCH = 500  # bound the IN (...) list; SQLite caps bound parameters per statement

T = TypeVar("T")

# The put's statements, built once and executed with parameters: built per call they
# cost the put SQLAlchemy's construction, coercion of each value and a new cache key
# (issue 12's GIL profile of 4 KiB puts). The KEK state check's are storage.kek_state's.
_INSERT_RECORD = records.insert()
_INSERT_INDEX = record_index.insert()


def _insert_guarded(
    connection: Connection, values: dict[str, Any], entries: Sequence[IndexEntry] = ()
) -> None:
    """Insert a records row (and its index entries) unless its KEK version is retired
    (same transaction)."""
    connection.execute(_INSERT_RECORD, values)
    if entries:
        connection.execute(_INSERT_INDEX, [
            {"record_id": values["id"], "version": values["version"],
             "patient_index": values["patient_index"], "field": e.field, "value": e.value,
             "system": e.system, "quantity": e.quantity, "unit": e.unit,
             "observed_at": e.observed_at}
            for e in entries
        ])  # fmt: skip
    version = values["kek_version"]
    state = kek_state(connection, version)
    if state is None:  # first use of a version no rotation registered (e.g. KEK v1)
        kek_insert_ignoring_duplicates(connection, version, "previous")
        state = kek_state(connection, version)
    if state == "retired":
        raise KekRetiredError(
            f"master key version {version} was retired while this record was written; "
            "retry the write"
        )


def to_utc(value: datetime, field: str) -> datetime:
    """``value`` in UTC; a naive time is refused rather than guessed."""
    if value.tzinfo is None:
        raise InvalidRecordError(field, "must carry a time zone")
    return value.astimezone(UTC)


def from_db_time(value: datetime) -> datetime:
    """A UTC-aware datetime from a driver value (SQLite returns naive UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def to_stored_record(row: Row[Any]) -> StoredRecord:
    """The domain view of a ``records`` row (not yet verified: see ``storage.row_auth``).

    Read strictly (``storage.row_values``): a value of a type medvault never stores
    reads as a placeholder and is named in ``malformed``, and the row then fails
    verification, as any other edit does.
    """
    v = RowValues(row._mapping)
    return StoredRecord(
        id=v.text("id"),
        version=v.version("version"),
        kind=v.text("kind"),
        content_type=v.text("content_type"),
        patient_index=v.binary("patient_index"),
        sealed_meta=v.binary("sealed_meta"),
        object_key=v.text("object_key"),
        kek_version=v.version("kek_version"),  # 1 to 2^31-1 as well: else names no KEK
        wrapped_dek=v.binary("wrapped_dek"),
        size=v.integer("size"),
        stored_size=v.integer("stored_size"),
        ciphertext_sha256=v.binary("ciphertext_sha256"),
        segment_size=v.integer("segment_size"),
        created_at=v.time("created_at"),
        created_by=v.text("created_by"),
        supersedes_version=v.optional_version("supersedes_version"),
        malformed=tuple(v.malformed),
    )


def _latest_only() -> sa.ColumnElement[bool]:
    """Rows that are the newest version of their record (over all of its versions)."""
    newer = sa.alias(records, "newer")
    latest = sa.select(sa.func.max(newer.c.version)).where(newer.c.id == records.c.id)
    return records.c.version == latest.scalar_subquery()


def _indexed(f: IndexFilter) -> sa.ColumnElement[bool]:
    """The row has an index entry of one of ``f.fields`` matching ``f``."""
    match = sa.and_(
        record_index.c.record_id == records.c.id,
        record_index.c.version == records.c.version,
        record_index.c.patient_index == records.c.patient_index,
        record_index.c.field.in_(sorted(f.fields)),
    )
    if f.value is not None:
        match = sa.and_(match, record_index.c.value == f.value)
    if f.low is not None:
        match = sa.and_(match, record_index.c.value >= f.low)
    if f.high is not None:
        match = sa.and_(match, record_index.c.value <= f.high)
    return sa.exists().where(match)


def _entries_of(ids: Sequence[str]) -> Callable[[Connection], Sequence[Row[Any]]]:
    query = sa.select(record_index).where(record_index.c.record_id.in_(ids))
    return lambda c: c.execute(query).all()


# The statements on every read's path, built once: a statement built per call costs
# SQLAlchemy a new cache key each time (bench/sign.py's GIL profile).
_LATEST = (
    sa.select(records).where(records.c.id == sa.bindparam("record_id"))
    .order_by(records.c.version.desc()).limit(1)
)  # fmt: skip
_VERSION = sa.select(records).where(
    records.c.id == sa.bindparam("record_id"), records.c.version == sa.bindparam("version")
)


class SqlMetadataStore:
    """Record rows in one SQL table; every statement is parameterised."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def insert(self, row: StoredRecord, entries: Sequence[IndexEntry] = ()) -> None:
        """Add a version (and its index entries); ``RecordConflictError`` if (id, version)
        exists already, ``KekRetiredError`` if its KEK version was retired (nothing is
        stored)."""
        self._run(self.insert_change(row, entries), write=True)

    def insert_change(
        self, row: StoredRecord, entries: Sequence[IndexEntry] = ()
    ) -> Callable[[Connection], None]:
        """``insert`` as a function of a connection, to commit in the caller's transaction
        (with the write's audit event); the same errors, nothing stored if it raises."""
        values = {column.name: getattr(row, column.name) for column in records.columns}
        values["created_at"] = to_utc(row.created_at, "created_at")
        return translated_change(lambda c: _insert_guarded(c, values, entries))

    def get(self, record_id: str, version: int | None = None) -> StoredRecord:
        """That version, or the latest; ``RecordNotFoundError`` if absent."""
        params: dict[str, object]
        if version is None:
            query, params = _LATEST, {"record_id": record_id}
        else:
            query, params = _VERSION, {"record_id": record_id, "version": version}
        row = self._run(lambda c: c.execute(query, params).first())
        if row is None:
            raise RecordNotFoundError("no such record" if version is None else "no such version")
        return to_stored_record(row)

    def study_records(
        self, *, patient_index: bytes | None = None, study_uid: str | None = None, limit: int
    ) -> list[StoredRecord]:
        """Latest DICOM versions with a study UID entry: the patient's (``patient_index``)
        or the study's (``study_uid``), oldest first. Unverified: the caller verifies each."""
        match = sa.and_(
            record_index.c.record_id == records.c.id,
            record_index.c.version == records.c.version,
            record_index.c.field == STUDY_UID,
        )
        if study_uid is not None:
            match = sa.and_(match, record_index.c.value == study_uid)
        # DICOM records only: an index row a writer adds can file any record under a
        # study UID, but the kind column is part of the verified row (a row whose kind
        # was edited fails verification when opened).
        query = (
            sa.select(records).where(records.c.kind == RecordKind.DICOM.value)
            .where(sa.exists().where(match)).where(_latest_only())
        )  # fmt: skip
        if patient_index is not None:
            query = query.where(records.c.patient_index == patient_index)
        query = query.order_by(records.c.created_at, records.c.id).limit(limit)
        rows = self._run(lambda c: c.execute(query).all())
        return [to_stored_record(r) for r in rows]

    def index_entries(
        self, keys: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], list[IndexEntry]]:
        """The index entries of each (record id, version) in ``keys``; an entry holding
        a value of a type medvault never stores is left out (the index is a search aid,
        not an authority: ``storage.index``)."""
        found: dict[tuple[str, int], list[IndexEntry]] = {k: [] for k in keys}
        ids = sorted({k[0] for k in keys})
        for start in range(0, len(ids), _IN_BATCH):
            for r in self._run(_entries_of(ids[start : start + _IN_BATCH])):
                v = RowValues(r._mapping)
                key = (v.text("record_id"), v.version("version"))
                entry = IndexEntry(
                    v.text("field"), v.text("value"), v.optional_text("system"),
                    v.optional_text("quantity"), v.optional_text("unit"),
                    v.optional_text("observed_at"),
                )  # fmt: skip
                if key in found and not v.malformed:
                    found[key].append(entry)
        return found

    def list(
        self,
        patient_index: bytes,
        *,
        kind: str | None,
        created_after: datetime | None,
        created_before: datetime | None,
        all_versions: bool,
        after: ListCursor | None,
        limit: int,
        filters: Sequence[IndexFilter] = (),
    ) -> list[StoredRecord]:
        """A page of the patient's rows, newest first, starting after ``after``; with
        ``filters``, only rows that have a matching index entry for each."""
        if limit < 1:
            raise InvalidRecordError("limit", "must be at least 1")
        query = sa.select(records).where(records.c.patient_index == patient_index)
        for f in filters:
            query = query.where(_indexed(f))
        if kind is not None:
            query = query.where(records.c.kind == kind)
        if created_after is not None:
            query = query.where(records.c.created_at >= to_utc(created_after, "created_after"))
        if created_before is not None:
            query = query.where(records.c.created_at < to_utc(created_before, "created_before"))
        if not all_versions:
            query = query.where(_latest_only())
        if after is not None:
            # Keyset pagination: rows strictly after the cursor in the same order.
            key = sa.tuple_(records.c.created_at, records.c.id, records.c.version)
            query = query.where(
                key < sa.tuple_(to_utc(after.created_at, "after"), after.id, after.version)
            )
        query = query.order_by(
            records.c.created_at.desc(), records.c.id.desc(), records.c.version.desc()
        ).limit(limit)
        rows = self._run(lambda c: c.execute(query).all())
        return [to_stored_record(r) for r in rows]

    def referenced(self, object_keys: Iterable[str]) -> set[str]:
        """Those of ``object_keys`` that some row references (for the orphan sweeper)."""
        keys = list(dict.fromkeys(object_keys))
        found: set[str] = set()
        for start in range(0, len(keys), _IN_BATCH):
            found.update(self._referenced_batch(keys[start : start + _IN_BATCH]))
        return found

    def replace_sealed(self, record_id: str, version: int, old: bytes, new: bytes) -> bool:
        """Set a version's sealed metadata to ``new`` if it is still ``old``; True if set."""
        update = (
            records.update()
            .where(records.c.id == record_id, records.c.version == version)
            .where(records.c.sealed_meta == old)
            .values(sealed_meta=new)
        )
        return bool(self._run(lambda c: c.execute(update).rowcount, write=True))

    def _referenced_batch(self, keys: Sequence[str]) -> Sequence[str]:
        query = sa.select(records.c.object_key).where(records.c.object_key.in_(keys))
        return self._run(lambda c: c.scalars(query).all())

    def _run(self, fn: Callable[[Connection], T], *, write: bool = False) -> T:
        return run_in_transaction(self._engine, fn, write=write)
