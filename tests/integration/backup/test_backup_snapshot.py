"""Snapshot export -> load into an empty migrated database, on and across both backends."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from storage.audit_rows import AuditHeadMalformedError
from storage.backup import SnapshotLoadError, SourceIntegrityError
from storage.backup.snapshot import export, load, tables
from storage.sql_metadata import make_engine, upgrade
from tests.integration.backup.helpers import Source, forged_snapshot, table_rows


@pytest.mark.parametrize("into", ["sqlite", "postgresql"])
def test_export_load_round_trip(source: Source, fresh_url: Any, into: str) -> None:
    snapshot = export(source.engine)
    data = b"".join(snapshot)
    assert snapshot.stats.tables["records"] == 5
    assert snapshot.stats.audit_head["sequence"] == 1
    engine = make_engine(fresh_url(into))
    try:
        upgrade(engine)
        # Fed in small pieces: lines and gzip members split across chunks.
        counts = load(engine, (data[i : i + 97] for i in range(0, len(data), 97)))
        assert counts == snapshot.stats.tables
        for table in tables():
            assert table_rows(engine, table) == table_rows(source.engine, table), table.name
        with pytest.raises(SnapshotLoadError, match="not empty"):
            load(engine, [data])
    finally:
        engine.dispose()


def test_truncated_snapshot_loads_nothing(source: Source, fresh_url: Any, backend: str) -> None:
    data = b"".join(export(source.engine))
    engine = make_engine(fresh_url(backend))
    try:
        upgrade(engine)
        with pytest.raises(SnapshotLoadError):
            load(engine, [data[: len(data) // 2]])
        assert all(not table_rows(engine, t) for t in tables() if t.name != "audit_head")
    finally:
        engine.dispose()


# A database writer's rows are read as strictly as the service reads them: nothing is
# coerced into the manifest (bytes(n) of an integer allocates n bytes; int() truncates).
_MALFORMED_SOURCE = {
    "records sha256 short": (
        "UPDATE records SET ciphertext_sha256 = {short} WHERE object_key = (SELECT"
        " MIN(object_key) FROM records)", SourceIntegrityError, "ciphertext_sha256",
    ),
    "records size negative": (
        "UPDATE records SET stored_size = -1 WHERE object_key = (SELECT MIN(object_key)"
        " FROM records)", SourceIntegrityError, "stored_size",
    ),
    "audit head hash short": (
        "UPDATE audit_head SET hash = {short}", AuditHeadMalformedError, "hash",
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(_MALFORMED_SOURCE))
def test_malformed_source_row_fails_the_snapshot_by_name(source: Source, kind: str) -> None:
    statement, error, field_name = _MALFORMED_SOURCE[kind]
    short = "X'00'" if source.engine.dialect.name == "sqlite" else "decode('00', 'hex')"
    with source.engine.begin() as c:
        c.exec_driver_sql(statement.format(short=short))
    with pytest.raises(error) as raised:
        b"".join(export(source.engine))
    assert field_name in str(raised.value)
    assert source.patient not in str(raised.value)


def test_integer_in_a_binary_column_is_not_allocated(source: Source) -> None:
    """SQLite keeps whatever type it is given: an integer where the digest belongs must
    fail the snapshot, not become bytes(n) (a gigabyte of zeros for n = 10**9)."""
    if source.engine.dialect.name != "sqlite":
        # PostgreSQL's bytea refuses an integer outright; the database is the check.
        with pytest.raises(sa.exc.DBAPIError), source.engine.begin() as c:
            c.exec_driver_sql("UPDATE audit_head SET hash = 1000000000")
        return
    with source.engine.begin() as c:
        c.exec_driver_sql("UPDATE audit_head SET hash = 1000000000")
    # Refused by type, as any column of any table is (before the head is read).
    with pytest.raises(SourceIntegrityError, match=r"audit_head .*\(hash\)") as raised:
        b"".join(export(source.engine))
    assert "1000000000" not in str(raised.value)


def test_text_that_is_not_utf8_fails_the_snapshot_by_column(source: Source) -> None:
    """Not sqlite3's decoding error, whose text (logged with its traceback) carries the
    value: the table and column, as for any malformed row. PostgreSQL refuses such text."""
    if source.engine.dialect.name != "sqlite":
        with pytest.raises(sa.exc.DataError), source.engine.begin() as c:
            c.exec_driver_sql(
                "UPDATE audit_events SET reason = convert_from('\\x41ff42', 'UTF8')"
            )
        return
    with source.engine.begin() as c:
        c.exec_driver_sql("UPDATE audit_events SET reason = CAST(X'41FF42' AS TEXT)")
    with pytest.raises(SourceIntegrityError, match=r"audit_events .*\(reason\)") as raised:
        b"".join(export(source.engine))
    assert raised.value.__cause__ is None  # no driver error carrying the value


@pytest.mark.backend("postgresql")
@pytest.mark.parametrize(("table", "column", "value"), [
    ("audit_events", "time", "infinity"),
    ("audit_checkpoints", "created_at", "10000-01-01 00:00:00+00"),
    ("access_grants", "expires_at", "-infinity"),
])  # fmt: skip
def test_a_time_python_cannot_hold_fails_the_snapshot_by_column(
    make_source: Any, table: str, column: str, value: str
) -> None:
    """Not psycopg's error, whose text (logged with its traceback) carries the value: the
    table and column. PostgreSQL stores infinity and years up to 294276 in a timestamptz."""
    source: Source = make_source("postgresql")
    source.add_records(1)
    source.add_other_rows()
    with source.engine.begin() as c:
        if table == "audit_checkpoints":  # the source has none: a copy of any row will do
            c.exec_driver_sql(
                "INSERT INTO audit_checkpoints (sequence, hash, signature, key_label,"
                " public_key_der, created_at) SELECT sequence, hash, hash, 'k', hash, time"
                " FROM audit_events"
            )
        c.exec_driver_sql(f"UPDATE {table} SET {column} = '{value}'")
    with pytest.raises(SourceIntegrityError, match=rf"{table} .*\({column}\)") as raised:
        b"".join(export(source.engine))
    assert raised.value.__cause__ is None  # no driver error carrying the value
    assert value not in str(raised.value)


# Columns a database writer retypes to a type whose value psycopg cannot load: its
# DataError's text holds the value; json.loads raises ValueError (over 4300 digits) and
# RecursionError (3000 deep).
_UNLOADABLE = {
    "interval": (
        "ALTER TABLE audit_events ALTER COLUMN time TYPE interval USING time - 'epoch'",
        "UPDATE audit_events SET time = interval '2147483647 days'",
        "time",
    ),
    "json digits": (
        "ALTER TABLE audit_events ALTER COLUMN reason TYPE json USING to_json(reason)",
        "UPDATE audit_events SET reason = repeat('1', 5000)::json",
        "reason",
    ),
    "json depth": (
        "ALTER TABLE audit_events ALTER COLUMN reason TYPE json USING to_json(reason)",
        "UPDATE audit_events SET reason = (repeat('[', 3000) || repeat(']', 3000))::json",
        "reason",
    ),
}


@pytest.mark.backend("postgresql")
@pytest.mark.parametrize("kind", sorted(_UNLOADABLE))
def test_a_value_psycopg_cannot_load_fails_the_snapshot_by_column(
    make_source: Any, kind: str
) -> None:
    """Any type, not only times: the table and column, no driver error (review9 F1)."""
    source: Source = make_source("postgresql")
    source.add_records(1)
    source.add_other_rows()
    retype, update, column = _UNLOADABLE[kind]
    with source.engine.begin() as c:
        c.exec_driver_sql(retype)
        c.exec_driver_sql(update)
    with pytest.raises(SourceIntegrityError, match=rf"audit_events .*\({column}\)") as raised:
        b"".join(export(source.engine))
    assert raised.value.__cause__ is None
    assert "2147483647" not in str(raised.value)


# The last: the same instant respelled ('T'), which the stores read as the placeholder.
@pytest.mark.parametrize(
    "stored", ["CAST(X'32FF' AS TEXT)", "'garbage'", "7", "REPLACE(created_at, ' ', 'T')"]
)
def test_a_time_that_does_not_parse_fails_the_snapshot_by_column(
    source: Source, stored: str
) -> None:
    """SQLite keeps times as text: one that is not UTF-8, not a time, or not text fails
    the backup naming table and column. Never the driver's parse error (its text carries
    the value), and never the placeholder the stores read it as (``StoredTime``): the
    snapshot copies rows, and must not copy another value than the database holds.
    PostgreSQL's timestamptz holds times only."""
    if source.engine.dialect.name != "sqlite":
        with pytest.raises(sa.exc.DBAPIError), source.engine.begin() as c:
            c.exec_driver_sql("UPDATE records SET created_at = 'garbage'")
        return
    with source.engine.begin() as c:
        c.exec_driver_sql(
            f"UPDATE records SET created_at = {stored} WHERE object_key = "
            "(SELECT MIN(object_key) FROM records)"
        )
    with pytest.raises(SourceIntegrityError, match=r"records .*\(created_at\)") as raised:
        b"".join(export(source.engine))
    assert raised.value.__cause__ is None
    assert "garbage" not in str(raised.value)


