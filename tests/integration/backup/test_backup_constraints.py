"""Rows of the right type that break the schema's constraints: the backup fails naming
table and constraint (never a value), where it completed, verified and then failed to
load at restore time; a restore of a snapshot holding such a row is refused the same way,
and the database's own refusal of a row never reaches the output with the row's values.

Real components: the session's SoftHSM2 token, SeaweedFS, SQLite and PostgreSQL.
"""

# Fixtures come from restore_fixtures (the backup conftest is another module's): pytest
# finds them by the imported name, which ruff reads as a redefinition.
# ruff: noqa: F811

from __future__ import annotations

import base64
import json
import logging
import secrets
from typing import Any

import pytest
import sqlalchemy as sa

from service.backup.drill import audited_drill
from storage.backup import SnapshotLoadError, SourceIntegrityError
from storage.backup.drill import DrillRequest
from storage.backup.manifest import MANIFESTS_PREFIX
from storage.backup.retention import list_backups
from storage.backup.runs import backup_runs
from storage.backup.snapshot import export, load, tables
from storage.backup.targets import S3Target
from storage.sql_metadata import make_engine, upgrade
from tests.integration.backup.helpers import (
    Source,
    forge_backup_snapshot,
    forged_snapshot,
    table_rows,
)
from tests.integration.backup.restore_fixtures import (  # noqa: F401  (fixtures)
    SignedSource,
    checks_for,
    doc_signer,
    scratch_for,
    signed_source,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

_FIRST_RECORD = "WHERE object_key = (SELECT MIN(object_key) FROM records)"
_OFF = "PRAGMA ignore_check_constraints = ON"

# backend -> case -> (statements a database writer runs, name the error must give, the
# synthetic value it must not). The SQLite ones without a constraint dropped load into a
# SQLite scratch database (the drill's default) but not into PostgreSQL. (A PRAGMA stays
# on its pooled connection: this test's source only.)
_BROKEN: dict[str, dict[str, tuple[list[str], str, str | None]]] = {
    "sqlite": {
        "grant without a reason": (
            [_OFF, "UPDATE access_grants SET reason = NULL, principal = 'SYNTHPRINCIPAL'"],
            "ck_access_grants_break_glass", "SYNTHPRINCIPAL",
        ),
        "kek state outside the check": (
            [_OFF, "UPDATE kek_versions SET state = 'SYNTHSTATE'"],
            "ck_kek_versions_state", "SYNTHSTATE",
        ),
        "second audit head": (
            [_OFF, "UPDATE audit_head SET id = 7"], "ck_audit_head_single_row", None,
        ),
        "NUL in text": (
            ["UPDATE access_grants SET principal = 'SYNTHNUL' || char(0) || 'x'"],
            "(principal)", "SYNTHNUL",
        ),
        "integer past 32 bits": (
            [f"UPDATE records SET segment_size = 90000000001 {_FIRST_RECORD}"],
            "(segment_size)", "90000000001",
        ),
        "String(32) of 40 characters": (
            ["UPDATE record_signatures SET algorithm = 'SYNTHLONG' || printf('%031d', 0)"],
            "(algorithm)", "SYNTHLONG",
        ),
        "signature of no record": (
            ["PRAGMA foreign_keys = OFF", "UPDATE record_signatures SET version = 77,"
             " certificate_subject = 'CN=SYNTHSUBJECT'"],
            "fk_record_signatures_record", "SYNTHSUBJECT",
        ),
        # LargeBinary(32) of 3,000 bytes: SQLite keeps it, PostgreSQL's bytea too, but not
        # in a btree index (2,704 bytes at most): the restore into PostgreSQL failed on
        # ix_access_grants_principal_patient (review 9i).
        "binary past its length": (
            ["UPDATE access_grants SET patient_index = randomblob(3000),"
             " principal = 'SYNTHPRINCIPAL'"],
            "(patient_index)", "SYNTHPRINCIPAL",
        ),
    },
    "postgresql": {
        "grant without a reason": (
            ["ALTER TABLE access_grants DROP CONSTRAINT ck_access_grants_break_glass",
             "UPDATE access_grants SET reason = NULL, principal = 'SYNTHPRINCIPAL'"],
            "ck_access_grants_break_glass", "SYNTHPRINCIPAL",
        ),
        "kek state outside the check": (
            ["ALTER TABLE kek_versions DROP CONSTRAINT ck_kek_versions_state",
             "UPDATE kek_versions SET state = 'SYNTHSTATE'"],
            "ck_kek_versions_state", "SYNTHSTATE",
        ),
        "object key twice": (
            ["ALTER TABLE records DROP CONSTRAINT uq_records_object_key",
             "UPDATE records SET object_key = 'objects/SYNTHDUP'"],
            "uq_records_object_key", "SYNTHDUP",
        ),
        "grant id twice": (
            ["ALTER TABLE access_grants DROP CONSTRAINT pk_access_grants",
             "INSERT INTO access_grants SELECT * FROM access_grants",
             "UPDATE access_grants SET principal = 'SYNTHPRINCIPAL'"],
            "pk_access_grants", "SYNTHPRINCIPAL",
        ),
        "audit sequence twice": (
            ["ALTER TABLE audit_events DROP CONSTRAINT pk_audit_events",
             "INSERT INTO audit_events SELECT * FROM audit_events",
             "UPDATE audit_events SET resource = 'SYNTHRESOURCE'"],
            "pk_audit_events", "SYNTHRESOURCE",
        ),
        "signature of no record": (
            ["ALTER TABLE record_signatures DROP CONSTRAINT fk_record_signatures_record",
             "UPDATE record_signatures SET version = 77,"
             " certificate_subject = 'CN=SYNTHSUBJECT'"],
            "fk_record_signatures_record", "SYNTHSUBJECT",
        ),
        "binary past its length": (
            ["DROP INDEX ix_access_grants_patient",
             "DROP INDEX ix_access_grants_principal_patient",
             "UPDATE access_grants SET principal = 'SYNTHPRINCIPAL', patient_index ="
             " (SELECT decode(string_agg(md5(random()::text), ''), 'hex')"
             " FROM generate_series(1, 188))"],
            "(patient_index)", "SYNTHPRINCIPAL",
        ),
    },
}  # fmt: skip
_CASES = [(backend, case) for backend, cases in _BROKEN.items() for case in sorted(cases)]


@pytest.mark.parametrize(("backend", "case"), _CASES)
def test_a_row_breaking_a_constraint_fails_the_backup_naming_it_never_its_values(
    source: Source, s3_target: S3Target, backend: str, case: str,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The backup fails (the previous one stays the newest complete backup), naming the
    table and the constraint or column, with the operator's next steps."""
    statements, name, synthetic = _BROKEN[backend][case]
    caplog.set_level(logging.DEBUG)
    before = source.backup(s3_target)
    with source.engine.begin() as c:
        for statement in statements:
            c.exec_driver_sql(statement)
    with pytest.raises(SourceIntegrityError) as raised:
        source.backup(s3_target)
    message = str(raised.value)
    assert name in message
    assert "backup not completed" in message
    assert "medvault audit verify" in message
    assert raised.value.__cause__ is None  # no driver error carrying the value
    captured = capfd.readouterr()
    for text in (message, repr(raised.value), caplog.text, captured.out, captured.err):
        assert synthetic is None or synthetic not in text
    assert [b.id for b in list_backups(s3_target)] == [before.backup_id]
    assert len(list(s3_target.list(MANIFESTS_PREFIX))) == 2  # one manifest, one signature


def test_the_row_is_named_by_its_key_when_medvault_wrote_the_key(source: Source) -> None:
    """Ids medvault makes (32 hex) and integers are shown; the operator finds the row."""
    with source.engine.begin() as c:
        grant_id = c.scalar(sa.text("SELECT id FROM access_grants"))
        if source.engine.dialect.name == "sqlite":
            c.exec_driver_sql(_OFF)
        else:
            c.exec_driver_sql(
                "ALTER TABLE access_grants DROP CONSTRAINT ck_access_grants_break_glass"
            )
        c.exec_driver_sql("UPDATE access_grants SET reason = NULL")
    with pytest.raises(SourceIntegrityError) as raised:
        b"".join(export(source.engine))
    assert f"access_grants row (id={grant_id})" in str(raised.value)


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_key_medvault_never_writes_is_not_shown(source: Source) -> None:
    """A database writer's key may be anything, a patient's name too: not shown."""
    with source.engine.begin() as c:
        c.exec_driver_sql("UPDATE access_grants SET id = 'SYNTHNAME' || printf('%031d', 0)")
    with pytest.raises(SourceIntegrityError, match=r"access_grants row holds text longer") as e:
        b"".join(export(source.engine))
    assert "SYNTHNAME" not in str(e.value)


# A snapshot an earlier release wrote of such a database: (table, column, value).
_RANDOM_3000 = base64.b64encode(secrets.token_bytes(3000)).decode()
_FORGED = {
    "kek state": ("kek_versions", "state", "SYNTHSTATE", "ck_kek_versions_state"),
    "grant without a reason": ("access_grants", "reason", None, "ck_access_grants_break_glass"),
    "NUL in text": ("access_grants", "principal", "SYNTHNUL\x00x", "(principal)"),
    "integer past 32 bits": ("records", "segment_size", 90000000001, "(segment_size)"),
    "String(32) of 40": ("record_signatures", "algorithm", "SYNTHLONG" + "0" * 31, "(algorithm)"),
    "signature of no record": ("record_signatures", "version", 77, "fk_record_signatures_record"),
    # Review 9i. Loaded into SQLite; PostgreSQL refused it in its index (OperationalError,
    # after the objects were copied).
    "binary past its length": ("access_grants", "patient_index", {"$b64": _RANDOM_3000},
                               "(patient_index)"),
    # JSON spells a lone surrogate; no UTF-8 encodes it: the insert raised
    # UnicodeEncodeError, after the checks.
    "lone surrogate": ("records", "created_by", "SYNTH\ud800x", "(created_by)"),
    # A time past year 9999 once in UTC: OverflowError, not the malformed line's error.
    "time past 9999 in UTC": ("access_grants", "expires_at",
                              {"$dt": "9999-12-31T23:00:00-05:00"}, "is malformed"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(_FORGED))
def test_a_snapshot_breaking_a_constraint_loads_nothing_naming_it(
    source: Source, fresh_url: Any, backend: str, case: str
) -> None:
    """Refused before any insert, into either backend: PostgreSQL's refusal quoted the
    row, and SQLite took the NUL, the integer and the long text."""
    table, column, value, name = _FORGED[case]
    forged = forged_snapshot(b"".join(export(source.engine)), table, column, value)
    engine = make_engine(fresh_url(backend))
    try:
        upgrade(engine)
        with pytest.raises(SnapshotLoadError) as raised:
            load(engine, [forged])
        assert name in str(raised.value)
        for text in ("SYNTH", "90000000001", "synthetic emergency", "dr-synth"):
            assert text not in str(raised.value)
        assert all(not table_rows(engine, t) for t in tables() if t.name != "audit_head")
    finally:
        engine.dispose()


def test_the_databases_refusal_of_a_row_is_named_without_its_values(
    source: Source, fresh_url: Any, backend: str
) -> None:
    """A target stricter than medvault's schema (here a unique index a DBA added): the
    driver's error, whose PostgreSQL detail quotes the key, becomes a SnapshotLoadError
    naming the table and the constraint, not chained (a logged traceback would show it)."""
    data = b"".join(export(source.engine))
    engine = make_engine(fresh_url(backend))
    try:
        upgrade(engine)
        with engine.begin() as c:
            c.exec_driver_sql("CREATE UNIQUE INDEX ux_extra ON records (created_by)")
        with pytest.raises(SnapshotLoadError) as raised:
            load(engine, [data])
        message = str(raised.value)
        assert "records" in message
        assert "ux_extra" in message or "records.created_by" in message
        assert "test-app" not in message
        assert raised.value.__cause__ is None
        assert not table_rows(engine, tables()[1])
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_backup_breaking_a_constraint_fails_the_drill_naming_it(
    signed_source: SignedSource, s3_target: S3Target, s3_server: Any
) -> None:
    """A signed backup an earlier release made: the drill fails by table and constraint
    (the SQLite scratch database's refusal was reported by its class name only)."""
    source = signed_source.source
    backup = source.backup(s3_target)
    forge_backup_snapshot(source, s3_target, backup.backup_id, "kek_versions", "state",
                          "SYNTHSTATE")  # fmt: skip
    request = DrillRequest(s3_target, backup.backup_id, scratch_for(s3_server, "sqlite"))
    report = audited_drill(request, checks_for(source.pool, signed_source.signer), audit=None,
                           principal="console:test")  # fmt: skip
    assert not report.ok
    assert [f.check for f in report.failures] == ["restore"]
    assert "ck_kek_versions_state" in report.failures[0].detail
    assert "SYNTH" not in json.dumps(report.document)


def test_the_metadata_has_every_constraint_the_migrations_create(
    fresh_url: Any, backend: str
) -> None:
    """The checks are derived from the SQLAlchemy tables: they must hold every primary
    key, UNIQUE, CHECK and foreign key a migrated database enforces, by the same names
    (audit_head's CHECK and the audit tables' key names were only in migration 0002)."""
    engine = make_engine(fresh_url(backend))
    try:
        upgrade(engine)
        inspector = sa.inspect(engine)
        for table in tables():
            declared = {_described(c) for c in table.constraints}
            pk = inspector.get_pk_constraint(table.name)
            found = {("PrimaryKeyConstraint", pk["name"], tuple(sorted(pk["constrained_columns"])))}
            for c in inspector.get_check_constraints(table.name):
                found.add(("CheckConstraint", c["name"], ()))
            for c in inspector.get_unique_constraints(table.name):
                found.add(("UniqueConstraint", c["name"], tuple(sorted(c["column_names"]))))
            for c in inspector.get_foreign_keys(table.name):
                columns = tuple(sorted(c["constrained_columns"]))
                found.add(("ForeignKeyConstraint", c["name"], columns))
            assert declared == found, table.name
    finally:
        engine.dispose()


def _described(constraint: sa.Constraint) -> tuple[str, object, tuple[str, ...]]:
    """Kind, name and columns (a CHECK's are not compared)."""
    if isinstance(constraint, sa.CheckConstraint):
        return "CheckConstraint", constraint.name, ()
    columns = constraint.columns  # type: ignore[attr-defined]
    return type(constraint).__name__, constraint.name, tuple(sorted(c.name for c in columns))


def test_the_metadata_declares_every_column_as_the_migrations_create_it(
    fresh_url: Any, backend: str
) -> None:
    """The per-value checks are derived from the columns (``String(n)`` lengths, integer
    widths, NOT NULL): each column of a migrated database has the metadata's type, as the
    dialect renders it, and nullability. ``backup_runs`` too (not backed up, but its
    ``mac`` of migration 0015 is what the ledger's queries and MAC assume)."""
    engine = make_engine(fresh_url(backend))
    try:
        upgrade(engine)
        inspector = sa.inspect(engine)
        for table in [*tables(), backup_runs]:
            found = {
                c["name"]: (c["type"].compile(dialect=engine.dialect), bool(c["nullable"]))
                for c in inspector.get_columns(table.name)
            }
            declared = {
                c.name: (c.type.compile(dialect=engine.dialect), bool(c.nullable)) for c in table.c
            }
            assert declared == found, table.name
    finally:
        engine.dispose()
