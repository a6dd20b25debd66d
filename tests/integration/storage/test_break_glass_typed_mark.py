"""Attack (cold review 9f): a clinician's reason decided whether the review queue treated a
genuine grant as a legacy row. ``queue`` tested the opened reason for the legacy mark's
text, which a clinician can type, while ``target`` tested the row; so a genuine grant
whose reason began "[legacy row, not verified]" was listed as its event named it, and
could stay pending for ever. Whether a row is legacy is now decided on the row as stored
(no MAC, a clear reason), in the queue as in ``target``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool
from service.authz.permissions import ACCESS_BREAK_GLASS
from storage.audit_log import SqlAuditLog
from storage.audit_sql import audit_events
from storage.break_glass import BreakGlassReview
from storage.grant_seal import GrantSealer
from storage.grants import LEGACY_MARK, SqlGrantStore
from tests.integration.storage.test_audit_log import (  # noqa: F401 - fixtures
    PATIENT,
    audit_engine,
    audit_log,
    audit_url,
    entry,
)

pytestmark = pytest.mark.integration
# ruff: noqa: F811  (the fixtures imported above are the parameters)

T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
REASONS = ["synthetic: patient unconscious", f"{LEGACY_MARK} synthetic, typed by a clinician"]


def _glass(
    engine: Engine, log: SqlAuditLog, pool: Pkcs11SessionPool, reason: str
) -> tuple[BreakGlassReview, str, list[str]]:
    reported: list[str] = []
    grants = SqlGrantStore(engine, GrantSealer(Pkcs11BlindIndexer(pool)), reported.append)
    glass = grants.break_glass(PATIENT, "dr-c", reason, timedelta(hours=1), T0)
    log.append([entry(1, action=ACCESS_BREAK_GLASS, resource=f"grant/{glass.id}",
                      outcome="allowed", patient_index=PATIENT, principal="dr-c")])  # fmt: skip
    return BreakGlassReview(grants, ACCESS_BREAK_GLASS), glass.id, reported


@pytest.mark.parametrize("reason", REASONS)
def test_a_genuine_grant_is_listed_and_closed_whatever_its_reason_says(
    audit_engine: Engine, audit_log: SqlAuditLog, keystore_pool: Pkcs11SessionPool, reason: str
) -> None:
    review, grant_id, reported = _glass(audit_engine, audit_log, keystore_pool, reason)
    # A database writer changes the event's principal: the genuine row (its MAC holds)
    # is what is listed and what the officer reviews.
    with audit_engine.begin() as c:
        c.execute(audit_events.update().where(audit_events.c.resource == f"grant/{grant_id}")
                  .values(principal="dr-other"))  # fmt: skip
    [item] = review.queue(include_reviewed=False)
    assert (item.grant.id, item.grant.principal) == (grant_id, "dr-c")
    target = review.target(grant_id)
    assert not target.flagged
    assert target.grant.principal == "dr-c"
    close = review.review_change(target, "officer-an", "checked", T0 + timedelta(hours=2))
    with audit_engine.begin() as c:
        close(c)
    assert review.queue(include_reviewed=False) == []
    # The event deleted afterwards: the genuine review still counts, nothing reported.
    with audit_engine.begin() as c:
        c.execute(sa.delete(audit_events).where(audit_events.c.resource == f"grant/{grant_id}"))
    reported.clear()
    assert review.queue(include_reviewed=False) == []
    [done] = review.queue(include_reviewed=True)
    assert (done.grant.id, done.grant.reviewed_by) == (grant_id, "officer-an")
    assert reported == []
