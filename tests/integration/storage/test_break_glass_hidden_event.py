"""Attack (cold review 9e): whoever broke the glass (dr-mallory: also an officer, able to
write the database) hides the trail's break-the-glass event for a moment (deletes it,
re-inserts it byte for byte afterwards, which leaves the chain intact), relabels the row
legacy with another principal and reviews it. ``target`` trusted a legacy row it found
no event for, and ``queue`` never compared a legacy row with its event. Now a legacy row
without an event cannot be reviewed (the officer is told to run ``audit verify``), and
the queue lists a legacy row as its event names it.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11SessionPool, Pkcs11Signer
from storage.audit_log import SqlAuditLog
from storage.audit_sql import audit_events
from storage.errors import RecordConflictError
from tests.integration.storage.test_audit_log import (  # noqa: F401 - fixtures
    audit_engine,
    audit_log,
    audit_url,
    checkpoint,
    signer,
    verify,
)
from tests.integration.storage.test_break_glass_self_review import (
    RELABEL,
    T0,
    _broken_glass,
)

pytestmark = pytest.mark.integration
# ruff: noqa: F811  (the fixtures imported above are the parameters)


def _hide_event(engine: Engine, grant_id: str) -> dict[str, object]:
    with engine.begin() as c:
        where = audit_events.c.resource == f"grant/{grant_id}"
        row = dict(c.execute(sa.select(audit_events).where(where)).one()._mapping)
        c.execute(audit_events.delete().where(where))
    return row


def test_self_review_with_the_event_hidden_for_a_moment_leaves_the_queue(
    audit_engine: Engine, audit_log: SqlAuditLog, keystore_pool: Pkcs11SessionPool,
    signer: Pkcs11Signer,
) -> None:
    _grants, review, grant_id, _mac, _reported = _broken_glass(
        audit_engine, audit_log, keystore_pool
    )
    checkpoint(audit_log, signer)
    saved = _hide_event(audit_engine, grant_id)
    with audit_engine.begin() as c:
        c.execute(sa.text(RELABEL), {"id": grant_id})  # legacy, principal dr-someone
    with pytest.raises(RecordConflictError, match="audit verify"):
        review.target(grant_id)  # nothing to review against: no self-review sealed
    with audit_engine.begin() as c:
        c.execute(audit_events.insert().values(**saved))  # the trail as it was
    assert verify(audit_log, signer) == (None, "chain intact")  # nothing for verify to see
    # Still pending, and listed as the trail names it (flagged: the row disagrees).
    [item] = review.queue(include_reviewed=False)
    assert (item.grant.id, item.grant.principal) == (grant_id, "dr-mallory")
    target = review.target(grant_id)
    assert target.flagged
    assert target.grant.principal == "dr-mallory"


def test_queue_shows_a_relabelled_legacy_row_as_the_row_says(
    audit_engine: Engine, audit_log: SqlAuditLog, keystore_pool: Pkcs11SessionPool,
) -> None:
    """No self-review needed: a DB writer relabels; the queue lists the row's principal,
    not the trail's (target() flags it, queue() does not)."""
    _grants, review, grant_id, _mac, _reported = _broken_glass(
        audit_engine, audit_log, keystore_pool
    )
    with audit_engine.begin() as c:
        c.execute(sa.text(RELABEL), {"id": grant_id})
    [item] = review.queue(include_reviewed=False)
    assert item.grant.principal == "dr-mallory"


def test_a_genuine_legacy_row_whose_event_matches_is_closed_and_counts(
    audit_engine: Engine, audit_log: SqlAuditLog, keystore_pool: Pkcs11SessionPool,
) -> None:
    _grants, review, grant_id, _mac, _reported = _broken_glass(
        audit_engine, audit_log, keystore_pool
    )
    with audit_engine.begin() as c:
        c.execute(sa.text("UPDATE access_grants SET mac = NULL, reason = 'old' WHERE id = :id"),
                  {"id": grant_id})  # fmt: skip
    target = review.target(grant_id)
    assert (target.flagged, target.grant.principal) == (False, "dr-mallory")
    close = review.review_change(target, "officer-an", "checked", T0 + timedelta(hours=2))
    with audit_engine.begin() as c:
        close(c)
    assert review.queue(include_reviewed=False) == []
    [done] = review.queue(include_reviewed=True)
    assert (done.grant.reviewed_by, done.grant.review_comment) == ("officer-an", "checked")
