"""A PostgreSQL value psycopg cannot load makes only its own row forged, in every store.

A ``timestamptz`` holds ``infinity``, ``-infinity`` and years up to 294276 or BC, which
Python's datetime cannot; a retyped column can hold an interval past ``timedelta``.
psycopg failed the whole fetch on the first such value, so one forged row (``UPDATE
access_grants SET expires_at = 'infinity'``) made every read that fetched it an outage
(a grant listing, the officer's views, a patient's records, a signature listing, the
scheduler's claim) and put the value in the chained error. The stores now read under
``storage.pg_loads.lenient_loads``: the value reads as ``UNLOADABLE``, the strict reads
(``storage.row_values``) name the column, and the row takes its store's tampered path
while the other rows read. Not the value anywhere: error, logs or output.

PostgreSQL only: SQLite keeps times as text (``test_forged_times``, ``test_forged_text``).
Audit rows: ``test_audit_log``, ``test_audit_pg_retyped``; KEK rows:
``tests/integration/keys/test_forged_kek_versions.py``.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11KeyWrapper, Pkcs11SessionPool
from storage.errors import IntegrityError, RequestReusedError
from storage.grants import REVIEW_ALTERED_MARK
from storage.model import NewRecord, RecordKind, RecordQuery
from storage.pg_loads import UNLOADABLE, lenient_loads
from storage.put_requests import SqlPutRequests
from storage.records import RecordStore
from storage.row_auth import RowTamperedError
from storage.signatures import SignatureStore
from storage.sql_metadata import SqlMetadataStore
from storage.sqlite_text import UNREADABLE_TIME
from storage.work_ledger import WorkLedger
from storage.work_seal import WorkSealer
from tests.fixtures.seaweed import S3Bucket
from tests.integration.storage.test_audit_log import PG_OUT_OF_RANGE
from tests.integration.storage.test_forged_text import (  # noqa: F401 - fixtures
    CONTENT,
    T0,
    Grants,
    Records,
    admit_all,
    engine,
    grants,
    new_patient,
    records,
    signed_record,
)
from tests.integration.storage.test_forged_types import own_engine  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration, pytest.mark.backend("postgresql")]
# ruff: noqa: F811  (the fixtures imported above are the parameters)


def forge_time(engine: Engine, table: str, column: str, key: tuple[str, str], value: str) -> None:
    """What a database writer does: one time of one row set to ``value`` (SQL)."""
    with engine.begin() as c:
        c.execute(sa.text(f"UPDATE {table} SET {column} = CAST(:value AS timestamptz) "
                          f"WHERE {key[0]} = :key"), {"value": value, "key": key[1]})  # fmt: skip


def needles(value: str) -> list[str]:
    """Texts of ``value`` an error or a log line would show: whole, and its date."""
    return [value.lower(), value.split(maxsplit=1)[0].lower(), "infinity"]


def assert_nowhere(
    value: str,
    errors: Iterable[BaseException],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``value`` is in no error (nor any error it chains), log record or output."""
    texts = [caplog.text, *capsys.readouterr()]
    texts += [r.getMessage() + repr(r.__dict__) for r in caplog.records]
    for error in errors:
        seen: BaseException | None = error
        while seen is not None:
            texts += [str(seen), repr(seen)]
            seen = seen.__cause__ or seen.__context__
    for text in texts:
        for needle in needles(value):
            assert needle not in text.lower()


