"""The audit writer's driver SQL (``storage.audit_sql``) against its Core statements.

The writer runs its three per-transaction statements as SQL compiled once per dialect,
with values converted by SQLAlchemy's bind processors (issue 12). Here the same events are
written by the Core statements, as the writer ran them before, into one fresh database
and by ``SqlAuditLog`` into another; the raw rows read back must be identical, on SQLite
and PostgreSQL. The errors the writer translates still arrive as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.audit_log import AuditEventRejectedError, SqlAuditLog, _row_values
from storage.audit_model import AuditEntry, ChainedEvent, chain_hash
from storage.audit_rows import read_head
from storage.audit_sql import (
    INSERT_EVENTS,
    LOCK_HEAD,
    UPDATE_HEAD,
    WriterStatements,
    audit_events,
    audit_head,
)
from storage.errors import BackendUnavailableError
from storage.sql_metadata import make_engine, upgrade
from tests.fixtures.databases import new_database

pytestmark = pytest.mark.integration

# Microseconds and an offset that is not UTC (nor a whole hour): stored as UTC.
T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=timezone(-timedelta(hours=3, minutes=30)))
PATIENT = bytes(range(32))


def entry(n: int, **changes: Any) -> AuditEntry:
    values: dict[str, Any] = {
        "time": T0 + timedelta(seconds=n, microseconds=n),
        "principal": f"dr-{n}",
        "action": "GetRecord",
        "resource": f"rec-{n}",
        "outcome": "allowed",
        "application": "his",
        "role": "physician",
        "status": "OK",
        "source": "10.0.0.1",
        "patient_index": PATIENT,
        "reason": "routine",
    }
    return AuditEntry(**(values | changes))


# One event alone (a single execute), then three in one batch (an executemany).
BATCHES = (
    [entry(0, patient_index=None, reason="Überweisung: 診察 ✓")],
    [entry(1), entry(2, patient_index=None, reason=""), entry(3, reason="naïve ünïcödé ☃")],
)


def core_append(connection: Connection, entries: list[AuditEntry]) -> None:
    """The writer's transaction as it ran before: its Core statements through ``execute``."""
    head = connection.execute(LOCK_HEAD).one()
    sequence, prev = read_head(head.sequence, head.hash)
    rows = []
    for e in entries:
        sequence += 1
        digest = chain_hash(prev, sequence, e)
        rows.append(_row_values(ChainedEvent(sequence, e, prev, digest)))
        prev = digest
    connection.execute(INSERT_EVENTS, rows)
    connection.execute(UPDATE_HEAD, {"sequence": sequence, "hash": prev})


def raw_rows(engine: Engine, table: sa.Table, order: str) -> list[tuple[Any, ...]]:
    """Every row as the driver returns it, each column with its storage form: SQLite's
    storage class, PostgreSQL's text output (bytea in hex, timestamps to the microsecond)."""
    if engine.dialect.name == "sqlite":
        columns = ", ".join(f"typeof({c.name}), {c.name}" for c in table.c)
    else:
        columns = ", ".join(f"{c.name}, {c.name}::text" for c in table.c)
    with engine.connect() as c:
        return [
            tuple(r)
            for r in c.exec_driver_sql(
                f"SELECT {columns} FROM {table.name} ORDER BY {table.name}.{order}"
            )
        ]


@pytest.fixture
def engines(
    database_url: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Engine, Engine]]:
    """Two fresh, migrated databases on the backend ``database_url`` selects."""
    for first in new_database(request, database_url, tmp_path_factory, migrated=True):
        for second in new_database(request, database_url, tmp_path_factory, migrated=True):
            made = make_engine(first), make_engine(second)
            for engine in made:
                upgrade(engine)
            yield made
            for engine in made:
                engine.dispose()


def test_driver_sql_stores_the_core_statements_bytes(engines: tuple[Engine, Engine]) -> None:
    core, driver = engines
    sent: list[tuple[str, bool]] = []
    sa.event.listen(driver, "before_cursor_execute", lambda *a: sent.append((a[2], a[5])))
    log = SqlAuditLog(driver)
    for batch in BATCHES:
        with core.begin() as connection:
            core_append(connection, batch)
        log.append(batch)

    events = raw_rows(driver, audit_events, "sequence")
    assert events == raw_rows(core, audit_events, "sequence")
    assert raw_rows(driver, audit_head, "id") == raw_rows(core, audit_head, "id")
    assert len(events) == 4
    assert log.head()[0] == 4
    if driver.dialect.name == "sqlite":  # the DateTime processor's text, in UTC
        first = dict(zip([c.name for c in audit_events.c], events[0][1::2], strict=True))
        assert events[0][:2] == ("integer", 1)
        assert first["time"] == "2026-03-04 08:36:07.123456"
        assert first["patient_index"] is None
        assert first["reason"] == "Überweisung: 診察 ✓"
    # Every statement went through the cursor events the deadline listeners use.
    writer = WriterStatements.compile(driver.dialect)
    one = [writer.lock_head.sql, writer.insert_events.sql, writer.update_head.sql]
    assert [s for s, _ in sent if s in one] == one + one
    assert [many for s, many in sent if s == writer.insert_events.sql] == [False, True]


def test_sequence_taken_outside_the_writer_fails_closed(engines: tuple[Engine, Engine]) -> None:
    """A duplicate key still reaches the writer's duplicate path."""
    _, engine = engines
    with engine.begin() as connection:
        connection.execute(
            INSERT_EVENTS,
            _row_values(ChainedEvent(1, entry(0), bytes(32), bytes(32))),
        )
    with pytest.raises(BackendUnavailableError, match="audit sequence taken"):
        SqlAuditLog(engine).append([entry(1)])


def test_value_refused_as_through_execute(engines: tuple[Engine, Engine]) -> None:
    """A value the column cannot take is refused by both paths alike."""
    _, engine = engines
    log = SqlAuditLog(engine)
    bad = _row_values(ChainedEvent(1, entry(0), bytes(32), bytes(32))) | {"time": "not a time"}
    writer = WriterStatements.compile(engine.dialect)
    for run in (
        lambda c: c.execute(INSERT_EVENTS, [bad, bad]),
        lambda c: writer.insert_events.execute_many(c, [bad, bad]),
    ):
        with pytest.raises(AuditEventRejectedError):
            log._run(run, write=True)
    assert log.head() == (0, bytes(32))
    assert log.append([entry(1)])[0].sequence == 1
