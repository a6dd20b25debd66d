"""Attack (cold review 9d): whoever broke the glass, also an officer and able to write the
database, reviews their own access by making the row look legacy for the moment of the
review (a legacy row's principal is not authenticated), then puts the row back.

Two defences, each tested: the review target of a legacy row whose principal or patient
differs from the trail's break-the-glass event is the event (flagged), so the four-eyes
check compares the caller with the trail's principal; and a review by the grant's own
principal never counts (the service never seals one), so a row relabelled around a
review stays pending and is reported.
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
from storage.grants import REVIEW_ALTERED_MARK, SqlGrantStore
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
RELABEL = ("UPDATE access_grants SET mac = NULL, reason = 'x', principal = 'dr-someone' "
           "WHERE id = :id")  # fmt: skip
PUT_BACK = ("UPDATE access_grants SET mac = :mac, reason = '', principal = 'dr-mallory' "
            "WHERE id = :id")  # fmt: skip


def _broken_glass(
    audit_engine: Engine, audit_log: SqlAuditLog, keystore_pool: Pkcs11SessionPool
) -> tuple[SqlGrantStore, BreakGlassReview, str, bytes, list[str]]:
    reported: list[str] = []
    grants = SqlGrantStore(audit_engine, GrantSealer(Pkcs11BlindIndexer(keystore_pool)),
                           reported.append)  # fmt: skip
    glass = grants.break_glass(PATIENT, "dr-mallory", "synthetic", timedelta(hours=1), T0)
    audit_log.append([entry(1, action=ACCESS_BREAK_GLASS, resource=f"grant/{glass.id}",
                            outcome="allowed", patient_index=PATIENT,
                            principal="dr-mallory")])  # fmt: skip
    with audit_engine.begin() as c:
        mac = c.execute(sa.text("SELECT mac FROM access_grants WHERE id = :id"),
                        {"id": glass.id}).scalar_one()  # fmt: skip
    return grants, BreakGlassReview(grants, ACCESS_BREAK_GLASS), glass.id, mac, reported


def test_a_relabelled_legacy_row_is_reviewed_as_the_trail_names_it(
    audit_engine: Engine, audit_log: SqlAuditLog, keystore_pool: Pkcs11SessionPool
) -> None:
    _grants, review, grant_id, _mac, reported = _broken_glass(
        audit_engine, audit_log, keystore_pool
    )
    with audit_engine.begin() as c:
        c.execute(sa.text(RELABEL), {"id": grant_id})
    target = review.target(grant_id)
    # AuditServicer._review's four-eyes check compares the caller with this: refused.
    assert target.flagged
    assert target.grant.principal == "dr-mallory"
    assert grant_id in reported


def test_a_review_by_the_grants_own_principal_never_counts(
    audit_engine: Engine, audit_log: SqlAuditLog, keystore_pool: Pkcs11SessionPool
) -> None:
    """Even applied past the target (the store's own WHERE compares the relabelled row)."""
    grants, review, grant_id, mac, reported = _broken_glass(
        audit_engine, audit_log, keystore_pool
    )
    with audit_engine.begin() as c:
        c.execute(sa.text(RELABEL), {"id": grant_id})
    close = grants.review_change(grant_id, "dr-mallory", "fine", T0 + timedelta(hours=2))
    with audit_engine.begin() as c:
        close(c)
        c.execute(sa.text(PUT_BACK), {"id": grant_id, "mac": mac})
    reported.clear()
    pending = review.queue(include_reviewed=False)
    assert [(i.grant.id, i.grant.reviewed_by) for i in pending] == [(grant_id, None)]
    assert pending[0].grant.review_comment == REVIEW_ALTERED_MARK
    assert reported == [grant_id]
    # The officer (another principal) can still close it.
    target = review.target(grant_id)
    assert target.forged_review
    close = review.review_change(target, "officer-an", "checked", T0 + timedelta(hours=3))
    with audit_engine.begin() as c:
        close(c)
    assert review.queue(include_reviewed=False) == []
