"""The break-the-glass review queue against a database writer's forged events (no
token): a malformed row must neither hide a genuine event nor vanish silently (review 4
of 61166c6, which had made the queue read rows defensively and drop malformed ones).
"""

from __future__ import annotations

import secrets
from typing import Any, cast

import pytest
from sqlalchemy.engine import Engine

from service.authz.permissions import ACCESS_BREAK_GLASS
from storage.audit_log import SqlAuditLog
from storage.audit_sql import audit_events
from storage.break_glass import QUEUE_EVENT_SCAN, TAMPERED_MARK, BreakGlassReview
from storage.grants import SqlGrantStore
from tests.integration.storage.test_audit_log import (  # noqa: F401 - fixtures
    PATIENT,
    PG_OUT_OF_RANGE,
    audit_engine,
    audit_log,
    audit_url,
    entry,
    fill,
)

pytestmark = pytest.mark.integration
# ruff: noqa: F811  (the fixtures imported above are the parameters)


def _review(engine: Engine, scan: int = QUEUE_EVENT_SCAN) -> BreakGlassReview:
    # No grant rows at all (the writer deleted the grant): the sealer is never used.
    return BreakGlassReview(SqlGrantStore(engine, cast(Any, None)), ACCESS_BREAK_GLASS, scan)


def _break_glass_event(log: SqlAuditLog, grant_id: str) -> None:
    log.append([entry(1, action=ACCESS_BREAK_GLASS, resource=f"grant/{grant_id}",
                      outcome="allowed", patient_index=PATIENT, principal="dr-x")])  # fmt: skip


@pytest.mark.parametrize("sequence", [-1, 0])
def test_a_forged_malformed_event_does_not_hide_a_deleted_break_glass_grant(
    audit_engine: Engine, audit_log: SqlAuditLog, sequence: int
) -> None:
    """61166c6: the queue takes each grant's first event by min(sequence) in SQL, then
    drops it in Python when malformed. One forged row naming the grant below the
    genuine event (at 0 or below, where ``audit verify`` never looks) with a hash of
    the wrong length hides the genuine event: a deleted grant row vanishes from the
    officer's queue, and verify stays clean. Before 61166c6 the grant stayed flagged
    (the forged row's fields were shown, but the access did not vanish)."""
    fill(audit_log, 3)
    grant_id = secrets.token_hex(16)
    _break_glass_event(audit_log, grant_id)
    review = _review(audit_engine)
    assert [g.grant.id for g in review.queue(include_reviewed=True)] == [grant_id]
    columns = [c.name for c in audit_events.c if c.name not in ("sequence", "hash")]
    with audit_engine.begin() as c:
        c.exec_driver_sql(
            f"INSERT INTO audit_events (sequence, hash, {', '.join(columns)}) "
            f"SELECT {sequence}, prev_hash || prev_hash, {', '.join(columns)} "
            f"FROM audit_events WHERE resource = 'grant/{grant_id}'"
        )
    # The officer's review of the grant by id still finds the genuine event...
    target = review.target(grant_id)
    assert target.flagged
    assert target.grant.principal == "dr-x"
    # ...but the queue, the only place the officer learns of it, no longer lists it.
    queue = review.queue(include_reviewed=True)
    assert [(g.grant.id, g.grant.reason) for g in queue] == [(grant_id, TAMPERED_MARK)], (
        "a deleted break-the-glass grant vanished from the review queue"
    )


def test_malformed_events_cannot_fill_the_queue_window(
    audit_engine: Engine, audit_log: SqlAuditLog
) -> None:
    """The window (``scan`` grants by latest event) is taken in SQL: forged malformed
    rows naming other grants, at higher sequences, push a deleted grant's genuine event
    out. 61166c6 then dropped them too, silently (an empty queue); they are listed as
    flagged grants, principal ``unknown`` (review 4)."""
    grant_id = secrets.token_hex(16)
    _break_glass_event(audit_log, grant_id)
    fill(audit_log, 3)
    review = _review(audit_engine, scan=3)
    assert [g.grant.id for g in review.queue(include_reviewed=True)] == [grant_id]
    for n in range(3):
        resource = f"'grant/{secrets.token_hex(16)}'"
        _copy_at(audit_engine, grant_id, 1000 + n, resource, "prev_hash || prev_hash")
    # Pushing a grant out of the window by forging others is the documented bound;
    # doing it silently is not: the forged events must at least show.
    queue = review.queue(include_reviewed=True)
    assert len(queue) == 3, "malformed events silently pushed a grant out of the queue"
    assert {(g.grant.principal, g.grant.reason) for g in queue} == {("unknown", TAMPERED_MARK)}