# A value of another type than its column's declared one (SQLite keeps any type in any
# column): the snapshot used to copy it as the source held it, for the restore to fail
# on it with the value in the error (int() of it, or PostgreSQL refusing the insert).
_WRONG_TYPE_SQLITE = {
    ("records", "kek_version"): "'SYNTHETIC-FORGED'",  # text in an integer column
    ("records", "stored_size"): "2.5",  # a real in an integer column
    ("records", "wrapped_dek"): str(10**12),  # an integer in a binary column
    ("records", "kind"): "CAST(kind AS BLOB)",  # a blob in a text column
    ("access_grants", "break_glass"): "'SYNTHETIC-FORGED'",  # SQLAlchemy read it as True
    ("access_grants", "reason"): "X'00'",  # a blob in a (nullable) text column
    ("kek_versions", "state"): "X'00'",  # its CHECK off: PRAGMA ignore_check_constraints
    ("record_signatures", "sealed_p7s"): "'SYNTHETIC-FORGED'",
    ("audit_events", "sequence"): "'SYNTHETIC-FORGED'",
}  # fmt: skip


@pytest.mark.backend("sqlite")
@pytest.mark.parametrize(("table", "column"), sorted(_WRONG_TYPE_SQLITE))
def test_a_value_of_another_type_fails_the_snapshot_by_column(
    make_source: Any, table: str, column: str
) -> None:
    source: Source = make_source("sqlite")
    source.add_records(2)
    source.add_other_rows()
    with source.engine.begin() as c:
        c.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        c.exec_driver_sql(
            f"UPDATE {table} SET {column} = {_WRONG_TYPE_SQLITE[table, column]} WHERE rowid ="
            f" (SELECT MIN(rowid) FROM {table})"
        )
    with pytest.raises(SourceIntegrityError, match=rf"{table} .*\({column}\)") as raised:
        b"".join(export(source.engine))
    assert "another type" in str(raised.value)
    for value in ("SYNTHETIC", str(10**12), "2.5"):
        assert value not in str(raised.value)


