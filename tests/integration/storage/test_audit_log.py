"""SqlAuditLog and verify_chain on SQLite and PostgreSQL, tampered with by direct SQL."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11SessionPool
from keystore.admin import AUDIT_KEY_LABEL
from keystore.signing import Pkcs11Signer
from service.audit import AuditChainError
from service.audit.checkpoints import Checkpointer, make_checkpoint, signature_checker
from service.authz.permissions import ACCESS_BREAK_GLASS
from storage.audit_log import (
    QUERY_BATCH,
    SqlAuditLog,
    _row_values,
    audit_checkpoints,
    audit_events,
    audit_head,
)
from storage.audit_model import (
    AuditEntry,
    AuditFilter,
    ChainedEvent,
    Checkpoint,
    canonical_bytes,
    chain_hash,
)
from storage.audit_rows import UNREADABLE, AuditHeadMalformedError, to_checkpoint, to_event
from storage.audit_sql import SELECT_CHECKPOINTS, SELECT_EVENTS
from storage.audit_verify import verify_chain
from storage.break_glass import BreakGlassReview
from storage.errors import BackendUnavailableError, InvalidRecordError
from storage.grants import SqlGrantStore
from storage.sql_metadata import make_engine, upgrade
from tests.fixtures.databases import new_database
from tests.unit.storage.audit_vectors import old_chain

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
PATIENT = bytes(range(32))


def entry(n: int = 0, **changes: object) -> AuditEntry:
    base = AuditEntry(
        time=T0 + timedelta(seconds=n),
        principal=f"dr-{n % 3}",
        application="his",
        role="physician",
        action="GetRecord" if n % 2 else "PutRecord",
        resource=f"rec-{n}",
        patient_index=PATIENT if n % 4 == 0 else None,
        outcome="allowed" if n % 5 else "denied",
        status="OK",
        source="127.0.0.1",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def audit_url(
    database_url: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh database per test, schema at head (the session template's copy), on the
    backend ``database_url`` selects."""
    yield from new_database(request, database_url, tmp_path_factory, migrated=True)


