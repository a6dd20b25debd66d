"""A value of another type than its column's is a forged row, not an outage.

SQLite keeps any value in any column whatever its declared type, and a PostgreSQL
writer can change a column's type. The stores used to coerce what the driver returned:
``bytes()`` of an integer in a binary column allocates that many bytes (10**12 here: a
MemoryError, or with a smaller integer that much memory for one row), ``int()`` of
text raised with the text in its message, and text used as a number (or bytes as text)
ended in an internal error. Rows are now read strictly (``storage.row_values``), and
such a row takes its store's tampered path: a record row is ``RowTamperedError``
(reported), a grant grants nothing (reported), a review does not count, a signature
does not unseal, the rewrap and the reseal count the row as failed and finish, a
request key is refused as reused. Other rows read as before.

The forged values are synthetic and distinctive (``SYNTHETIC-FORGED``), so that a test
can assert no message carries them.
"""

from __future__ import annotations

import resource
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11KeyWrapper, Pkcs11SessionPool
from storage.errors import IntegrityError, RequestReusedError, SchemaRevisionError
from storage.grant_seal import GrantSealer
from storage.grants import REVIEW_ALTERED_MARK, SqlGrantStore
from storage.kek import RewrapJob
from storage.model import NewRecord, RecordKind, RecordQuery
from storage.put_requests import SqlPutRequests
from storage.records import RecordStore
from storage.reseal import LegacyResealer
from storage.row_auth import RowTamperedError
from storage.signatures import SignatureStore
from storage.sql_metadata import SqlMetadataStore, make_engine, upgrade
from tests.fixtures.databases import new_database
from tests.fixtures.seaweed import S3Bucket
from tests.integration.storage.test_forged_text import (  # noqa: F401 - fixtures
    CONTENT,
    STEPS,
    T0,
    Grants,
    Records,
    admit_all,
    engine,
    forge,
    grants,
    new_patient,
    records,
    signed_record,
)

pytestmark = pytest.mark.integration
# ruff: noqa: F811  (the fixtures imported above are the parameters)

HUGE = str(10**12)  # bytes() of it: a terabyte
FORGED = "'SYNTHETIC-FORGED'"  # text where an integer belongs
AS_BLOB = "CAST({column} AS BLOB)"  # the column's own text, as bytes
# Peak RSS may grow by this much while a forged row is read (pages of the reads
# themselves); a forged integer's allocation is orders of magnitude more.
MEMORY_BOUND = 64 << 20