# --- records ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", PG_OUT_OF_RANGE)
def test_a_record_time_psycopg_cannot_load_is_that_record_tampered(
    records: Records,
    value: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    patient, other = new_patient(), new_patient()
    forged, kept = records.put(patient), records.put(patient)
    elsewhere = records.put(other)
    forge_time(records.engine, "records", "created_at", ("id", forged), value)
    resource = f"record/{forged}/v1"
    errors = []
    with caplog.at_level(logging.DEBUG):
        for read in (
            lambda: records.store.stat(forged),
            lambda: records.store.open(forged),
            lambda: records.store.list(RecordQuery(patient)),  # the page fails, as for any edit
        ):
            with pytest.raises(RowTamperedError) as raised:
                read()
            assert raised.value.resource == resource
            errors.append(raised.value)
        assert b"".join(records.store.open(kept).content) == CONTENT
        assert [r.id for r in records.store.list(RecordQuery(other))[0]] == [elsewhere]
    assert records.tampered == [resource] * 3  # each refusal reported (an incident)
    assert_nowhere(value, errors, caplog, capsys)


# --- grants ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", PG_OUT_OF_RANGE)
@pytest.mark.parametrize("column", ["created_at", "expires_at"])
def test_a_grant_time_psycopg_cannot_load_grants_nothing_and_others_still_do(
    grants: Grants,
    column: str,
    value: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    patient = secrets.token_bytes(32)
    victim = grants.store.grant(patient, "dr.forged", "clerk.one", T0 + timedelta(days=1), T0)
    kept = grants.store.grant(patient, "dr.kept", "clerk.one", None, T0)
    forge_time(grants.engine, "access_grants", column, ("id", victim.id), value)
    with caplog.at_level(logging.DEBUG):
        assert grants.store.has_access("dr.forged", patient, T0) is None
        assert grants.store.has_access("dr.kept", patient, T0) == kept
        # Listings fetch every principal's row on the patient: the other grants list.
        assert [g.id for g in grants.store.list(patient, None, True, T0)] == [kept.id]
        opened = grants.store.list_opened(patient, None, True, T0)
        assert sorted((g.id, altered) for g, altered in opened) == sorted(
            [(victim.id, True), (kept.id, False)]  # shown to the officer, as altered
        )
    assert victim.id in grants.forged  # reported (a grant-tampered incident)
    assert kept.id not in grants.forged
    assert_nowhere(value, [], caplog, capsys)


def test_a_break_glass_grant_whose_time_psycopg_cannot_load_leaves_the_queue_readable(
    grants: Grants, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    patient = secrets.token_bytes(32)
    forged = grants.store.break_glass(patient, "dr.glass", "synthetic", timedelta(hours=1), T0)
    other = grants.store.break_glass(patient, "dr.other", "synthetic", timedelta(hours=1), T0)
    reviewed = grants.store.break_glass(patient, "dr.third", "synthetic", timedelta(hours=1), T0)
    grants.store.review(reviewed.id, "officer.one", "synthetic comment", T0)
    forge_time(grants.engine, "access_grants", "created_at", ("id", forged.id), "infinity")
    forge_time(grants.engine, "access_grants", "reviewed_at", ("id", reviewed.id), "infinity")
    with caplog.at_level(logging.DEBUG):
        queue = {g.id: g for g in grants.store.break_glass_queue(include_reviewed=True)}
        assert grants.store.review_state(forged.id)[0] is None  # not authentic
    assert forged.id not in queue  # grants nothing, reported
    assert queue[other.id].reason == "synthetic"
    # A review whose time does not load does not count: back in the queue, marked.
    assert queue[reviewed.id].reviewed_at is None
    assert queue[reviewed.id].review_comment == REVIEW_ALTERED_MARK
    assert {forged.id, reviewed.id} <= set(grants.forged)
    assert_nowhere("infinity", [], caplog, capsys)


# --- signatures ------------------------------------------------------------------------


@pytest.mark.parametrize("value", PG_OUT_OF_RANGE)
def test_a_signing_time_psycopg_cannot_load_does_not_unseal(
    records: Records,
    value: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    signatures = SignatureStore(records.store, records.engine)
    record_id, signature_id = signed_record(records, signatures)
    other_record, other_signature = signed_record(records, signatures)
    forge_time(records.engine, "record_signatures", "signing_time", ("id", signature_id), value)
    errors = []
    with caplog.at_level(logging.DEBUG):
        for read in (
            lambda: signatures.open(record_id, None, admit=admit_all, content=False).signatures(),
            lambda: signatures.get(signature_id, admit=admit_all),
        ):
            with pytest.raises(IntegrityError) as raised:  # DATA_LOSS
                read()
            errors.append(raised.value)
        (kept,) = signatures.open(other_record, None, admit=admit_all, content=False).signatures()
        assert kept.id == other_signature
    assert_nowhere(value, errors, caplog, capsys)


def test_a_signature_created_at_psycopg_cannot_load_reads_as_the_placeholder(
    records: Records,
) -> None:
    """``created_at`` only orders a record's signatures: the signature still opens."""
    signatures = SignatureStore(records.store, records.engine)
    record_id, signature_id = signed_record(records, signatures)
    forge_time(records.engine, "record_signatures", "created_at", ("id", signature_id),
               "infinity")  # fmt: skip
    (read,) = signatures.open(record_id, None, admit=admit_all, content=False).signatures()
    assert (read.created_at, read.p7s) == (UNREADABLE_TIME, b"p7s")


# --- request keys and scheduler state --------------------------------------------------


def test_a_request_key_psycopg_cannot_load_is_refused_as_reused(
    own_engine: Engine,
    s3_bucket: S3Bucket,
    keystore_pool: Pkcs11SessionPool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The key's version retyped to an interval past ``timedelta``: no record version."""
    store = RecordStore(
        s3_bucket.store, SqlMetadataStore(own_engine), Pkcs11KeyWrapper(keystore_pool),
        Pkcs11BlindIndexer(keystore_pool), requests=SqlPutRequests(own_engine),
    )  # fmt: skip
    header = NewRecord(new_patient(), RecordKind.OTHER, "application/octet-stream",
                       title="synth", request_id=f"req-{secrets.token_hex(8)}")  # fmt: skip
    store.put(header, [CONTENT], "test-app")
    with own_engine.begin() as c:
        c.exec_driver_sql("ALTER TABLE put_requests ALTER COLUMN version TYPE interval "
                          "USING interval '2147483647 days'")  # fmt: skip
    with pytest.raises(RequestReusedError) as raised:
        store.put(header, [CONTENT], "test-app")
    assert "2147483647" not in str(raised.value) + repr(raised.value.__cause__)
    assert "2147483647" not in "".join(capsys.readouterr())


@pytest.mark.parametrize("value", PG_OUT_OF_RANGE)
def test_a_scheduled_work_time_psycopg_cannot_load_is_claimed_over(
    engine: Engine,
    work_sealer: WorkSealer,
    value: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every claim of the work failed: it stopped for ever."""
    name, other = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    ledger = WorkLedger(engine, work_sealer)
    assert ledger.claim(name, timedelta(minutes=10), T0, "a")
    assert ledger.claim(other, timedelta(minutes=10), T0, "a")
    forge_time(engine, "scheduled_work", "last_run_at", ("name", name), value)
    assert ledger.last_run(name) is None  # no run on record
    assert ledger.claim(name, timedelta(minutes=10), T0, "b"), "the work stopped"
    assert ledger.last_run(other) == (T0, "a")
    assert any("(last_run_at)" in r.getMessage() for r in caplog.records)
    assert_nowhere(value, [], caplog, capsys)


# --- the mechanism ---------------------------------------------------------------------

_THREE = ("SELECT * FROM (VALUES (1, '2024-01-01'::timestamptz), (2, 'infinity'), "
          "(3, '2024-01-03')) AS t(n, at) ORDER BY n")  # fmt: skip
_DAY1, _DAY3 = (datetime(2024, 1, day, tzinfo=UTC) for day in (1, 3))


def test_a_fetch_that_fails_is_fetched_again_from_the_same_row(engine: Engine) -> None:
    """psycopg's loaders until one raises, then the same rows leniently: no row lost or
    read twice, whatever the fetch (one, many, all, iterated, streamed); blocks nest, and
    the connection loads as before once they end."""
    with engine.connect() as c:
        raw = c.connection.dbapi_connection
        factories = raw.cursor_factory, raw.server_cursor_factory
        with lenient_loads(c), lenient_loads(c):
            result = c.exec_driver_sql(_THREE)
            assert result.fetchone() == (1, _DAY1)
            assert result.fetchmany(1) == [(2, UNLOADABLE)]
            assert result.fetchall() == [(3, _DAY3)]
            expected = [(1, _DAY1), (2, UNLOADABLE), (3, _DAY3)]
            assert [tuple(r) for r in c.exec_driver_sql(_THREE)] == expected
            streamed = c.execution_options(stream_results=True).exec_driver_sql(_THREE)
            assert [tuple(r) for r in streamed] == expected
        assert (raw.cursor_factory, raw.server_cursor_factory) == factories
        with pytest.raises(sa.exc.DataError):
            c.exec_driver_sql(_THREE).all()
