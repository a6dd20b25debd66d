"""Contract tests of ``MetadataStore``: the same tests on SQLite and on PostgreSQL."""

from __future__ import annotations

import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from storage.errors import (
    BackendUnavailableError,
    DatabaseUnreachableError,
    InvalidRecordError,
    RecordConflictError,
    RecordNotFoundError,
)
from storage.interfaces import ListCursor, MetadataStore, StoredRecord
from storage.sql_metadata import SqlMetadataStore, alembic_config, make_engine, upgrade

pytestmark = pytest.mark.integration

T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
PATIENT = bytes(range(32))
OTHER_PATIENT = bytes(32)


def make_row(record_id: str = "", version: int = 1, **changes: object) -> StoredRecord:
    """A synthetic row; every secret-looking field is random bytes."""
    row = StoredRecord(
        id=record_id or secrets.token_hex(16),
        version=version,
        kind="HL7V2",
        content_type="x-application/hl7-v2+er7",
        patient_index=PATIENT,
        sealed_meta=secrets.token_bytes(48),
        object_key=f"obj/{secrets.token_hex(16)}",
        kek_version=1,
        wrapped_dek=secrets.token_bytes(40),
        size=1234,
        stored_size=1300,
        ciphertext_sha256=secrets.token_bytes(32),
        segment_size=1 << 20,
        created_at=T0,
        created_by="app:his",
        supersedes_version=None if version == 1 else version - 1,
    )
    return replace(row, **changes)  # type: ignore[arg-type]


def list_all(store: MetadataStore, **kw: object) -> list[StoredRecord]:
    """Every page of a listing, following the cursor, two rows at a time."""
    args: dict[str, object] = {
        "kind": None,
        "created_after": None,
        "created_before": None,
        "all_versions": False,
    }
    args.update(kw)
    rows: list[StoredRecord] = []
    cursor: ListCursor | None = None
    while True:
        page = store.list(PATIENT, after=cursor, limit=2, **args)  # type: ignore[arg-type]
        assert len(page) <= 2
        rows.extend(page)
        if len(page) < 2:
            return rows
        last = page[-1]
        cursor = ListCursor(created_at=last.created_at, id=last.id, version=last.version)


def test_insert_then_get_round_trips_every_field(metadata_store: SqlMetadataStore) -> None:
    row = make_row(supersedes_version=None)
    metadata_store.insert(row)
    got = metadata_store.get(row.id)
    assert got == row
    assert got.created_at.tzinfo is not None
    assert got.created_at.utcoffset() == timedelta(0)


def test_time_in_another_zone_comes_back_as_the_same_instant_in_utc(
    metadata_store: SqlMetadataStore,
) -> None:
    cet = timezone(timedelta(hours=1))
    row = make_row(created_at=datetime(2024, 3, 1, 13, 0, tzinfo=cet))
    metadata_store.insert(row)
    got = metadata_store.get(row.id)
    assert got.created_at == datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    assert got.created_at.tzinfo == UTC


def test_naive_time_is_refused(metadata_store: SqlMetadataStore) -> None:
    with pytest.raises(InvalidRecordError, match="created_at"):
        metadata_store.insert(make_row(created_at=datetime(2024, 3, 1)))  # naive on purpose


def test_get_latest_and_specific_version(metadata_store: SqlMetadataStore) -> None:
    v1 = make_row("rec-1", 1)
    v2 = make_row("rec-1", 2, created_at=T0 + timedelta(hours=1))
    metadata_store.insert(v1)
    metadata_store.insert(v2)
    assert metadata_store.get("rec-1") == v2
    assert metadata_store.get("rec-1", 1) == v1
    assert metadata_store.get("rec-1", 2) == v2


def test_unknown_record_or_version_is_not_found(metadata_store: SqlMetadataStore) -> None:
    metadata_store.insert(make_row("rec-1"))
    with pytest.raises(RecordNotFoundError):
        metadata_store.get("no-such-record")
    with pytest.raises(RecordNotFoundError):
        metadata_store.get("rec-1", 2)


def test_duplicate_version_conflicts(metadata_store: SqlMetadataStore) -> None:
    metadata_store.insert(make_row("rec-1", 1))
    with pytest.raises(RecordConflictError):
        metadata_store.insert(make_row("rec-1", 1))
    assert metadata_store.get("rec-1").version == 1


def test_reused_object_key_conflicts(metadata_store: SqlMetadataStore) -> None:
    first = make_row()
    metadata_store.insert(first)
    with pytest.raises(RecordConflictError):
        metadata_store.insert(make_row(object_key=first.object_key))


def _five_rows() -> list[StoredRecord]:
    """Rows in expected listing order (newest first; ties by id, then version, desc)."""
    later = T0 + timedelta(minutes=5)
    return [
        make_row("rec-c", 1, created_at=later),
        make_row("rec-b", 1, created_at=later),  # same instant: id breaks the tie
        make_row("rec-a", 1, created_at=T0 + timedelta(minutes=3), kind="PDF"),
        make_row("rec-d", 1, created_at=T0 + timedelta(minutes=1)),
        make_row("rec-e", 1, created_at=T0, kind="PDF"),
    ]