@contextmanager
def bounded_memory() -> Iterator[None]:
    """The process's peak RSS grows by less than ``MEMORY_BOUND`` in the block."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < MEMORY_BOUND, f"peak RSS grew by {grown} bytes"


def _value(column: str, forged: str) -> str:
    return forged.format(column=column)


def write_raw(engine: Engine, sql: str, params: dict[str, object]) -> None:
    """What a database writer does with the sqlite3 shell: no foreign keys enforced."""
    connection = sqlite3.connect(engine.url.database or "")
    try:
        with connection:
            connection.execute(sql, params)
    finally:
        connection.close()


# --- records ---------------------------------------------------------------------------

RECORD_VALUES = {
    "patient_index": HUGE, "sealed_meta": HUGE, "wrapped_dek": HUGE,
    "ciphertext_sha256": HUGE, "version": FORGED, "kek_version": FORGED, "size": "X'01'",
    "stored_size": FORGED, "segment_size": "2.5", "supersedes_version": FORGED,
    "kind": AS_BLOB, "content_type": AS_BLOB, "object_key": AS_BLOB, "created_by": AS_BLOB,
}  # fmt: skip


@pytest.mark.backend("sqlite")
@pytest.mark.parametrize("column", sorted(RECORD_VALUES))
def test_a_record_row_holding_another_type_is_tampered(records: Records, column: str) -> None:
    patient = new_patient()
    forged, kept = records.put(patient), records.put(patient)
    forge(records.engine, "records", column, ("id", forged), _value(column, RECORD_VALUES[column]))
    resource_name = f"record/{forged}/v{0 if column == 'version' else 1}"
    reads: list[Callable[[], object]] = [
        lambda: records.store.stat(forged), lambda: records.store.open(forged)
    ]
    if column != "patient_index":  # listed under the patient it names: no longer this one
        reads.append(lambda: records.store.list(RecordQuery(patient)))
    with bounded_memory():
        for read in reads:
            with pytest.raises(RowTamperedError) as raised:
                read()
            assert raised.value.resource == resource_name
            assert "SYNTHETIC" not in str(raised.value)
    assert records.tampered == [resource_name] * len(reads)  # each refusal reported
    assert b"".join(records.store.open(kept).content) == CONTENT
    if column == "patient_index":
        assert [r.id for r in records.store.list(RecordQuery(patient))[0]] == [kept]


# --- grants ----------------------------------------------------------------------------

GRANT_VALUES = {
    "patient_index": HUGE, "mac": HUGE, "sealed_reason": HUGE,
    "principal": AS_BLOB, "granted_by": AS_BLOB, "expires_at": "X'00'",
}  # fmt: skip


@pytest.mark.backend("sqlite")
@pytest.mark.parametrize("column", sorted(GRANT_VALUES))
def test_a_grant_row_holding_another_type_grants_nothing(grants: Grants, column: str) -> None:
    patient = secrets.token_bytes(32)
    victim = grants.store.break_glass(patient, "dr.forged", "synthetic", timedelta(hours=1), T0)
    kept = grants.store.grant(patient, "dr.kept", "clerk.one", None, T0)
    forge(grants.engine, "access_grants", column, ("id", victim.id),
          _value(column, GRANT_VALUES[column]))  # fmt: skip
    with bounded_memory():
        assert grants.store.has_access("dr.forged", patient, T0) is None
        assert [g.id for g in grants.store.list(patient, None, True, T0)] == [kept.id]
        assert grants.store.list(None, "dr.forged", True, T0) == []
        queue = grants.store.break_glass_queue(include_reviewed=True)
        opened = grants.store.list_opened(patient, None, True, T0)
    assert victim.id not in [g.id for g in queue]
    assert victim.id in grants.forged  # reported (an incident)
    if column != "patient_index":  # listed for the officer, as altered
        assert sorted(altered for _, altered in opened) == [False, True]
    assert grants.store.has_access("dr.kept", patient, T0) == kept


@pytest.mark.backend("sqlite")
@pytest.mark.parametrize(("column", "value"), [
    ("sealed_comment", HUGE), ("reviewed_by", AS_BLOB), ("reviewed_at", "X'00'"),
])  # fmt: skip
def test_a_review_holding_another_type_does_not_count(
    grants: Grants, column: str, value: str
) -> None:
    patient = secrets.token_bytes(32)
    glass = grants.store.break_glass(patient, "dr.glass", "synthetic", timedelta(hours=1), T0)
    grants.store.review(glass.id, "officer.one", "synthetic comment", T0)
    forge(grants.engine, "access_grants", column, ("id", glass.id), _value(column, value))
    with bounded_memory():
        pending = grants.store.break_glass_queue(include_reviewed=False)
    (shown,) = [g for g in pending if g.id == glass.id]
    assert shown.review_comment == REVIEW_ALTERED_MARK
    assert shown.reason == "synthetic"  # the grant itself is authentic
    assert glass.id in grants.forged


@pytest.mark.backend("sqlite")
def test_a_revocation_holding_another_type_still_revokes(grants: Grants) -> None:
    """Revocation is not authenticated (it only takes access away): its columns read as
    placeholders, and a revocation time that is not a time has taken effect."""
    patient = secrets.token_bytes(32)
    cared = grants.store.grant(patient, "dr.care", "clerk.one", None, T0)
    grants.store.revoke(cared.id, "clerk.one", T0)
    forge(grants.engine, "access_grants", "revoked_by", ("id", cared.id), "X'00'")
    (listed,) = [g for g in grants.store.list(patient, None, True, T0) if g.id == cared.id]
    assert (listed.revoked_by, listed.active(T0)) == ("", False)
    live = grants.store.grant(patient, "dr.live", "clerk.one", None, T0)
    forge(grants.engine, "access_grants", "revoked_at", ("id", live.id), HUGE)
    assert grants.store.has_access("dr.live", patient, T0) is None


# --- signatures ------------------------------------------------------------------------

SIGNATURE_VALUES = {
    "sealed_p7s": HUGE, "version": FORGED, "signer": AS_BLOB, "algorithm": AS_BLOB,
    "certificate_subject": AS_BLOB,
}  # fmt: skip


@pytest.mark.backend("sqlite")
@pytest.mark.parametrize("column", sorted(SIGNATURE_VALUES))
def test_a_signature_row_holding_another_type_does_not_unseal(
    records: Records, column: str
) -> None:
    signatures = SignatureStore(records.store, records.engine)
    record_id, signature_id = signed_record(records, signatures)
    other_record, other_signature = signed_record(records, signatures)
    value = _value(column, SIGNATURE_VALUES[column])
    write_raw(records.engine, f"UPDATE record_signatures SET {column} = {value} WHERE id = :id",
              {"id": signature_id})  # fmt: skip
    opened = signatures.open(record_id, None, admit=admit_all, content=False)
    with bounded_memory():
        if column == "version":  # no longer this version's signature: not listed
            assert opened.signatures() == []
        else:
            with pytest.raises(IntegrityError):
                opened.signatures()
        with pytest.raises(IntegrityError) as raised:
            signatures.get(signature_id, admit=admit_all)
    assert "SYNTHETIC" not in str(raised.value)
    (kept,) = signatures.open(other_record, None, admit=admit_all, content=False).signatures()
    assert kept.id == other_signature
    assert signatures.get(other_signature, admit=admit_all)[1].p7s == b"p7s"


# --- the rewrap and the legacy reseal --------------------------------------------------


@pytest.mark.backend("sqlite")
def test_the_rewrap_counts_rows_of_another_type_as_failed_and_finishes(
    records: Records, keystore_pool: Pkcs11SessionPool
) -> None:
    """Below KEK version 1 (which no genuine row is): a huge integer as the wrapped key,
    text as the version, a real as the KEK version."""
    forgeries = ["kek_version = 0, wrapped_dek = " + HUGE, f"kek_version = 0, version = {FORGED}",
                 "kek_version = 0.5"]  # fmt: skip
    forged = [records.put(new_patient()) for _ in forgeries]
    for record_id, change in zip(forged, forgeries, strict=True):
        write_raw(records.engine, f"UPDATE records SET {change} WHERE id = :id", {"id": record_id})
    job = RewrapJob(records.engine, Pkcs11KeyWrapper(keystore_pool), 1, 0, batch_size=1)
    job.remaining = len(forged)
    with bounded_memory():
        for _ in range(STEPS):
            if job.done:
                break
            job.step()
    assert job.done, "the rewrap never finished"
    assert set(forged) <= {record_id for record_id, _ in job.failed_ids}
    assert job.progress().failed == len(job.failed_ids) >= len(forged)


@pytest.mark.backend("sqlite")
def test_the_legacy_reseal_counts_rows_of_another_type_as_failed_and_finishes(
    records: Records,
) -> None:
    """An integer sorts before every blob in SQLite, so a huge one as sealed metadata
    reads as a legacy (v1) row; text as the version of a v1 row."""
    huge, texted = records.put(new_patient()), records.put(new_patient())
    forge(records.engine, "records", "sealed_meta", ("id", huge), HUGE)
    write_raw(records.engine, f"UPDATE records SET sealed_meta = X'01', version = {FORGED} "
              "WHERE id = :id", {"id": texted})  # fmt: skip
    asked: list[tuple[str, int]] = []

    def upgrade_sealed(record_id: str, version: int) -> bool:
        asked.append((record_id, version))
        return records.store.upgrade_sealed(record_id, version)

    resealer = LegacyResealer(records.engine, upgrade_sealed)
    with bounded_memory():
        for _ in range(STEPS):
            if resealer.finished:
                break
            resealer.step(batch_size=1)
    assert resealer.finished, "the reseal never finished"
    assert {huge, texted} <= {record_id for record_id, _ in resealer.failed}
    assert texted not in {record_id for record_id, _ in asked}  # its version is not one
    assert f"record/{huge}/v1" in records.tampered  # looked up, refused, reported


# --- put_requests ----------------------------------------------------------------------


@pytest.mark.backend("sqlite")
@pytest.mark.parametrize(("column", "value"), [("version", FORGED), ("record_id", AS_BLOB)])
def test_a_request_key_of_another_type_is_refused_as_reused(
    records: Records, s3_bucket: S3Bucket, keystore_pool: Pkcs11SessionPool,
    column: str, value: str,
) -> None:  # fmt: skip
    store = RecordStore(
        s3_bucket.store, SqlMetadataStore(records.engine), Pkcs11KeyWrapper(keystore_pool),
        Pkcs11BlindIndexer(keystore_pool), requests=SqlPutRequests(records.engine),
    )  # fmt: skip
    patient = new_patient()
    request_id = f"req-{secrets.token_hex(8)}"
    header = NewRecord(patient, RecordKind.OTHER, "application/octet-stream", title="synth",
                       request_id=request_id)  # fmt: skip
    first = store.put(header, [CONTENT], "test-app")
    assert store.put(header, [CONTENT], "test-app").id == first.id  # a replay, before
    forge(records.engine, "put_requests", column, ("request_id", request_id),
          _value(column, value))  # fmt: skip
    with pytest.raises(RequestReusedError) as raised:
        store.put(header, [CONTENT], "test-app")
    assert "SYNTHETIC" not in str(raised.value)
    assert [r.id for r in store.list(RecordQuery(patient))[0]] == [first.id]  # nothing stored


# --- the schema revision, and PostgreSQL columns whose type was changed ----------------


@pytest.fixture
def own_engine(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """A database of this test only, schema at head (its schema gets altered)."""
    for url in new_database(request, database_url, tmp_path_factory, migrated=True):
        own = make_engine(url)
        upgrade(own)
        yield own
        own.dispose()


@pytest.fixture
def own_records(
    own_engine: Engine, s3_bucket: S3Bucket, keystore_pool: Pkcs11SessionPool
) -> Records:
    """A record store on ``own_engine``."""
    tampered: list[str] = []
    store = RecordStore(
        s3_bucket.store, SqlMetadataStore(own_engine), Pkcs11KeyWrapper(keystore_pool),
        Pkcs11BlindIndexer(keystore_pool), on_tampered=lambda e: tampered.append(e.resource),
    )  # fmt: skip
    return Records(own_engine, store, tampered)


def _refused(engine: Engine, stamp: str) -> None:
    with engine.begin() as c:
        c.execute(sa.text(f"UPDATE alembic_version SET version_num = {stamp}"))
    with pytest.raises(SchemaRevisionError) as raised:
        upgrade(engine)
    message = str(raised.value)
    assert "alembic_version" in message
    for value in ("SYNTHETIC", "0099", "0013"):
        assert value not in message


@pytest.mark.parametrize("stamp", [FORGED, "'0099'"])  # edited; a newer release's
def test_an_unknown_schema_revision_refuses_start_up_naming_the_table(
    own_engine: Engine, stamp: str
) -> None:
    """Alembic's own error named the stored value (in a logged traceback)."""
    _refused(own_engine, stamp)


