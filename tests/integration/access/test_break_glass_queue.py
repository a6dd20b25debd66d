"""Attack: a database writer makes a break-the-glass access vanish from the review queue.

The queue is built from the trail's break-the-glass events joined with the grant rows
(storage.break_glass): a row set to ``break_glass = false`` or deleted stays in the
queue flagged, raises a ``grant-tampered`` incident, and can still be reviewed (not by
the person who broke the glass).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import audit_pb2 as aupb
from service.audit_servicer import SELF_REVIEW
from service.authz.permissions import ACCESS_BREAK_GLASS
from storage.audit_log import audit_events
from storage.break_glass import QUEUE_EVENT_SCAN, RESTORED_MARK, TAMPERED_MARK
from storage.grants import access_grants
from tests.fixtures.service import DEFAULT_POLICY, TEST_POLICY_EXTRA, RunningService
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    client,
    code_of,
    engine_for,
    events,
    fetch,
    new_patient,
    put_record,
    verify,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

POLICY_EXTRA = """
[principals."dr-officer"]
roles = ["physician", "security_officer"]
"""


@dataclass
class World:
    service: RunningService
    database: str
    officer: Client
    dr: Client  # physician and security officer: breaks the glass, may not review it


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    service: RunningService = service_factory(
        fresh_database, policy=DEFAULT_POLICY.read_text() + TEST_POLICY_EXTRA + POLICY_EXTRA
    )
    officer = client(service, issue("officer-bg", "security_officer"))
    dr = client(service, issue("dr-officer"))
    yield World(service, fresh_database, officer, dr)
    officer.close()
    dr.close()
    service.stop()


def _break_glass(w: World) -> apb.Grant:
    request = apb.BreakGlassRequest(patient=new_patient(), reason="synthetic emergency (test)")
    grant: apb.Grant = w.dr.access.BreakGlass(request, timeout=TIMEOUT)
    return grant


def _queue(w: World, everything: bool = False) -> dict[str, aupb.BreakGlassReviewItem]:
    reply = w.officer.audit.ListBreakGlass(
        aupb.ListBreakGlassRequest(include_reviewed=everything), timeout=TIMEOUT
    )
    return {item.grant_id: item for item in reply.items}


def _tamper(w: World, statement: sa.Executable) -> None:
    engine = engine_for(w.database)
    try:
        with engine.begin() as connection:
            assert connection.execute(statement).rowcount == 1  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def _incident_names(w: World, grant_id: str) -> bool:
    found = events(w.officer, action="incident")
    return any(e.resource == f"grant/{grant_id}" and e.status == "grant-tampered" for e in found)


def _review(w: World, c: Client, grant_id: str) -> grpc.StatusCode:
    request = aupb.ReviewBreakGlassRequest(grant_id=grant_id, comment="checked (test)")
    return code_of(c.audit.ReviewBreakGlass, request, timeout=TIMEOUT)


@pytest.mark.parametrize("attack", ["unflag", "delete"])
def test_tampered_break_glass_stays_in_the_queue(world: World, attack: str) -> None:
    untouched = _break_glass(world)
    target = _break_glass(world)
    where = access_grants.c.id == target.id
    if attack == "unflag":
        _tamper(world, access_grants.update().where(where).values(break_glass=False))
    else:
        _tamper(world, access_grants.delete().where(where))
    queue = _queue(world)
    assert target.id in queue, f"{attack}: break-the-glass vanished from the queue"
    flagged = queue[target.id]
    assert flagged.event.reason == TAMPERED_MARK
    assert flagged.event.principal == "dr-officer", "principal not taken from the trail"
    assert not flagged.reviewed
    assert queue[untouched.id].event.reason == "synthetic emergency (test)", "untouched changed"
    assert _incident_names(world, target.id), f"{attack}: no grant-tampered incident"
    # The person who broke the glass still cannot close it, whatever the row says now.
    assert _review(world, world.dr, target.id) == grpc.StatusCode.PERMISSION_DENIED
    denied = events(world.officer, principal="dr-officer", outcome=aupb.OUTCOME_DENIED)
    assert any(e.reason == SELF_REVIEW and e.resource == f"grant/{target.id}" for e in denied)
    assert _review(world, world.officer, target.id) == grpc.StatusCode.OK
    assert _review(world, world.officer, target.id) == grpc.StatusCode.FAILED_PRECONDITION
    assert target.id not in _queue(world), "closed item still awaiting review"
    closed = _queue(world, everything=True)[target.id]
    assert closed.reviewed
    assert closed.comment == "checked (test)"
    assert closed.event.reason == RESTORED_MARK
    assert _review(world, world.officer, untouched.id) == grpc.StatusCode.OK
    assert verify(world.officer).ok


def test_untouched_queue_is_unchanged(world: World) -> None:
    grant = _break_glass(world)
    item = _queue(world)[grant.id]
    assert item.event.reason == "synthetic emergency (test)"
    assert item.event.principal == "dr-officer"
    assert not _incident_names(world, grant.id), "an untouched grant raised an incident"
    assert _review(world, world.officer, grant.id) == grpc.StatusCode.OK
    assert grant.id not in _queue(world)
    assert all(i.event.reason != TAMPERED_MARK for i in _queue(world).values())


def test_closing_a_forged_queue_item_grants_nothing(world: World, issue: Any) -> None:
    """A database writer inserts a break-the-glass event (the queue reads events as they
    are) naming an accomplice, a patient and a time years ahead; the officer closes the
    flagged item, which restores a row sealed and MACed by the token. It must not make
    the accomplice's access active (it would, expiring at the event's time)."""
    patient = new_patient()
    real = _break_glass_for(world, patient)
    record = put_record(world.dr, patient)
    engine = engine_for(world.database)
    try:
        with engine.begin() as connection:
            g = access_grants.c
            index = connection.execute(sa.select(g.patient_index).where(g.id == real.id)).scalar()
            top = connection.execute(sa.select(sa.func.max(audit_events.c.sequence))).scalar()
            forged_id = secrets.token_hex(16)
            connection.execute(audit_events.insert().values(
                sequence=int(top or 0) + 1_000_000, time=datetime.now(UTC) + timedelta(days=3650),
                principal="dr-accomplice", application="", role="physician",
                action=ACCESS_BREAK_GLASS, resource=f"grant/{forged_id}", patient_index=index,
                outcome="allowed", status="", reason="", source="ipv4:127.0.0.1",
                prev_hash=bytes(32), hash=bytes(32),
            ))  # fmt: skip
            bump = sa.delete(audit_events).where(audit_events.c.resource == f"grant/{forged_id}")
        accomplice = client(world.service, issue("dr-accomplice", "physician"))
        try:
            assert forged_id in _queue(world), "the forged item is not even shown"
            assert _review(world, world.officer, forged_id) == grpc.StatusCode.OK
            assert fetch(accomplice, record.id).code == grpc.StatusCode.PERMISSION_DENIED, (
                "closing a forged queue item granted access"
            )
        finally:
            accomplice.close()
            with engine.begin() as connection:  # later chain checks in this module
                connection.execute(bump)
    finally:
        engine.dispose()


def _break_glass_for(w: World, patient: Any) -> apb.Grant:
    request = apb.BreakGlassRequest(patient=patient, reason="synthetic emergency (test)")
    grant: apb.Grant = w.dr.access.BreakGlass(request, timeout=TIMEOUT)
    return grant


def test_repeated_events_of_one_grant_cannot_push_a_deleted_one_out(world: World) -> None:
    """A database writer deletes a row, then inserts as many events as the queue scans,
    all naming one grant that exists (so nothing new shows): the deleted one must stay."""
    present, target = _break_glass(world), _break_glass(world)
    _tamper(world, access_grants.delete().where(access_grants.c.id == target.id))
    engine = engine_for(world.database)
    try:
        with engine.begin() as connection:
            base = connection.execute(sa.select(audit_events).where(
                audit_events.c.resource == f"grant/{present.id}",
                audit_events.c.action == ACCESS_BREAK_GLASS,
            )).mappings().first()  # fmt: skip
            assert base is not None
            top = int(connection.execute(sa.select(sa.func.max(audit_events.c.sequence))).scalar())
            flood = [
                {**base, "sequence": top + 3_000_000 + i} for i in range(QUEUE_EVENT_SCAN)
            ]
            connection.execute(audit_events.insert(), flood)
        try:
            queue = _queue(world)
            assert target.id in queue, "a flood of one grant's events hid a deleted grant"
            assert queue[target.id].event.reason == TAMPERED_MARK
        finally:
            with engine.begin() as connection:
                connection.execute(sa.delete(audit_events).where(
                    audit_events.c.sequence > top + 3_000_000 - 1
                ))  # fmt: skip
    finally:
        engine.dispose()
    assert _review(world, world.officer, target.id) == grpc.StatusCode.OK
    assert _review(world, world.officer, present.id) == grpc.StatusCode.OK
