"""A database writer against the officer's listings (``service.audit.listing``), each
test on a database of its own (a module's shared one would hold the other tests' forged
rows, and a listing reports only the first it meets):

* a writer who also forges every new incident row (a trigger) cannot make an ascending
  listing chase its own reports (cold review of 1a4b9d2: ~500 incidents per page);
* rows at sequence 0 and below are in no chain: verification walks from 1, and listings
  neither show nor report them (review 2: a well-formed copy there was shown as real);
* on PostgreSQL, a time Python cannot hold (``infinity``) failed every listing and
  ``audit verify`` in psycopg: it is left out, reported and named like any malformed row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import audit_pb2 as aupb
from storage import AuditEntry
from storage.audit_log import SqlAuditLog
from storage.sql_metadata import make_engine
from tests.fixtures.databases import new_database
from tests.integration.access.helpers import client, engine_for, events, verify

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def own_database(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An empty database of this test only."""
    yield from new_database(request, database_url, tmp_path_factory)


COLUMNS = (
    "time, principal, application, role, action, resource, patient_index, outcome, "
    "status, reason, source, prev_hash, hash"
)
FORGED_ROWS = 520  # more than one page of a listing (storage.audit_log.QUERY_BATCH)


def _forge_every_incident(engine: sa.Engine, url: str) -> None:
    """A trigger that stores every new incident event with a forged outcome."""
    with engine.begin() as c:
        if url.startswith("sqlite"):
            c.exec_driver_sql(
                "CREATE TRIGGER forge_incidents AFTER INSERT ON audit_events "
                "WHEN NEW.action = 'incident' BEGIN "
                "UPDATE audit_events SET outcome = 'forged' WHERE sequence = NEW.sequence; END"
            )
        else:
            c.exec_driver_sql(
                "CREATE FUNCTION forge_incidents() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN IF NEW.action = 'incident' THEN NEW.outcome := 'forged'; END IF; "
                "RETURN NEW; END $$"
            )
            c.exec_driver_sql(
                "CREATE TRIGGER forge_incidents BEFORE INSERT ON audit_events "
                "FOR EACH ROW EXECUTE FUNCTION forge_incidents()"
            )


def _head(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.exec_driver_sql("SELECT max(sequence) FROM audit_events").scalar_one())


def _incidents_after(engine: sa.Engine, url: str, sequence: int) -> list[str]:
    marker = "?" if url.startswith("sqlite") else "%s"
    with engine.connect() as c:
        rows = c.exec_driver_sql(
            "SELECT resource FROM audit_events WHERE action = 'incident' AND sequence > "
            f"{marker} ORDER BY sequence",
            (sequence,),
        ).all()
    return [r.resource for r in rows]


def test_a_listing_ends_when_its_own_reports_are_forged(
    service_factory: Any, own_database: str, issue: Any
) -> None:
    """Each report is appended to the trail an ascending listing reads; forged by the
    trigger, it comes back malformed, and a listing pages on while its pages are full.
    One report per listing: the listing ends (before, it wrote ~500 per page)."""
    service = service_factory(own_database)
    officer = client(service, issue("officer-loop", "security_officer"))
    engine = engine_for(own_database)
    try:
        events(officer)
        first = _head(engine) + 1
        chain = SqlAuditLog(make_engine(own_database))  # a second writer, as a replica
        chain.append([_entry(n) for n in range(FORGED_ROWS)])
        with engine.begin() as c:  # the database writer forges them all
            c.exec_driver_sql(
                f"UPDATE audit_events SET outcome = 'forged' WHERE sequence >= {first}"
            )
        _forge_every_incident(engine, own_database)
        before = _head(engine)
        try:
            shown = list(officer.audit.QueryEvents(aupb.QueryEventsRequest(), timeout=60))
        except grpc.RpcError as e:
            pytest.fail(f"the listing did not end: {e.code()}")
        reports = _incidents_after(engine, own_database, before)
    finally:
        officer.close()
        engine.dispose()
        service.stop()

    assert reports == [f"audit/{first}"]
    assert not [e for e in shown if first <= e.sequence < first + FORGED_ROWS]
    assert max(e.sequence for e in shown) >= first + FORGED_ROWS  # it went on past them


def _entry(n: int) -> AuditEntry:
    return AuditEntry(
        time=datetime.now(UTC), principal=f"synthetic-{n}", action="records.read",
        resource=f"record/synthetic-{n}/v1", outcome="allowed",
    )  # fmt: skip


def test_rows_outside_the_chain_are_neither_shown_nor_reported(
    service_factory: Any, own_database: str, issue: Any
) -> None:
    """A database writer's rows at sequence 0 and below (a well-formed copy of a real
    event, and a malformed one) are in no chain: verification walks sequences from 1,
    and listings show and report only those (review 2 of this feature)."""
    service = service_factory(own_database)
    officer = client(service, issue("officer-below", "security_officer"))
    engine = engine_for(own_database)
    try:
        genuine = events(officer)[-1].sequence
        values = COLUMNS.replace("outcome", "'forged'")
        with engine.begin() as c:
            c.exec_driver_sql(
                f"INSERT INTO audit_events (sequence, {COLUMNS}) "
                f"SELECT 0, {COLUMNS} FROM audit_events WHERE sequence = {genuine}"
            )
            c.exec_driver_sql(
                f"INSERT INTO audit_events (sequence, {COLUMNS}) "
                f"SELECT -7, {values} FROM audit_events WHERE sequence = {genuine}"
            )
        before = _head(engine)
        listed = events(officer)
        reports = _incidents_after(engine, own_database, before)
    finally:
        officer.close()
        engine.dispose()
        service.stop()

    assert min(e.sequence for e in listed) >= 1
    assert not [r for r in reports if r.startswith("audit/")]


@pytest.mark.backend("postgresql")
def test_a_time_python_cannot_hold_is_left_out_and_reported_once(
    service_factory: Any, own_database: str, issue: Any
) -> None:
    service = service_factory(own_database)
    officer = client(service, issue("officer-infinity", "security_officer"))
    engine = engine_for(own_database)
    try:
        target = events(officer)[-1].sequence
        with engine.begin() as c:  # the database writer, without the token
            c.exec_driver_sql(
                f"UPDATE audit_events SET time = 'infinity' WHERE sequence = {target}"
            )
        before = _head(engine)
        listed = events(officer)
        export = b"".join(
            chunk.data for chunk in officer.audit.ExportEvents(
                aupb.ExportEventsRequest(
                    query=aupb.QueryEventsRequest(), format=aupb.EXPORT_FORMAT_JSONL
                ),
                timeout=120,
            )
        )  # fmt: skip
        reports = _incidents_after(engine, own_database, before)
        checked = verify(officer)
    finally:
        officer.close()
        engine.dispose()
        service.stop()

    assert target not in {e.sequence for e in listed}
    assert target + 1 in {e.sequence for e in listed}  # the rest is still shown
    exported = [json.loads(line)["sequence"] for line in export.decode().splitlines()]
    assert target not in exported
    assert target + 1 in exported
    assert reports == [f"audit/{target}"]  # listed twice, reported once
    assert (checked.ok, checked.first_bad_sequence) == (False, target)
    assert "infinity" not in service.log_path.read_text(encoding="utf-8", errors="replace")
