"""Text that is not UTF-8 in a record, grant or signature row is a forged row, not an outage.

A database writer can store any bytes as text in SQLite (``CAST(X'41FF42' AS TEXT)``).
sqlite3 used to fail the whole fetch on them, with the bytes in its error: an outage of
the read and of every listing that met the row, the value in a logged traceback. Each
connection now reads them with the bytes replaced (``storage.sqlite_text``), so the row
reads as other text and takes the store's tampered path: a record row is
``RowTamperedError`` (DATA_LOSS, reported), a grant grants nothing and is reported, a
signature does not unseal (DATA_LOSS); the other rows read as before. Times are text in
SQLite too: one that does not parse reads as a time no genuine row holds.

SQLite only, but for one test: PostgreSQL refuses such text when it is written.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11KeyWrapper, Pkcs11SessionPool
from storage.errors import IntegrityError, RecordNotFoundError
from storage.grant_seal import GrantSealer
from storage.grants import REVIEW_ALTERED_MARK, SqlGrantStore
from storage.kek import RewrapJob
from storage.model import NewRecord, PatientRef, RecordKind, RecordQuery
from storage.records import RecordStore
from storage.reseal import LegacyResealer
from storage.row_auth import RowTamperedError
from storage.signatures import NewSignature, SignatureStore
from storage.sql_metadata import SqlMetadataStore, make_engine, run_in_transaction, upgrade
from storage.sqlite_text import UNREADABLE_TIME
from tests.fixtures.databases import new_database
from tests.fixtures.seaweed import S3Bucket

pytestmark = pytest.mark.integration

CONTENT = b"synthetic forged-text note " * 20
NOT_UTF8 = "CAST(X'41FF42' AS TEXT)"
TIME_NOT_UTF8 = "CAST(X'32FF' AS TEXT)"
ID_NOT_UTF8 = "CAST(X'FF' AS TEXT) || id"  # the same id behind a byte that is not UTF-8
T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture(scope="module")
def engine(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """A database of this module only, schema at head."""
    for url in new_database(request, database_url, tmp_path_factory):
        engine = make_engine(url)
        upgrade(engine)
        yield engine
        engine.dispose()


def forge(engine: Engine, table: str, column: str, where: tuple[str, str], value: str) -> None:
    """What a database writer does: one column of one row set to ``value`` (SQL)."""
    with engine.begin() as c:
        c.execute(sa.text(f"UPDATE {table} SET {column} = {value} WHERE {where[0]} = :key"),
                  {"key": where[1]})  # fmt: skip


# --- records ---------------------------------------------------------------------------


@dataclass
class Records:
    engine: Engine
    store: RecordStore
    tampered: list[str] = field(default_factory=list)

    def put(self, patient: PatientRef) -> str:
        header = NewRecord(patient, RecordKind.OTHER, "application/octet-stream", title="synth")
        return self.store.put(header, [CONTENT], "test-app").id


@pytest.fixture
def records(engine: Engine, s3_bucket: S3Bucket, keystore_pool: Pkcs11SessionPool) -> Records:
    tampered: list[str] = []
    store = RecordStore(
        s3_bucket.store, SqlMetadataStore(engine), Pkcs11KeyWrapper(keystore_pool),
        Pkcs11BlindIndexer(keystore_pool), on_tampered=lambda e: tampered.append(e.resource),
    )  # fmt: skip
    return Records(engine, store, tampered)


def new_patient() -> PatientRef:
    return PatientRef(f"SYNTH{secrets.token_hex(6)}", "urn:oid:2.999.1")


# Every text column a read trusts (the id: below).
RECORD_COLUMNS = {
    "kind": NOT_UTF8, "content_type": NOT_UTF8, "object_key": NOT_UTF8,
    "created_by": NOT_UTF8, "created_at": TIME_NOT_UTF8,
}  # fmt: skip


@pytest.mark.backend("sqlite")
@pytest.mark.parametrize("column", sorted(RECORD_COLUMNS))
def test_a_record_row_holding_text_that_is_not_utf8_is_tampered(
    records: Records, column: str
) -> None:
    patient = new_patient()
    forged, kept = records.put(patient), records.put(patient)
    forge(records.engine, "records", column, ("id", forged), RECORD_COLUMNS[column])
    resource = f"record/{forged}/v1"
    for read in (
        lambda: records.store.stat(forged),
        lambda: records.store.open(forged),
        lambda: records.store.list(RecordQuery(patient)),  # the page fails, as for any edit
    ):
        with pytest.raises(RowTamperedError) as raised:
            read()
        assert raised.value.resource == resource
    assert records.tampered == [resource] * 3  # each refusal reported (an incident)
    assert b"".join(records.store.open(kept).content) == CONTENT
    assert records.store.stat(kept).created_by == "test-app"
    other = new_patient()
    listed, _ = records.store.list(RecordQuery(other))
    assert listed == []
    records.put(other)
    assert len(records.store.list(RecordQuery(other))[0]) == 1


@pytest.mark.backend("sqlite")
def test_a_record_id_that_is_not_utf8_is_tampered_where_listed(records: Records) -> None:
    """The id is bound to the wrapped key: the row read under the replaced id fails."""
    patient = new_patient()
    forged, kept = records.put(patient), records.put(patient)
    forge(records.engine, "records", "id", ("id", forged), ID_NOT_UTF8)
    with pytest.raises(RecordNotFoundError):
        records.store.stat(forged)
    with pytest.raises(RowTamperedError) as raised:
        records.store.list(RecordQuery(patient))
    assert raised.value.resource == f"record/\ufffd{forged}/v1"
    assert records.tampered == [raised.value.resource]
    assert b"".join(records.store.open(kept).content) == CONTENT


@pytest.mark.backend("postgresql")
def test_postgresql_refuses_text_that_is_not_utf8(records: Records) -> None:
    record_id = records.put(new_patient())
    with pytest.raises(sa.exc.DataError):
        forge(records.engine, "records", "content_type", ("id", record_id),
               "convert_from('\\x41ff42', 'UTF8')")  # fmt: skip
    assert records.store.stat(record_id).content_type == "application/octet-stream"


# --- grants ----------------------------------------------------------------------------


@dataclass
class Grants:
    engine: Engine
    store: SqlGrantStore
    forged: list[str] = field(default_factory=list)


@pytest.fixture
def grants(engine: Engine, keystore_pool: Pkcs11SessionPool) -> Grants:
    forged: list[str] = []
    store = SqlGrantStore(engine, GrantSealer(Pkcs11BlindIndexer(keystore_pool)), forged.append)
    return Grants(engine, store, forged)


# Every text column the MAC covers, the times included.
GRANT_COLUMNS = {
    "id": ID_NOT_UTF8, "principal": NOT_UTF8, "granted_by": NOT_UTF8,
    "created_at": TIME_NOT_UTF8, "expires_at": TIME_NOT_UTF8,
}  # fmt: skip


@pytest.mark.backend("sqlite")
@pytest.mark.parametrize("column", sorted(GRANT_COLUMNS))
def test_a_grant_row_holding_text_that_is_not_utf8_grants_nothing(
    grants: Grants, column: str
) -> None:
    patient = secrets.token_bytes(32)
    victim = grants.store.grant(patient, "dr.forged", "clerk.one", T0 + timedelta(days=1), T0)
    kept = grants.store.grant(patient, "dr.kept", "clerk.one", None, T0)
    forge(grants.engine, "access_grants", column, ("id", victim.id), GRANT_COLUMNS[column])
    assert grants.store.has_access("dr.forged", patient, T0) is None
    assert [g.id for g in grants.store.list(patient, None, True, T0)] == [kept.id]
    reported = victim.id if column != "id" else f"\ufffd{victim.id}"
    assert reported in grants.forged
    opened = grants.store.list_opened(patient, None, True, T0)
    assert sorted(altered for _, altered in opened) == [False, True]  # shown, as altered
    assert grants.store.has_access("dr.kept", patient, T0) == kept


@pytest.mark.backend("sqlite")
def test_a_review_holding_text_that_is_not_utf8_does_not_count(grants: Grants) -> None:
    """The reviewer and time are bound to the sealed comment; ``revoked_by`` is not
    authenticated at all (revocation needs no token) and reads replaced."""
    patient = secrets.token_bytes(32)
    glass = grants.store.break_glass(patient, "dr.glass", "synthetic", timedelta(hours=1), T0)
    grants.store.review(glass.id, "officer.one", "synthetic comment", T0)
    forge(grants.engine, "access_grants", "reviewed_by", ("id", glass.id), NOT_UTF8)
    (pending,) = grants.store.break_glass_queue(include_reviewed=False)
    assert pending.id == glass.id
    assert pending.review_comment == REVIEW_ALTERED_MARK
    assert glass.id in grants.forged
    cared = grants.store.grant(patient, "dr.care", "clerk.one", None, T0)
    grants.store.revoke(cared.id, "clerk.one", T0)
    forge(grants.engine, "access_grants", "revoked_by", ("id", cared.id), NOT_UTF8)
    revoked = [g for g in grants.store.list(patient, None, True, T0) if g.id == cared.id]
    assert [g.revoked_by for g in revoked] == ["A\ufffdB"]


# --- signatures ------------------------------------------------------------------------


def admit_all(_: Any) -> None:
    """No access control in these storage-level tests."""


def signed_record(records: Records, signatures: SignatureStore) -> tuple[str, str]:
    """A record with one signature row (its .p7s synthetic: storage only seals it)."""
    record_id = records.put(new_patient())
    signed = signatures.open(record_id, None, admit=admit_all, content=False)
    new = NewSignature("dr-ec", "CN=dr-ec,O=synthetic", "ecdsa-p256-sha256", T0, b"p7s")
    signature_id, insert = signed.prepare(new)
    run_in_transaction(records.engine, insert, write=True)
    return record_id, signature_id


# Every column bound to the sealed .p7s that is text in SQLite.
SIGNATURE_COLUMNS = {
    "id": ID_NOT_UTF8, "signer": NOT_UTF8, "certificate_subject": NOT_UTF8,
    "algorithm": NOT_UTF8, "signing_time": TIME_NOT_UTF8,
}  # fmt: skip


@pytest.mark.backend("sqlite")
@pytest.mark.parametrize("column", sorted(SIGNATURE_COLUMNS))
def test_a_signature_row_holding_text_that_is_not_utf8_does_not_unseal(
    records: Records, column: str
) -> None:
    signatures = SignatureStore(records.store, records.engine)
    record_id, signature_id = signed_record(records, signatures)
    other_record, other_signature = signed_record(records, signatures)
    forge(records.engine, "record_signatures", column, ("id", signature_id),
           SIGNATURE_COLUMNS[column])  # fmt: skip
    with pytest.raises(IntegrityError):
        signatures.open(record_id, None, admit=admit_all, content=False).signatures()
    if column != "id":
        with pytest.raises(IntegrityError):
            signatures.get(signature_id, admit=admit_all)
    (kept,) = signatures.open(other_record, None, admit=admit_all, content=False).signatures()
    assert kept.id == other_signature
    assert signatures.get(other_signature, admit=admit_all)[1].p7s == b"p7s"


@pytest.mark.backend("sqlite")
def test_a_signature_time_not_bound_to_it_reads_as_the_placeholder(records: Records) -> None:
    """``created_at`` only orders a record's signatures: harmless, and no outage."""
    signatures = SignatureStore(records.store, records.engine)
    record_id, signature_id = signed_record(records, signatures)
    forge(records.engine, "record_signatures", "created_at", ("id", signature_id),
           TIME_NOT_UTF8)  # fmt: skip
    (read,) = signatures.open(record_id, None, admit=admit_all, content=False).signatures()
    assert read.created_at == UNREADABLE_TIME
    assert read.p7s == b"p7s"