@pytest.mark.backend("sqlite")
def test_a_schema_revision_stored_as_bytes_refuses_start_up(own_engine: Engine) -> None:
    """The head's revision as a blob: not at head, and not a revision either."""
    _refused(own_engine, "CAST(version_num AS BLOB)")


ALTERED = {
    "patient_index": f"bigint USING {HUGE}",
    "kek_version": "text",
    "created_by": "bytea USING convert_to(created_by, 'UTF8')",
    "created_at": "text",
}  # fmt: skip


@pytest.mark.backend("postgresql")
@pytest.mark.parametrize("column", sorted(ALTERED))
def test_a_postgresql_column_of_another_type_makes_its_rows_tampered(
    own_records: Records, column: str
) -> None:
    record_id = own_records.put(new_patient())
    with own_records.engine.begin() as c:
        c.execute(sa.text(f"ALTER TABLE records ALTER COLUMN {column} TYPE {ALTERED[column]}"))
    with bounded_memory(), pytest.raises(RowTamperedError) as raised:
        own_records.store.stat(record_id)
    assert raised.value.resource == f"record/{record_id}/v1"
    assert own_records.tampered == [raised.value.resource]


# Integers no KEK version is (the token numbers from 1; the column is 32 bits). SQLite
# keeps any integer in an INTEGER column; a PostgreSQL writer retypes it to go past 2^31.
KEK_OUT_OF_RANGE = ("0", "-1", "2147483648")