def test_list_pages_newest_first_with_cursor(metadata_store: SqlMetadataStore) -> None:
    expected = _five_rows()
    for row in reversed(expected):
        metadata_store.insert(row)
    metadata_store.insert(make_row("rec-x", patient_index=OTHER_PATIENT))
    assert list_all(metadata_store) == expected


def test_list_filters_by_kind_and_time(metadata_store: SqlMetadataStore) -> None:
    rows = _five_rows()
    for row in rows:
        metadata_store.insert(row)
    assert list_all(metadata_store, kind="PDF") == [rows[2], rows[4]]
    # created_after is inclusive, created_before exclusive.
    window = list_all(
        metadata_store,
        created_after=T0 + timedelta(minutes=1),
        created_before=T0 + timedelta(minutes=5),
    )
    assert window == [rows[2], rows[3]]


def test_list_latest_versions_only_unless_all_versions(metadata_store: SqlMetadataStore) -> None:
    v1 = make_row("rec-1", 1, created_at=T0)
    v2 = make_row("rec-1", 2, created_at=T0 + timedelta(minutes=2))
    v3 = make_row("rec-1", 3, created_at=T0 + timedelta(minutes=4))
    other = make_row("rec-2", 1, created_at=T0 + timedelta(minutes=3))
    for row in (v1, v2, v3, other):
        metadata_store.insert(row)
    assert list_all(metadata_store) == [v3, other]
    assert list_all(metadata_store, all_versions=True) == [v3, other, v2, v1]


def test_list_refuses_a_non_positive_limit(metadata_store: SqlMetadataStore) -> None:
    with pytest.raises(InvalidRecordError, match="limit"):
        metadata_store.list(
            PATIENT,
            kind=None,
            created_after=None,
            created_before=None,
            all_versions=False,
            after=None,
            limit=0,
        )


def test_referenced_returns_the_keys_rows_point_to(metadata_store: SqlMetadataStore) -> None:
    rows = [make_row() for _ in range(3)]
    for row in rows:
        metadata_store.insert(row)
    known = {r.object_key for r in rows[:2]}
    unknown = {f"obj/{secrets.token_hex(8)}" for _ in range(600)}  # more than one batch
    assert metadata_store.referenced([*known, *unknown]) == known
    assert metadata_store.referenced([]) == set()


def test_upgrade_is_idempotent(metadata_engine: Engine) -> None:
    upgrade(metadata_engine)
    upgrade(metadata_engine)
    with metadata_engine.connect() as connection:
        heads = connection.execute(sa.text("SELECT version_num FROM alembic_version")).all()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert [h[0] for h in heads] == [head]


def test_fresh_database_migrates_to_head(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/fresh.db")
    try:
        upgrade(engine)
        store = SqlMetadataStore(engine)
        row = make_row()
        store.insert(row)
        assert store.get(row.id) == row
    finally:
        engine.dispose()


def test_unreachable_postgresql_is_backend_unavailable() -> None:
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    try:
        with pytest.raises(BackendUnavailableError, match=r"127\.0\.0\.1:1") as info:
            SqlMetadataStore(engine).get("rec-1")
        assert "rec-1" not in str(info.value)
        # Nothing was sent: a write that failed so committed nothing (storage.record_writer).
        assert isinstance(info.value, DatabaseUnreachableError)
    finally:
        engine.dispose()


def test_a_connection_pool_with_no_free_connection_is_backend_unavailable(
    tmp_path: Path,
) -> None:
    """Every connection busy past the pool's timeout: UNAVAILABLE for the caller, not an
    unmapped error (which the service would report as INTERNAL)."""
    engine = sa.create_engine(
        f"sqlite:///{tmp_path / 'busy.db'}", pool_size=1, max_overflow=0, pool_timeout=0.1
    )
    try:
        held = engine.connect()  # the only connection
        with held, pytest.raises(BackendUnavailableError, match="busy") as info:
            SqlMetadataStore(engine).get("rec-1")
        assert not isinstance(info.value, DatabaseUnreachableError)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("default", "expected"), [("off", "on"), ("local", "local"), ("remote_apply", "remote_apply")]
)
def test_postgresql_sessions_never_acknowledge_a_commit_before_it_is_durable(
    postgres_admin: Engine, default: str, expected: str
) -> None:
    """Attack (an operator's tuning, or a database writer's ALTER DATABASE): with
    ``synchronous_commit=off`` PostgreSQL acknowledges a COMMIT before its WAL is flushed,
    so a crash loses commits already answered: audit events of reads whose data has left,
    rows of puts acknowledged to their callers (whose objects are tagged and never swept).
    The service's sessions turn ``off`` back on; a stronger setting (synchronous
    replication) or ``local`` (flushed here) is kept."""
    name = f"medvault_t_{secrets.token_hex(6)}"
    with postgres_admin.connect() as c:  # a random hex name and a fixed value: no injection
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        c.execute(sa.text(f'ALTER DATABASE "{name}" SET synchronous_commit = {default}'))
    engine = make_engine(
        postgres_admin.url.set(database=name).render_as_string(hide_password=False)
    )
    try:
        for _ in range(2):  # a fresh connection, then one back from the pool
            with engine.connect() as c:
                assert c.execute(sa.text("SHOW synchronous_commit")).scalar() == expected
                c.rollback()  # the setting is the session's, not the transaction's
    finally:
        engine.dispose()
        with postgres_admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