# --- pagers that bind a row's id back --------------------------------------------------

FORGED_ID_LAST = "CAST(X'FF' AS TEXT) || id"  # sorts after every id medvault makes (hex)
STEPS = 20  # far more than the batches these tests need; a pager that repeats never ends


@pytest.mark.backend("sqlite")
def test_the_rewrap_pages_past_an_id_that_is_not_utf8(
    records: Records, keystore_pool: Pkcs11SessionPool
) -> None:
    """Its next batch starts past the id as stored: the replaced id, bound back, sorts
    before the stored bytes, and the last batch would start at the same row for ever."""
    forged = records.put(new_patient())
    with records.engine.begin() as c:  # the only row below version 1: this job's alone
        c.execute(sa.text(f"UPDATE records SET kek_version = 0, id = {FORGED_ID_LAST} "
                          "WHERE id = :key"), {"key": forged})  # fmt: skip
    job = RewrapJob(records.engine, Pkcs11KeyWrapper(keystore_pool), 1, 0, batch_size=1)
    job.remaining = 1
    for _ in range(STEPS):
        if job.done:
            break
        job.step()
    assert job.done, "the rewrap never finished"
    assert job.progress().failed == 1


@pytest.mark.backend("sqlite")
def test_the_legacy_reseal_pages_past_an_id_that_is_not_utf8(records: Records) -> None:
    forged = records.put(new_patient())
    with records.engine.begin() as c:  # a v1 blob (first byte 0x01): the only legacy row
        c.execute(sa.text(f"UPDATE records SET sealed_meta = X'01', id = {FORGED_ID_LAST} "
                          "WHERE id = :key"), {"key": forged})  # fmt: skip
    upgraded: list[str] = []

    def upgrade(record_id: str, version: int) -> bool:
        upgraded.append(record_id)
        return records.store.upgrade_sealed(record_id, version)

    resealer = LegacyResealer(records.engine, upgrade)
    for _ in range(STEPS):
        if resealer.finished:
            break
        resealer.step(batch_size=1)
    assert resealer.finished, "the reseal never finished"
    assert len(resealer.failed) == 1
    assert upgraded == []  # not looked up under a replaced id