@pytest.mark.parametrize("kek_version", KEK_OUT_OF_RANGE)
def test_a_record_kek_version_out_of_range_is_tampered_not_a_missing_key(
    own_records: Records, kek_version: str
) -> None:
    """Was the token's KeyNotFoundError (FAILED_PRECONDITION: "restore the token from
    its backup", naming the forged number), sending the operator after the token."""
    patient = new_patient()
    forged, kept = own_records.put(patient), own_records.put(patient)
    with own_records.engine.begin() as c:
        if own_records.engine.dialect.name == "postgresql":
            c.exec_driver_sql("ALTER TABLE records ALTER COLUMN kek_version TYPE bigint")
        c.execute(sa.text(f"UPDATE records SET kek_version = {kek_version} WHERE id = :id"),
                  {"id": forged})  # fmt: skip
    for read in (lambda: own_records.store.stat(forged),
                 lambda: own_records.store.list(RecordQuery(patient))):  # fmt: skip
        with pytest.raises(RowTamperedError) as raised:  # DATA_LOSS
            read()
        assert raised.value.resource == f"record/{forged}/v1"
        assert kek_version not in str(raised.value)
    assert own_records.tampered == [f"record/{forged}/v1"] * 2
    assert b"".join(own_records.store.open(kept).content) == CONTENT