# PostgreSQL columns a database writer retyped (in the test's own database).
_RETYPED = {
    ("records", "kek_version"): "text",
    ("records", "stored_size"): "numeric",
    ("records", "created_by"): "bytea USING convert_to(created_by, 'UTF8')",
    ("access_grants", "principal"): "bytea USING convert_to(principal, 'UTF8')",
    ("kek_versions", "version"): "text",
    ("audit_head", "sequence"): "text",
}  # fmt: skip


@pytest.mark.backend("postgresql")
@pytest.mark.parametrize(("table", "column"), sorted(_RETYPED))
def test_a_postgresql_column_of_another_type_fails_the_snapshot_by_column(
    make_source: Any, table: str, column: str
) -> None:
    source: Source = make_source("postgresql")
    source.add_records(1)
    source.add_other_rows()
    with source.engine.begin() as c:
        c.exec_driver_sql(
            f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {_RETYPED[table, column]}"
        )
    with pytest.raises(SourceIntegrityError, match=rf"{table} .*\({column}\)") as raised:
        b"".join(export(source.engine))
    assert raised.value.__cause__ is None
    assert "another type" in str(raised.value)


@pytest.mark.parametrize(("table", "column", "value"), [
    ("records", "kek_version", "SYNTHETIC-FORGED"),
    ("records", "stored_size", "SYNTHETIC-FORGED"),
    ("records", "wrapped_dek", 10**12),
    ("access_grants", "break_glass", "SYNTHETIC-FORGED"),
    ("records", "created_at", "SYNTHETIC-FORGED"),
])  # fmt: skip
def test_a_snapshot_holding_another_type_loads_nothing_naming_the_column(
    source: Source, fresh_url: Any, backend: str, table: str, column: str, value: object
) -> None:
    """A snapshot an earlier release wrote, copying such a value: refused by table and
    column before any insert (SQLite stored it; PostgreSQL's error carried it)."""
    forged = forged_snapshot(b"".join(export(source.engine)), table, column, value)
    engine = make_engine(fresh_url(backend))
    try:
        upgrade(engine)
        with pytest.raises(SnapshotLoadError, match=rf"{table} .*\({column}\)") as raised:
            load(engine, [forged])
        assert "SYNTHETIC" not in str(raised.value)
        assert str(10**12) not in str(raised.value)
        assert all(not table_rows(engine, t) for t in tables() if t.name != "audit_head")
    finally:
        engine.dispose()
