"""Fail closed: when the audit event cannot be committed, a read sends nothing.

A read fetches and decrypts its first content while its event commits (issue 12): a
record of one chunk and one of several (whose first segment is fetched before the
commit is awaited) are both checked.

Database unavailable (SQLite: the write lock held elsewhere past the busy timeout;
PostgreSQL: the database refuses connections, or the audit insert fails with a
connection error) and write errors (the audit table renamed away; an insert trigger
that raises) must each give UNAVAILABLE with neither the metadata message nor a content
byte, leave no "allowed" read event, and reads must work again once the cause is gone.

PYTEST_DONT_REWRITE: failures name codes and counts only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import (
    THREE_SEGMENTS,
    Client,
    audit_inserts_refused,
    audit_writer_held,
    client,
    engine_for,
    events,
    fetch,
    new_patient,
    put_record,
    verify,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
CONTENT = b"synthetic fail-closed note"
LARGE = THREE_SEGMENTS


@dataclass
class World:
    service: RunningService
    url: str
    engine: sa.Engine
    reader: Client  # CN test-app: records.read on every patient
    officer: Client
    patient: pb.PatientId
    record: pb.Record
    large: pb.Record
    reads_ok: int = 0


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    service: RunningService = service_factory(fresh_database)
    reader = Client("test-app", service.channel())
    officer = client(service, issue("officer-failclosed", "security_officer"))
    patient = new_patient()
    record = put_record(reader, patient, CONTENT)
    large = put_record(reader, patient, LARGE, chunk=1 << 20)
    engine = engine_for(fresh_database)
    w = World(service, fresh_database, engine, reader, officer, patient, record, large)
    yield w
    reader.close()
    officer.close()
    engine.dispose()
    service.stop()


def read_works(w: World) -> None:
    for record, content in ((w.record, CONTENT), (w.large, LARGE)):
        fetched = fetch(w.reader, record.id)
        assert fetched.error is None, f"read failed after recovery: {fetched.code.name}"
        assert fetched.content == content, "content differs"
        w.reads_ok += 1


def refused_with_nothing_sent(w: World, cause: Callable[[], AbstractContextManager[Any]]) -> None:
    read_works(w)
    with cause(), ThreadPoolExecutor(2) as pool:
        # At once: both events wait in one audit batch (one busy timeout, not two).
        refused = list(pool.map(lambda r: fetch(w.reader, r.id), (w.record, w.large)))
    for size, fetched in zip(("small", "large"), refused, strict=True):
        assert fetched.code == grpc.StatusCode.UNAVAILABLE, (
            f"{size}: expected UNAVAILABLE, got {fetched.code.name}"
        )
        assert fetched.metadata is None, f"{size}: metadata sent, the event not committed"
        assert fetched.content == b"", f"{size}: {len(fetched.content)} content bytes sent"
    read_works(w)
    allowed = events(
        w.officer, principal="test-app", action="records.read", outcome=aupb.OUTCOME_ALLOWED
    )
    assert len(allowed) == w.reads_ok, (
        f"{len(allowed)} allowed read events for {w.reads_ok} delivered reads"
    )
    result = verify(w.officer)
    assert result.ok, f"chain broken after the outage: {result.reason}"
    log = w.service.log_path.read_text(errors="replace")
    assert "audit append failed" in log, "the failed append is not logged"
    assert w.patient.id not in log, "a patient identifier reached the log"


# --- write errors, both backends -------------------------------------------------------


def test_audit_table_renamed(world: World) -> None:
    @contextmanager
    def renamed() -> Iterator[None]:
        with world.engine.begin() as c:
            c.execute(sa.text("ALTER TABLE audit_events RENAME TO audit_events_moved"))
        try:
            yield
        finally:
            with world.engine.begin() as c:
                c.execute(sa.text("ALTER TABLE audit_events_moved RENAME TO audit_events"))

    refused_with_nothing_sent(world, renamed)


def test_audit_insert_raises(world: World) -> None:
    refused_with_nothing_sent(world, lambda: audit_inserts_refused(world.url, world.engine))


# --- database unavailable --------------------------------------------------------------


@pytest.mark.backend("sqlite")
def test_sqlite_locked_past_busy_timeout(world: World) -> None:
    # Readers still read (WAL); the audit writer waits out busy_timeout, then fails.
    refused_with_nothing_sent(world, lambda: audit_writer_held(world.url, world.engine))


@pytest.mark.backend("postgresql")
def test_postgresql_refusing_connections(world: World) -> None:
    name = sa.make_url(world.url).database
    admin = sa.create_engine(
        sa.make_url(world.url).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )

    @contextmanager
    def down() -> Iterator[None]:
        with admin.connect() as c:
            c.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            c.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
        try:
            yield
        finally:
            with admin.connect() as c:
                c.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))

    try:
        world.engine.dispose()
        refused_with_nothing_sent(world, down)
    finally:
        admin.dispose()


@pytest.mark.backend("postgresql")
def test_postgresql_audit_connection_lost(world: World) -> None:
    """Only the audit insert loses its connection (SQLSTATE 08006), reads still work."""

    @contextmanager
    def lost() -> Iterator[None]:
        with world.engine.begin() as c:
            c.execute(
                sa.text(
                    "CREATE FUNCTION audit_lost() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '08006'; END $$"
                )
            )
            c.execute(
                sa.text(
                    "CREATE TRIGGER audit_lost BEFORE INSERT ON audit_events "
                    "FOR EACH ROW EXECUTE FUNCTION audit_lost()"
                )
            )
        try:
            yield
        finally:
            with world.engine.begin() as c:
                c.execute(sa.text("DROP TRIGGER audit_lost ON audit_events"))
                c.execute(sa.text("DROP FUNCTION audit_lost()"))

    refused_with_nothing_sent(world, lost)