@pytest.fixture
def audit_engine(audit_url: str) -> Iterator[Engine]:
    engine = make_engine(audit_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def audit_log(audit_engine: Engine) -> SqlAuditLog:
    return SqlAuditLog(audit_engine)


@pytest.fixture(scope="module")
def signer(keystore_pool: Pkcs11SessionPool) -> Pkcs11Signer:
    return Pkcs11Signer(keystore_pool, AUDIT_KEY_LABEL)


def fill(log: SqlAuditLog, count: int, batch: int = 7) -> None:
    for start in range(0, count, batch):
        log.append([entry(n) for n in range(start, min(count, start + batch))])


def checkpoint(log: SqlAuditLog, signer: Pkcs11Signer) -> Checkpoint:
    sequence, head_hash = log.head()
    made = make_checkpoint(signer, sequence, head_hash, datetime.now(UTC), log.last_checkpoint())
    assert log.add_checkpoint(made)
    return made


def verify(log: SqlAuditLog, signer: Pkcs11Signer, batch_size: int = 16) -> tuple[int | None, str]:
    result = verify_chain(log, signature_checker(signer.public_key_der()), batch_size=batch_size)
    assert result.ok == (result.first_bad_sequence is None)
    return result.first_bad_sequence, result.reason


def event_row(engine: Engine, sequence: int) -> dict[str, object]:
    with engine.connect() as c:
        row = c.execute(sa.select(audit_events).where(audit_events.c.sequence == sequence)).one()
    return dict(row._mapping)


# --- the chain ---------------------------------------------------------------------


def test_canonical_encoding_is_the_documented_one() -> None:
    e = entry(0, reason="break glass: é", patient_index=bytes([0xAB]) * 32)
    expected = (
        '{"action":"PutRecord","application":"his","outcome":"denied",'
        '"patient_index":"' + "ab" * 32 + '","principal":"dr-0","reason":"break glass: é",'
        '"resource":"rec-0","role":"physician","sequence":7,"source":"127.0.0.1",'
        '"status":"OK","time":"2026-01-02T03:04:05.000006Z"}'
    ).encode()
    assert canonical_bytes(7, e) == expected
    assert chain_hash(bytes(32), 7, e) == hashlib.sha256(bytes(32) + expected).digest()


def test_append_chains_and_verifies(audit_log: SqlAuditLog, signer: Pkcs11Signer) -> None:
    assert audit_log.head() == (0, bytes(32))
    assert audit_log.append([]) == []
    first = audit_log.append([entry(0), entry(1)])
    assert [e.sequence for e in first] == [1, 2]
    assert first[0].prev_hash == bytes(32)
    assert first[1].prev_hash == first[0].hash
    fill(audit_log, 40)
    stored = audit_log.events(0, 100)
    assert [e.sequence for e in stored] == list(range(1, 43))
    assert stored[:2] == first  # the round trip through SQL changes nothing
    assert audit_log.head() == (42, stored[-1].hash)
    checkpoint(audit_log, signer)
    assert verify(audit_log, signer) == (None, "chain intact")
    result = verify_chain(audit_log, signature_checker(signer.public_key_der()))
    assert (result.events_checked, result.checkpoints_checked) == (42, 1)
    assert result.last_checkpoint_sequence == 42


def test_query_filters_and_pages(audit_log: SqlAuditLog) -> None:
    fill(audit_log, 1100, batch=100)
    assert len(list(audit_log.query(AuditFilter()))) == 1100  # more than one page
    by_principal = list(audit_log.query(AuditFilter(principal="dr-1")))
    assert by_principal
    assert all(e.entry.principal == "dr-1" for e in by_principal)
    by_patient = list(audit_log.query(AuditFilter(patient_index=PATIENT)))
    assert len(by_patient) == 275
    denied = list(audit_log.query(AuditFilter(outcome="denied", action="PutRecord")))
    assert all(e.entry.outcome == "denied" and e.entry.action == "PutRecord" for e in denied)
    window = list(
        audit_log.query(
            AuditFilter(since=T0 + timedelta(seconds=10), until=T0 + timedelta(seconds=20))
        )
    )
    assert [e.sequence for e in window] == list(range(11, 21))
    newest = list(audit_log.query(AuditFilter(limit=3, newest_first=True)))
    assert [e.sequence for e in newest] == [1100, 1099, 1098]
    oldest = list(audit_log.query(AuditFilter(limit=600)))
    assert [e.sequence for e in oldest] == list(range(1, 601))


def test_oversized_field_is_invalid(audit_log: SqlAuditLog) -> None:
    with pytest.raises(InvalidRecordError):
        audit_log.append([entry(0, principal="x" * 256)])
    assert audit_log.head()[0] == 0


def test_duplicate_checkpoint_is_refused_quietly(
    audit_log: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    fill(audit_log, 3)
    made = checkpoint(audit_log, signer)
    assert audit_log.add_checkpoint(made) is False
    assert audit_log.checkpoints() == [made]
    assert audit_log.last_checkpoint() == made


def test_two_replicas_keep_one_chain(
    audit_url: str, audit_engine: Engine, signer: Pkcs11Signer
) -> None:
    second_engine = make_engine(audit_url)
    logs = [SqlAuditLog(audit_engine), SqlAuditLog(second_engine)]
    errors: list[BaseException] = []

    def writer(log: SqlAuditLog, worker: int) -> None:
        try:
            for n in range(50):
                log.append([entry(worker * 1000 + n + k) for k in range(4)])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(logs[i % 2], i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    second_engine.dispose()
    assert errors == []
    assert logs[0].head()[0] == 8 * 50 * 4
    assert verify(logs[0], signer, batch_size=500) == (None, "chain intact")


def test_unavailable_database_is_backend_unavailable(
    audit_engine: Engine, audit_log: SqlAuditLog
) -> None:
    with audit_engine.begin() as c:
        c.execute(sa.text("DROP TABLE audit_events"))
    with pytest.raises(BackendUnavailableError) as info:
        audit_log.append([entry(0)])
    assert "dr-0" not in str(info.value)


# --- tampering ---------------------------------------------------------------------


@pytest.fixture
def chain(audit_engine: Engine, audit_log: SqlAuditLog, signer: Pkcs11Signer) -> SqlAuditLog:
    """60 events with checkpoints at 20 and 40, verified intact."""
    fill(audit_log, 20)
    checkpoint(audit_log, signer)
    fill(audit_log, 20)
    checkpoint(audit_log, signer)
    fill(audit_log, 20)
    assert verify(audit_log, signer) == (None, "chain intact")
    return audit_log


def test_edited_field_detected(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    with audit_engine.begin() as c:
        c.execute(audit_events.update().where(audit_events.c.sequence == 33).values(principal="x"))
    assert verify(chain, signer) == (33, "event altered")


def test_deleted_event_detected(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    with audit_engine.begin() as c:
        c.execute(audit_events.delete().where(audit_events.c.sequence == 17))
    assert verify(chain, signer) == (17, "event missing (deleted)")


def _shift_up(engine: Engine, after: int) -> None:
    """Renumber events after ``after`` by +1 (via negatives: no transient key clash)."""
    seq = audit_events.c.sequence
    with engine.begin() as c:
        c.execute(audit_events.update().where(seq > after).values(sequence=-seq - 1))
        c.execute(audit_events.update().where(seq < 0).values(sequence=-seq))


def test_inserted_event_detected(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    # A careful forger: renumbers the tail and gives the forgery a correct hash.
    k = 25
    prev = event_row(audit_engine, k)["hash"]
    assert isinstance(prev, bytes)
    _shift_up(audit_engine, k)
    forged = entry(999, principal="intruder")
    row = _row_values(ChainedEvent(k + 1, forged, prev, chain_hash(prev, k + 1, forged)))
    with audit_engine.begin() as c:
        c.execute(audit_events.insert().values(**row))
    assert verify(chain, signer) == (k + 1, "event inserted (later events shifted)")


def test_reordered_events_detected(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    a, b = event_row(audit_engine, 45), event_row(audit_engine, 46)
    with audit_engine.begin() as c:
        for target, source in ((45, b), (46, a)):
            values = {k: v for k, v in source.items() if k != "sequence"}
            c.execute(
                audit_events.update().where(audit_events.c.sequence == target).values(**values)
            )
    first_bad, reason = verify(chain, signer)
    assert first_bad == 45
    assert "reordered" in reason


def test_truncation_after_last_checkpoint_detected(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    with audit_engine.begin() as c:
        c.execute(audit_events.delete().where(audit_events.c.sequence > 50))
    assert verify(chain, signer) == (51, "trail truncated")


def test_truncation_with_head_rewritten_detected_by_checkpoint(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    # The intruder deletes past a checkpoint and makes the head row agree.
    last = event_row(audit_engine, 35)
    with audit_engine.begin() as c:
        c.execute(audit_events.delete().where(audit_events.c.sequence > 35))
        c.execute(audit_head.update().values(sequence=35, hash=last["hash"]))
    assert verify(chain, signer) == (36, "trail truncated")


def test_forged_checkpoint_signature_detected(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    with audit_engine.begin() as c:
        c.execute(
            audit_checkpoints.update()
            .where(audit_checkpoints.c.sequence == 40)
            .values(signature=b"\x30\x06\x02\x01\x01\x02\x01\x01")
        )
    assert verify(chain, signer) == (40, "checkpoint signature invalid")


def test_rewritten_tail_caught_by_checkpoint(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    # Edit event 30 and re-hash everything after it: only checkpoint 40 can tell.
    rows = [event_row(audit_engine, s) for s in range(30, 61)]
    prev = rows[0]["prev_hash"]
    with audit_engine.begin() as c:
        for row in rows:
            stored = chain.events(row["sequence"] - 1, 1)[0]  # type: ignore[operator]
            changed = (
                replace(stored.entry, reason="edited") if row["sequence"] == 30 else stored.entry
            )
            digest = chain_hash(prev, stored.sequence, changed)  # type: ignore[arg-type]
            c.execute(
                audit_events.update()
                .where(audit_events.c.sequence == stored.sequence)
                .values(reason=changed.reason, prev_hash=prev, hash=digest)
            )
            prev = digest
        c.execute(audit_head.update().values(hash=prev))
    assert verify(chain, signer) == (21, "checkpoint does not match chain")


def test_chain_of_the_old_encoding_verifies(audit_log: SqlAuditLog, signer: Pkcs11Signer) -> None:
    """Odd text, far times and zones survive the database and hash as they did before.

    ``OLD_CHAIN`` is pinned against the encoding before it was written key by key; the
    NUL is left out here only because PostgreSQL refuses it in text, and the reason cut
    to the column's 2000 characters.
    """
    written = [replace(e, reason=e.reason.replace("\x00", "")[:2000]) for e in old_chain()]
    audit_log.append(written)
    checkpoint(audit_log, signer)
    assert verify(audit_log, signer) == (None, "chain intact")
    read = audit_log.events(0, 100)
    assert [canonical_bytes(e.sequence, e.entry) for e in read] == [
        canonical_bytes(n, e) for n, e in enumerate(written, 1)
    ]


def test_field_of_another_type_is_named_not_raised(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    """A database writer's value no writer stores (bytes in a text column) is an alteration."""
    with audit_engine.begin() as c:
        if audit_engine.dialect.name == "sqlite":  # a BLOB in a TEXT column stays bytes
            c.exec_driver_sql("UPDATE audit_events SET reason = X'72' WHERE sequence = 33")
            expected = 33
        else:  # the column itself changed
            c.exec_driver_sql(
                "ALTER TABLE audit_events ALTER COLUMN reason TYPE bytea"
                " USING convert_to(reason, 'UTF8')"
            )
            expected = 1
    assert verify(chain, signer) == (expected, "event altered")


# A database writer's malformed row, per kind: (SQLite statements, expected first bad
# sequence), (PostgreSQL statements, expected). On SQLite a value of another type is
# simply stored; on PostgreSQL the writer changes the column's type, so every row is
# malformed and the first one is named. None: the edit is impossible on that database.
_MALFORMED: dict[str, tuple[tuple[list[str], int], tuple[list[str], int]]] = {
    "outcome": (
        (["UPDATE audit_events SET outcome = 'maybe' WHERE sequence = 50"], 50),
        (["UPDATE audit_events SET outcome = 'maybe' WHERE sequence = 50"], 50),
    ),
    "patient_index text": (
        (["UPDATE audit_events SET patient_index = 'ab' WHERE sequence = 50"], 50),
        (["ALTER TABLE audit_events ALTER COLUMN patient_index TYPE text"
          " USING encode(patient_index, 'hex')",
          "UPDATE audit_events SET patient_index = 'ab' WHERE sequence = 50"], 1),
    ),
    "patient_index short": (
        (["UPDATE audit_events SET patient_index = X'0102' WHERE sequence = 50"], 50),
        (["UPDATE audit_events SET patient_index = decode('0102', 'hex') WHERE sequence = 50"],
         50),
    ),
    "time text": (
        (["UPDATE audit_events SET time = 'yesterday' WHERE sequence = 50"], 50),
        (["ALTER TABLE audit_events ALTER COLUMN time TYPE text USING time::text"], 1),
    ),
    "time number": (
        (["UPDATE audit_events SET time = 12345 WHERE sequence = 50"], 50),
        (["ALTER TABLE audit_events ALTER COLUMN time TYPE bigint"
          " USING extract(epoch FROM time)::bigint"], 1),
    ),
    "sequence not an integer": (
        (["UPDATE audit_events SET sequence = 49.5 WHERE sequence = 50"], 50),
        (["ALTER TABLE audit_events ALTER COLUMN sequence TYPE numeric"], 1),
    ),
    "hash short": (
        (["UPDATE audit_events SET hash = X'00' WHERE sequence = 50"], 50),
        (["UPDATE audit_events SET hash = decode('00', 'hex') WHERE sequence = 50"], 50),
    ),
    "prev_hash text": (
        (["UPDATE audit_events SET prev_hash = 'ab' WHERE sequence = 50"], 50),
        (["ALTER TABLE audit_events ALTER COLUMN prev_hash TYPE text"
          " USING encode(prev_hash, 'hex')"], 1),
    ),
    "text field null": (
        # SQLite enforces NOT NULL, so the writer rebuilds the table without it first.
        (["CREATE TABLE bare AS SELECT * FROM audit_events", "DROP TABLE audit_events",
          "ALTER TABLE bare RENAME TO audit_events",
          "UPDATE audit_events SET principal = NULL WHERE sequence = 50"], 50),
        (["ALTER TABLE audit_events ALTER COLUMN principal DROP NOT NULL",
          "UPDATE audit_events SET principal = NULL WHERE sequence = 50"], 50),
    ),
}  # fmt: skip


# The field each kind makes malformed (on SQLite, row 50's).
_FIELDS = {
    "outcome": ("outcome",), "patient_index text": ("patient_index",),
    "patient_index short": ("patient_index",), "time text": ("time",),
    "time number": ("time",), "sequence not an integer": ("sequence",),
    "hash short": ("hash",), "prev_hash text": ("prev_hash",),
    "text field null": ("principal",),
}  # fmt: skip


def _malform(engine: Engine, kind: str) -> int:
    statements, expected = _MALFORMED[kind][0 if engine.dialect.name == "sqlite" else 1]
    with engine.begin() as c:
        for statement in statements:
            c.exec_driver_sql(statement)
    return expected


@pytest.mark.parametrize("kind", sorted(_MALFORMED))
def test_malformed_row_is_named_and_not_signed(
    audit_engine: Engine,
    chain: SqlAuditLog,
    signer: Pkcs11Signer,
    kind: str,
) -> None:
    """A row the writer never stores is 'event altered' at its sequence, not a crash."""
    _named_and_not_signed(chain, signer, _malform(audit_engine, kind), _FIELDS[kind])


def _named_and_not_signed(
    chain: SqlAuditLog, signer: Pkcs11Signer, expected: int, fields: tuple[str, ...]
) -> None:
    """Verify names ``expected`` as altered, the checkpointer refuses to sign over it,
    and a listing holds placeholders naming ``fields`` (one, if ``expected`` is 50)."""
    assert verify(chain, signer) == (expected, "event altered")
    # The service's own check before signing refuses it (the anchor is checkpoint 40).
    checkpointer = Checkpointer(chain, signer)
    with pytest.raises(AuditChainError):
        checkpointer.checkpoint()
    last = chain.last_checkpoint()
    assert last is not None
    assert last.sequence == 40
    assert not checkpointer.verify().ok
    # A listing holds the row as a placeholder naming its fields, none of its values
    # (the service leaves it out and reports it: service.audit.listing).
    listed = list(chain.query(AuditFilter()))
    assert len(listed) == chain.head()[0]
    placeholders = [e for e in listed if e.malformed]
    assert placeholders
    assert {e.malformed for e in placeholders} == {fields}
    if expected == 50:  # one row changed (else a column's type, for every row it holds)
        assert len(placeholders) == 1
    assert all(e.entry == UNREADABLE for e in placeholders)  # no value of the row


# Times PostgreSQL stores in a timestamptz and Python's datetime cannot hold: psycopg
# failed the whole fetch on them (an outage of verify, listings and the break-the-glass
# queue). On SQLite the column holds text, parsed per row: `time text` above.
PG_OUT_OF_RANGE = (
    "infinity", "-infinity", "10000-01-01 00:00:00+00", "294276-12-31 23:59:59.999999+00",
    "0001-12-31 23:59:59.999999+00 BC",
)  # fmt: skip


@pytest.mark.backend("postgresql")
@pytest.mark.parametrize("value", PG_OUT_OF_RANGE)
def test_a_time_python_cannot_hold_is_a_named_row_not_an_outage(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer, value: str
) -> None:
    with audit_engine.begin() as c:
        c.exec_driver_sql(f"UPDATE audit_events SET time = '{value}' WHERE sequence = 50")
    _named_and_not_signed(chain, signer, 50, ("time",))
    # Only the audit's reads are lenient: the connection's own loading is back.
    with pytest.raises(sa.exc.DataError), audit_engine.connect() as c:
        c.execute(sa.select(audit_events.c.time).where(audit_events.c.sequence == 50)).all()


# The same instant in other spellings Python's fromisoformat accepts: SQL compares the
# text (a since/until window), the chain's hash covers the instant. On SQLite an event's
# time is read only in the form medvault writes (storage.sqlite_text.exact_time_parser).
_RESPELLED = (
    "REPLACE(time, ' ', 'T')",
    "time || '+00:00'",
    "time || '000'",
    "strftime('%Y-%m-%d %H:%M:%f', time)",  # milliseconds only: another instant, too
)


@pytest.mark.backend("sqlite")
@pytest.mark.parametrize("respelled", _RESPELLED)
def test_a_respelled_time_is_a_named_row(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer, respelled: str
) -> None:
    with audit_engine.begin() as c:
        c.exec_driver_sql(f"UPDATE audit_events SET time = {respelled} WHERE sequence = 50")
    _named_and_not_signed(chain, signer, 50, ("time",))


@pytest.mark.backend("sqlite")
def test_a_respelled_checkpoint_time_is_a_named_checkpoint(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    with audit_engine.begin() as c:
        c.exec_driver_sql(
            "UPDATE audit_checkpoints SET created_at = REPLACE(created_at, ' ', 'T') "
            "WHERE sequence = 40"
        )
    assert verify(chain, signer) == (40, "checkpoint altered: created_at malformed")


@pytest.mark.backend("sqlite")
def test_an_event_respelled_out_of_a_time_window_is_named_by_verify(
    audit_engine: Engine, audit_log: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    """Review 9b: with a 'T' the text of minute 1 sorts after the window's end, so the
    window's query no longer returns it (SQL decides); verify must say so."""
    victim = bytes(range(32))
    audit_log.append([
        entry(n, time=T0 + timedelta(minutes=n), patient_index=victim) for n in range(3)
    ])  # fmt: skip
    checkpoint(audit_log, signer)
    window = AuditFilter(since=T0, until=T0 + timedelta(hours=1), patient_index=victim)
    assert len(list(audit_log.query(window))) == 3
    with audit_engine.begin() as c:
        c.exec_driver_sql(
            "UPDATE audit_events SET time = REPLACE(time, ' ', 'T') WHERE sequence = 2"
        )
    assert verify(audit_log, signer) == (2, "event altered")
    # Unwindowed, the listing holds it as a placeholder (the service reports it).
    listed = list(audit_log.query(AuditFilter(patient_index=victim)))
    assert [(e.sequence, e.malformed) for e in listed if e.malformed] == [(2, ("time",))]


# Genuine times, microseconds and zones included, and the session time zones they are
# read in (PostgreSQL renders a timestamptz in the session's zone; psycopg parses it).
_GENUINE_TIMES = (
    T0,
    datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(1900, 1, 1, 0, 0, 0, 500000, tzinfo=UTC),  # local mean times in some zones
    datetime(2000, 2, 29, 12, 0, 0, 1, tzinfo=timezone(timedelta(hours=5, minutes=45))),
    datetime(2026, 3, 29, 1, 59, 59, 999999, tzinfo=ZoneInfo("Europe/Berlin")),
    datetime(2026, 10, 25, 2, 30, 0, 123456, tzinfo=ZoneInfo("Europe/Berlin"), fold=1),
    datetime(1, 1, 2, 0, 0, 0, 1, tzinfo=UTC),
    datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC),
)
_SESSION_ZONES = ("UTC", "Asia/Kathmandu", "America/St_Johns", "Pacific/Kiritimati",
                  "Etc/GMT+12")  # fmt: skip


@pytest.mark.backend("sqlite")
def test_genuine_times_read_back_in_the_form_sqlite_keeps(
    audit_log: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    """Every genuine time, early years and zones included, is stored in the one form
    the exact read accepts: nothing medvault writes reads as malformed."""
    written = [entry(n, time=t) for n, t in enumerate(_GENUINE_TIMES)]
    audit_log.append(written)
    checkpoint(audit_log, signer)
    read = audit_log.events(0, 100)
    assert not [e.sequence for e in read if e.malformed]
    assert [e.entry.time for e in read] == [t.astimezone(UTC) for t in _GENUINE_TIMES]
    assert verify(audit_log, signer) == (None, "chain intact")


@pytest.mark.backend("postgresql")
def test_genuine_times_read_as_psycopg_loads_them_in_every_session_zone(
    audit_url: str, audit_log: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    """The lenient read (``storage.audit_sql.rows_as_read``) gives every genuine event
    and checkpoint exactly what psycopg's own loading gave before it (the chain and
    the checkpoint signatures are over the event as read), whatever the session's
    TimeZone, and the chain verifies in each."""
    written = [entry(n, time=t) for n, t in enumerate(_GENUINE_TIMES)]
    audit_log.append(written)
    checkpoint(audit_log, signer)
    audit_log.append([entry(99, time=datetime.now(UTC))])
    checkpoint(audit_log, signer)
    for zone in _SESSION_ZONES:
        url = sa.make_url(audit_url).update_query_dict({"options": f"-c TimeZone={zone}"})
        engine = make_engine(url.render_as_string(hide_password=False))
        try:
            log = SqlAuditLog(engine)
            with engine.connect() as c:  # as before: psycopg's own loading, no marker
                assert c.exec_driver_sql("SHOW TimeZone").scalar() == zone
                rows = c.execute(SELECT_EVENTS.order_by(audit_events.c.sequence))
                before = [to_event(r._mapping, None) for r in rows]
                rows = c.execute(SELECT_CHECKPOINTS.order_by(audit_checkpoints.c.sequence))
                marks = [to_checkpoint(r._mapping, None) for r in rows]
            read = log.events(0, 100)
            assert [_exact(e) for e in read] == [_exact(e) for e in before], zone
            assert [canonical_bytes(e.sequence, e.entry) for e in read[:-1]] == [
                canonical_bytes(n, w) for n, w in enumerate(written, 1)
            ], zone
            assert [(c, c.created_at.tzinfo) for c in log.checkpoints()] == [
                (c, c.created_at.tzinfo) for c in marks
            ], zone
            assert verify(log, signer) == (None, "chain intact"), zone
        finally:
            engine.dispose()


def _exact(event: ChainedEvent) -> tuple[object, ...]:
    """What the chain hashes, and the time's zone object (datetimes compare as instants)."""
    time = event.entry.time
    return (event.malformed, canonical_bytes(event.sequence, event.entry), event.hash,
            time.tzinfo, time.utcoffset())  # fmt: skip


# Text that is not UTF-8, per column: SQLite stores the bytes a writer casts to text
# (sqlite3 used to fail the whole fetch on them: an outage of every listing and of
# verify); PostgreSQL refuses them when they are written.
_NOT_UTF8 = {
    "reason": ("UPDATE audit_events SET reason = CAST(X'41FF42' AS TEXT) WHERE sequence = 50",
               "UPDATE audit_events SET reason = convert_from('\\x41ff42', 'UTF8')"
               " WHERE sequence = 50"),
    "time": ("UPDATE audit_events SET time = CAST(X'32FF' AS TEXT) WHERE sequence = 50", None),
    "outcome": ("UPDATE audit_events SET outcome = CAST(X'FF' AS TEXT) WHERE sequence = 50",
                "UPDATE audit_events SET outcome = convert_from('\\xff', 'UTF8')"
                " WHERE sequence = 50"),
}  # fmt: skip


@pytest.mark.parametrize("column", sorted(_NOT_UTF8))
def test_text_that_is_not_utf8_is_a_named_row_not_an_outage(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer, column: str
) -> None:
    sqlite_edit, postgres_edit = _NOT_UTF8[column]
    if audit_engine.dialect.name != "sqlite":
        if postgres_edit is not None:  # the database refuses the bytes: nothing to read
            with pytest.raises(sa.exc.DataError), audit_engine.begin() as c:
                c.exec_driver_sql(postgres_edit)
        assert verify(chain, signer) == (None, "chain intact")
        return
    with audit_engine.begin() as c:
        c.exec_driver_sql(sqlite_edit)
    assert verify(chain, signer) == (50, "event altered")
    with pytest.raises(AuditChainError):
        Checkpointer(chain, signer).checkpoint()
    (placeholder,) = [e for e in chain.query(AuditFilter()) if e.malformed]
    assert placeholder.malformed == (column,)
    assert placeholder.entry == UNREADABLE
    # The connection's own decoding is back: other queries read such text with the bytes
    # replaced (storage.sqlite_text), never as the audit's marker.
    with audit_engine.connect() as c:
        value = c.exec_driver_sql(f"SELECT {column} FROM audit_events WHERE sequence = 50")
        assert "\ufffd" in value.scalar_one()


def _refuses_bytes_that_are_not_utf8(engine: Engine) -> None:
    """PostgreSQL: such text cannot be written, so there is nothing to read."""
    with pytest.raises(sa.exc.DataError), engine.begin() as c:
        c.exec_driver_sql(
            "UPDATE audit_events SET reason = convert_from('\\xff', 'UTF8') WHERE sequence = 1"
        )


@pytest.mark.parametrize("newest_first", [True, False])
def test_a_listing_pages_past_sequences_that_are_not_utf8(
    audit_engine: Engine, audit_log: SqlAuditLog, newest_first: bool
) -> None:
    """A page ending on such a row pages on from the same text (review 3 of d9eeda9: the
    marker, bound as the next page's cursor, was an outage of every long listing)."""
    fill(audit_log, 10)
    if audit_engine.dialect.name != "sqlite":
        _refuses_bytes_that_are_not_utf8(audit_engine)
        return
    columns = [c.name for c in audit_events.c if c.name != "sequence"]
    with audit_engine.begin() as c:  # a page of rows whose sequence is such text
        c.exec_driver_sql(
            f"INSERT INTO audit_events (sequence, {', '.join(columns)}) "
            f"SELECT CAST(? AS TEXT), {', '.join(columns)} FROM audit_events WHERE sequence = 1",
            [(b"\xff" + n.to_bytes(2, "big"),) for n in range(QUERY_BATCH)],
        )
    listed = list(audit_log.query(AuditFilter(newest_first=newest_first)))
    assert sorted(e.sequence for e in listed if not e.malformed) == list(range(1, 11))
    placeholders = [e for e in listed if e.malformed]
    assert len(placeholders) == QUERY_BATCH
    assert {e.malformed for e in placeholders} == {("sequence",)}


def test_a_head_hash_that_is_not_utf8_is_a_verdict_and_fails_the_writer_closed(
    audit_engine: Engine, audit_log: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    """Not an outage "retry later": ``audit verify`` names the head, as it does for a
    decodable text hash, and the writer refuses to chain onto it."""
    fill(audit_log, 5)
    if audit_engine.dialect.name != "sqlite":
        _refuses_bytes_that_are_not_utf8(audit_engine)
        return
    with audit_engine.begin() as c:
        c.exec_driver_sql("UPDATE audit_head SET hash = CAST(X'4142' AS TEXT)")
    decodable = verify(audit_log, signer)
    assert decodable[1].startswith("head row altered")
    with audit_engine.begin() as c:
        c.exec_driver_sql("UPDATE audit_head SET hash = CAST(X'41FF' AS TEXT)")
    assert verify(audit_log, signer) == decodable
    with pytest.raises(AuditHeadMalformedError):
        audit_log.head()
    with pytest.raises(BackendUnavailableError, match="head row malformed"):
        audit_log.append([entry(99)])


def test_the_break_glass_queue_reads_forged_events_as_the_log_does(
    audit_engine: Engine, audit_log: SqlAuditLog
) -> None:
    """The review queue reads break-the-glass events from the trail itself: a forged
    one of text that is not UTF-8, or of a type the writer never stores, is left out
    (the queue lists grant rows), not an outage of the officer's queue (review 3 of
    d9eeda9: one such row, even at sequence -1 where verify never looks, stopped it)."""
    fill(audit_log, 3)
    if audit_engine.dialect.name != "sqlite":
        _refuses_bytes_that_are_not_utf8(audit_engine)
        return
    columns = [c.name for c in audit_events.c if c.name != "sequence"]
    forged = {
        "action": f"'{ACCESS_BREAK_GLASS}'", "outcome": "'allowed'",
        "resource": "'grant/' || lower(hex(randomblob(16)))",
    }  # fmt: skip
    for sequence, field, value in ((-1, "principal", "CAST(X'41FF42' AS TEXT)"),
                                   (-2, "patient_index", "1000000000"),
                                   (-3, "time", "'not a time'")):  # fmt: skip
        values = {**forged, field: value}
        with audit_engine.begin() as c:
            c.exec_driver_sql(
                f"INSERT INTO audit_events (sequence, {', '.join(columns)}) SELECT {sequence}, "
                f"{', '.join(values.get(n, n) for n in columns)} FROM audit_events "
                "WHERE sequence = 1"
            )
    review = BreakGlassReview(SqlGrantStore(audit_engine, cast(Any, None)), ACCESS_BREAK_GLASS)
    assert review.queue(include_reviewed=True) == []
