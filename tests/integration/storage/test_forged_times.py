"""A SQLite time respelled by a database writer: the same instant in text that sorts
otherwise (review 9b). SQL compares the text, a row's seal or MAC covers the instant;
a stored time is read only in the exact form medvault writes
(``storage.sqlite_text.exact_time_parser``), any other reads as the 1970 placeholder
(logged by table and column) and fails the row's verification. Grants:
``test_forged_grants``; the audit trail: ``test_audit_log``.

SQLite only: PostgreSQL stores timestamps, which have one form.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11KeyWrapper, Pkcs11SessionPool
from storage.model import NewRecord, PatientRef, RecordKind, RecordQuery
from storage.records import RecordStore
from storage.row_auth import RowTamperedError
from storage.sql_metadata import SqlMetadataStore, kek_versions, make_engine, records, upgrade
from storage.sqlite_text import UNREADABLE_TIME
from tests.fixtures.databases import new_database
from tests.fixtures.seaweed import S3Bucket
from tests.integration.storage.test_audit_log import audit_engine, audit_url  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.backend("sqlite")]

T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
# The instant T0 in other spellings fromisoformat accepts (medvault writes
# "2024-03-01 12:00:00.123456": SQLAlchemy's SQLite DATETIME, UTC, no offset).
RESPELLED = (
    "2024-03-01T12:00:00.123456",
    "2024-W09-5T12:00:00.123456",
    "2024-03-01 12:00:00.123456+00:00",
    "2024-03-01 11:59:58.123456-00:00:02",
    "2024-03-01 12:00:00.123456000",
    "20240301T120000.123456",
)


@pytest.fixture
def engine(audit_engine: Engine) -> Engine:  # noqa: F811  (the fixture imported above)
    """A database of this test only, schema at head (``test_audit_log``'s)."""
    return audit_engine


@pytest.fixture
def tampered() -> list[str]:
    return []


@pytest.fixture
def store(
    engine: Engine, s3_bucket: S3Bucket, keystore_pool: Pkcs11SessionPool, tampered: list[str]
) -> RecordStore:
    return RecordStore(
        s3_bucket.store, SqlMetadataStore(engine), Pkcs11KeyWrapper(keystore_pool),
        Pkcs11BlindIndexer(keystore_pool), on_tampered=lambda e: tampered.append(e.resource),
    )  # fmt: skip


def _write(engine: Engine, sql: str, **params: object) -> None:
    """What a database writer does (SQL on the file, no token)."""
    with engine.begin() as c:
        c.execute(sa.text(sql), params)


def _created_at(engine: Engine, record_id: str) -> object:
    with engine.connect() as c:
        query = sa.select(records.c.created_at).where(records.c.id == record_id)
        return c.execute(query).scalar_one()


def _put(store: RecordStore, patient: PatientRef) -> str:
    header = NewRecord(patient, RecordKind.OTHER, "application/octet-stream", title="synth")
    return store.put(header, [b"synthetic"], "test-app").id


def test_medvault_writes_the_form_it_reads(engine: Engine, store: RecordStore) -> None:
    patient = PatientRef(f"SYNTH{secrets.token_hex(6)}", "urn:oid:2.999.1")
    record_id = _put(store, patient)
    with engine.connect() as c:
        stored = c.exec_driver_sql("SELECT created_at FROM records WHERE id = ?", (record_id,))
        text = stored.scalar_one()
    created = store.stat(record_id).created_at  # verified: the seal covers it
    assert _created_at(engine, record_id) == created.replace(tzinfo=None)  # naive UTC
    assert text == f"{created:%Y-%m-%d %H:%M:%S.%f}"  # WRITTEN's form


@pytest.mark.parametrize("text", RESPELLED)
def test_a_respelled_time_reads_as_the_placeholder_and_is_logged_without_it(
    engine: Engine, store: RecordStore, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert datetime.fromisoformat(text).astimezone(UTC) == T0  # the same instant
    patient = PatientRef(f"SYNTH{secrets.token_hex(6)}", "urn:oid:2.999.1")
    record_id = _put(store, patient)
    _write(engine, "UPDATE records SET created_at = :t WHERE id = :id", t=text, id=record_id)
    with caplog.at_level(logging.WARNING, logger="storage.sqlite_text"):
        assert _created_at(engine, record_id) == UNREADABLE_TIME
    assert [r.getMessage() for r in caplog.records] == [
        "stored time on records.created_at is not in the form medvault writes (written "
        "outside medvault); read as the 1970 placeholder, the row does not verify"
    ]
    with pytest.raises(RowTamperedError):
        store.stat(record_id)


def _offset_text(when: datetime, behind: timedelta) -> str:
    """``when`` written in a zone ``behind`` UTC (seconds): the same instant, earlier text."""
    local = (when - behind).replace(tzinfo=None)
    seconds = int(behind.total_seconds())
    zone = f"{seconds // 3600:02}:{seconds // 60 % 60:02}:{seconds % 60:02}"
    return f"{local:%Y-%m-%d %H:%M:%S.%f}-{zone}"


def test_a_record_time_in_another_zone_fails_the_listing_instead_of_paging_for_ever(
    engine: Engine, store: RecordStore, tampered: list[str]
) -> None:
    patient = PatientRef(f"SYNTH{secrets.token_hex(6)}", "urn:oid:2.999.1")
    oldest, a, f = (_put(store, patient) for _ in range(3))
    t_a, t_f = store.stat(a).created_at, store.stat(f).created_at
    # f's instant, written so its text sorts just below a's; oldest's, below both.
    behind = timedelta(seconds=int((t_f - t_a).total_seconds()) + 1)
    _write(engine, "UPDATE records SET created_at = :t WHERE id = :id",
           t=_offset_text(t_f, behind), id=f)  # fmt: skip
    low = _offset_text(store.stat(oldest).created_at, timedelta(hours=23))
    _write(engine, "UPDATE records SET created_at = :t WHERE id = :id", t=low, id=oldest)
    page, token = store.list(RecordQuery(patient, page_size=1))
    assert [r.id for r in page] == [a]
    with pytest.raises(RowTamperedError) as failed:  # the page holding f: DATA_LOSS
        store.list(RecordQuery(patient, page_size=1, page_token=token))
    assert failed.value.record_id == f
    assert tampered  # reported (an incident in the service)


def test_migration_0014_gives_the_times_0005_wrote_their_fraction(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """0005 registered KEK versions with SQLite's CURRENT_TIMESTAMP (no fraction)."""
    for url in new_database(request, database_url, tmp_path_factory):
        engine = make_engine(url)
        try:
            upgrade(engine, "0013")
            _write(engine, "INSERT INTO kek_versions (version, state, created_at) "
                           "VALUES (1, 'active', CURRENT_TIMESTAMP)")  # fmt: skip
            upgrade(engine)
            with engine.connect() as c:
                created = c.execute(sa.select(kek_versions.c.created_at)).scalar_one()
            assert created != UNREADABLE_TIME
            assert abs(created.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(hours=1)
        finally:
            engine.dispose()