@pytest.mark.parametrize("kek_version", ["0", "-1"])
def test_the_rewrap_counts_a_kek_version_out_of_range_as_failed_and_finishes(
    own_records: Records, keystore_pool: Pkcs11SessionPool, kek_version: str
) -> None:
    """The job stopped on the token's KeyNotFoundError ("KEK version 0 does not exist")."""
    forged = own_records.put(new_patient())
    forge(own_records.engine, "records", "kek_version", ("id", forged), kek_version)
    job = RewrapJob(own_records.engine, Pkcs11KeyWrapper(keystore_pool), 1, 0, batch_size=1)
    job.remaining = 1
    for _ in range(STEPS):
        if job.done:
            break
        job.step()
    assert job.done, "the rewrap never finished"
    assert {record_id for record_id, _ in job.failed_ids} == {forged}


@pytest.mark.backend("postgresql")
def test_a_postgresql_grant_mac_of_another_type_grants_nothing(
    own_engine: Engine, keystore_pool: Pkcs11SessionPool
) -> None:
    forged: list[str] = []
    store = SqlGrantStore(own_engine, GrantSealer(Pkcs11BlindIndexer(keystore_pool)), forged.append)
    patient = secrets.token_bytes(32)
    grant = store.grant(patient, "dr.altered", "clerk.one", None, T0)
    with own_engine.begin() as c:
        c.execute(sa.text(f"ALTER TABLE access_grants ALTER COLUMN mac TYPE bigint USING {HUGE}"))
    with bounded_memory():
        assert store.has_access("dr.altered", patient, T0) is None
    assert forged == [grant.id]
