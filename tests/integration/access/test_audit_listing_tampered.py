"""A database writer's malformed audit row is left out of the officer's listings, and
reported: an ``audit-tampered`` incident in the trail (one per listing and window), a
log line naming the row's sequence and field but no value, and ``VerifyChain`` naming
the row (``service.audit.listing``).
(``test_audit_listing_forged.py``: what a writer who forges more can do).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

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