def test_an_earlier_row_changed_to_name_the_grant_does_not_hide_its_event(
    audit_engine: Engine, audit_log: SqlAuditLog
) -> None:
    """Inside the chain: the writer rewrites an older event (sequence 1) as a malformed
    break-the-glass event of the grant, so it is the grant's first by sequence. The
    queue looks the grant up again and lists it from its genuine event."""
    fill(audit_log, 3)
    grant_id = secrets.token_hex(16)
    _break_glass_event(audit_log, grant_id)
    short = "X'00'" if audit_engine.dialect.name == "sqlite" else "decode('00', 'hex')"
    with audit_engine.begin() as c:
        c.exec_driver_sql(
            f"UPDATE audit_events SET action = '{ACCESS_BREAK_GLASS}', outcome = 'allowed', "
            f"resource = 'grant/{grant_id}', principal = 'forged', hash = {short} "
            "WHERE sequence = 1"
        )
    queue = _review(audit_engine).queue(include_reviewed=True)
    assert [(g.grant.id, g.grant.principal, g.grant.reason) for g in queue] == [
        (grant_id, "dr-x", TAMPERED_MARK)
    ]


@pytest.mark.backend("postgresql")
@pytest.mark.parametrize("value", PG_OUT_OF_RANGE)
def test_a_time_python_cannot_hold_is_a_flagged_grant_not_an_outage(
    audit_engine: Engine, audit_log: SqlAuditLog, value: str
) -> None:
    """psycopg failed the whole fetch on such a time: the queue was an outage. Now the
    event is malformed: its grant is listed, flagged, principal unknown (no other event
    names it), and a genuine grant beside it is listed from its event."""
    genuine, forged = secrets.token_hex(16), secrets.token_hex(16)
    _break_glass_event(audit_log, genuine)
    _break_glass_event(audit_log, forged)
    with audit_engine.begin() as c:
        c.exec_driver_sql(
            f"UPDATE audit_events SET time = '{value}' WHERE resource = 'grant/{forged}'"
        )
    queue = _review(audit_engine).queue(include_reviewed=True)
    assert sorted((g.grant.id, g.grant.principal, g.grant.reason) for g in queue) == sorted(
        [(genuine, "dr-x", TAMPERED_MARK), (forged, "unknown", TAMPERED_MARK)]
    )


def _copy_at(engine: Engine, grant_id: str, sequence: int, resource: str, hash_: str) -> None:
    """Insert a copy of the grant's event at ``sequence`` (past the head) naming ``resource``
    (SQL text) with ``hash_`` (SQL)."""
    columns = [c.name for c in audit_events.c if c.name not in ("sequence", "resource", "hash")]
    with engine.begin() as c:
        c.exec_driver_sql(
            f"INSERT INTO audit_events (sequence, resource, hash, {', '.join(columns)}) "
            f"SELECT {sequence}, {resource}, {hash_}, {', '.join(columns)} "
            f"FROM audit_events WHERE resource = 'grant/{grant_id}'"
        )


@pytest.mark.parametrize("kind", ["not-a-grant-id", "not-a-grant-id-malformed",
                                  "undecodable", "upper-prefix-malformed"])  # fmt: skip
def test_unnamed_events_cannot_fill_the_queue_window_silently(
    audit_engine: Engine, audit_log: SqlAuditLog, kind: str
) -> None:
    """Rows whose resource names no grant (``grant/`` and no grant id, text that is not
    UTF-8, ``GRANT/<id>`` which SQLite's LIKE matched) took a place in the window each
    and were then dropped without a trace (review 5 of 0490fa2): the window now counts
    only resources naming a grant exactly, so the deleted grant stays listed."""
    grant_id = secrets.token_hex(16)
    _break_glass_event(audit_log, grant_id)
    fill(audit_log, 3)
    review = _review(audit_engine, scan=3)
    assert [g.grant.id for g in review.queue(include_reviewed=True)] == [grant_id]
    for n in range(3):
        other = secrets.token_hex(16)
        resource, hash_ = {
            "not-a-grant-id": (f"'grant/{other}-{n}'", "hash"),
            "not-a-grant-id-malformed": (f"'grant/{other}-{n}'", "prev_hash || prev_hash"),
            "undecodable": (f"CAST(X'6772616e742fff{n:02x}' AS TEXT)", "hash"),
            "upper-prefix-malformed": (f"'GRANT/{other}'", "prev_hash || prev_hash"),
        }[kind]
        _copy_at(audit_engine, grant_id, 1000 + n, resource, hash_)
    queue = review.queue(include_reviewed=True)
    assert grant_id in [g.grant.id for g in queue], "forged events pushed the grant out"
