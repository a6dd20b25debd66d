"""A database writer's malformed audit row is left out of the officer's listings, and
reported: an ``audit-tampered`` incident in the trail (one per listing and window), a
log line naming the row's sequence and field but no value, and ``VerifyChain`` naming
the row (``service.audit.listing``). A writer who also forges the service's own reports
cannot make a listing chase them (the attack of the cold review of 1a4b9d2).
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import audit_pb2 as aupb
from tests.integration.access.helpers import client, engine_for, events, grant, new_patient, verify

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
FORGED_OUTCOME = "forged-maybe"


def test_a_malformed_row_is_left_out_and_reported_once(
    service_factory: Any, fresh_database: str, issue: Any
) -> None:
    service = service_factory(fresh_database)
    officer = client(service, issue("officer-tamper", "security_officer"))
    clerk = client(service, issue("clerk-tamper", "records_clerk"))
    engine = engine_for(fresh_database)
    try:
        granted = grant(clerk, new_patient(), "dr-tamper")
        target = next(
            e.sequence for e in events(officer) if e.resource == f"grant/{granted.id}"
        )
        with engine.begin() as c:  # the database writer, without the token
            c.exec_driver_sql(
                f"UPDATE audit_events SET outcome = '{FORGED_OUTCOME}' WHERE sequence = {target}"
            )
        listed = events(officer)
        export = b"".join(
            c.data for c in officer.audit.ExportEvents(
                aupb.ExportEventsRequest(
                    query=aupb.QueryEventsRequest(), format=aupb.EXPORT_FORMAT_JSONL
                ),
                timeout=120,
            )
        )
        after = events(officer)
        checked = verify(officer)
    finally:
        officer.close()
        clerk.close()
        engine.dispose()
        service.stop()

    assert target not in {e.sequence for e in listed}
    assert target + 1 in {e.sequence for e in listed}  # the rest is still shown
    assert FORGED_OUTCOME.encode() not in export
    exported = [json.loads(line) for line in export.decode().splitlines()]
    assert exported
    assert target not in {e["sequence"] for e in exported}
    incidents = [
        e for e in after if e.action == "incident" and e.resource == f"audit/{target}"
    ]
    # Listed three times (QueryEvents, ExportEvents, QueryEvents): reported once.
    assert [(e.status, e.outcome) for e in incidents] == [
        ("audit-tampered", aupb.OUTCOME_FAILED)
    ]
    assert "medvault audit verify" in incidents[0].reason
    assert not checked.ok
    assert checked.first_bad_sequence == target
    log = service.log_path.read_text(encoding="utf-8", errors="replace")
    assert "left out of the listing" in log
    assert FORGED_OUTCOME not in log


COLUMNS = (
    "time, principal, application, role, action, resource, patient_index, outcome, "
    "status, reason, source, prev_hash, hash"
)
FORGED_ROWS = 600  # more than one page of a listing (storage.audit_log.QUERY_BATCH)


def _forge_rows(engine: sa.Engine, url: str, count: int) -> None:
    """``count`` copies of event 1 with an outcome the writer never stores, at negative
    sequences (below the chain: no append ever collides with them)."""
    values = COLUMNS.replace("outcome", "'forged'")
    with engine.begin() as c:
        if url.startswith("sqlite"):
            c.exec_driver_sql(
                "WITH RECURSIVE k(n) AS (SELECT 1 UNION ALL "
                f"SELECT n + 1 FROM k WHERE n < {count}) "
                f"INSERT INTO audit_events (sequence, {COLUMNS}) "
                f"SELECT -k.n, {values} FROM audit_events, k WHERE sequence = 1"
            )
        else:
            c.exec_driver_sql(
                f"INSERT INTO audit_events (sequence, {COLUMNS}) SELECT -k, {values} "
                f"FROM audit_events, generate_series(1, {count}) AS k WHERE sequence = 1"
            )


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


def test_a_listing_ends_when_its_own_reports_are_forged(
    service_factory: Any, fresh_database: str, issue: Any
) -> None:
    """Each report is appended to the trail an ascending listing reads; forged by the
    trigger, it comes back malformed. One report per listing: the listing ends."""
    service = service_factory(fresh_database)
    officer = client(service, issue("officer-loop", "security_officer"))
    engine = engine_for(fresh_database)
    try:
        events(officer)  # event 1, which the forged rows copy
        _forge_rows(engine, fresh_database, FORGED_ROWS)
        _forge_every_incident(engine, fresh_database)
        with engine.connect() as c:  # the module's database: earlier tests' events too
            before = c.exec_driver_sql("SELECT max(sequence) FROM audit_events").scalar_one()
        try:
            shown = list(officer.audit.QueryEvents(aupb.QueryEventsRequest(), timeout=60))
        except grpc.RpcError as e:
            pytest.fail(f"the listing did not end: {e.code()}")
        with engine.connect() as c:
            reports = c.exec_driver_sql(
                "SELECT resource FROM audit_events WHERE action = 'incident' AND sequence > ?"
                if fresh_database.startswith("sqlite") else
                "SELECT resource FROM audit_events WHERE action = 'incident' AND sequence > %s",
                (before,),
            ).all()
    finally:
        officer.close()
        engine.dispose()
        service.stop()

    assert [r.resource for r in reports] == [f"audit/-{FORGED_ROWS}"]
    assert all(e.sequence > 0 for e in shown)
