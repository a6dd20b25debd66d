"""Attack (cold review 9c): a database writer (no token) takes a break-the-glass access off
the officer's pending review queue by making its row look like a legacy (pre-0009) row.

Whether a row is legacy is decided on two columns nothing authenticates (``mac`` NULL,
``reason`` not empty), and a legacy row's clear review columns were taken as they stood:
the access counted as reviewed, by whichever officer the writer named, and the officer
could not review it. A legacy row's review now counts only if the service sealed it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool
from service.authz.permissions import ACCESS_BREAK_GLASS
from storage.audit_log import SqlAuditLog
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


def test_a_break_glass_row_made_legacy_stays_in_the_pending_queue(
    audit_engine: Engine, audit_log: SqlAuditLog, keystore_pool: Pkcs11SessionPool
) -> None:
    reported: list[str] = []
    grants = SqlGrantStore(audit_engine, GrantSealer(Pkcs11BlindIndexer(keystore_pool)),
                           reported.append)  # fmt: skip
    glass = grants.break_glass(PATIENT, "dr-x", "synthetic reason", timedelta(hours=1), T0)
    event = entry(1, action=ACCESS_BREAK_GLASS, resource=f"grant/{glass.id}",
                  outcome="allowed", patient_index=PATIENT, principal="dr-x")  # fmt: skip
    audit_log.append([event])
    review = BreakGlassReview(grants, ACCESS_BREAK_GLASS)
    assert [i.grant.id for i in review.queue(include_reviewed=False)] == [glass.id]
    with audit_engine.begin() as c:
        c.execute(sa.text(
            "UPDATE access_grants SET mac = NULL, reason = 'x', "
            "reviewed_at = '2024-03-01 13:00:00.000000', reviewed_by = 'sec-officer', "
            "review_comment = 'looked fine' WHERE id = :id"
        ), {"id": glass.id})  # fmt: skip
    # Still pending, its clear review shown as not verified; the row is reported.
    pending = review.queue(include_reviewed=False)
    assert [i.grant.id for i in pending] == [glass.id]
    assert pending[0].grant.reviewed_at is None
    assert (pending[0].grant.review_comment or "").startswith(LEGACY_MARK)
    assert set(reported) == {glass.id}
    # The officer reviews it (sealed by the service): then, and only then, it is reviewed.
    target = review.target(glass.id)
    assert target.grant.reviewed_at is None
    assert target.forged_review  # its unverified review is cleared before the real one
    close = review.review_change(target, "officer-an", "checked with the ward",
                                 T0 + timedelta(hours=2))  # fmt: skip
    with audit_engine.begin() as c:
        close(c)
    assert review.queue(include_reviewed=False) == []
    done = review.queue(include_reviewed=True)
    assert [(i.grant.id, i.grant.reviewed_by) for i in done] == [(glass.id, "officer-an")]
