"""A revoked grant stays revoked whatever a database writer does to its row.

Two real replicas on one database (SQLite file or PostgreSQL), one bucket, one token. A
database writer without the token un-revokes a grant by clearing ``revoked_at``, or by
putting back the whole row as it was before the revocation (its MAC included: an
earlier authentic state, as a restore of an older backup would). The revocation's
marker in the witness bucket (``storage.grant_revocations``) still says revoked: the
read is refused (PERMISSION_DENIED, audited as a denial) and the row is a
``grant-tampered`` incident; on the other replica once it refreshes its markers, and on
a replica started afterwards at once.
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
from service.config import AuditConfig
from service.guard import NO_GRANT
from storage.grants import access_grants
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    client,
    engine_for,
    events,
    fetch,
    grant,
    new_patient,
    put_record,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# The other replica's refresh of the markers: the bound on a rollback it can miss.
REFRESH_SECONDS = 1.0


@dataclass
class World:
    first: RunningService
    second: RunningService
    database: str
    bucket: str
    factory: Any
    officer: Client
    clerk: Client
    issue: Any


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    bucket = f"mv-{secrets.token_hex(6)}"
    audit = {"revocation_refresh_seconds": REFRESH_SECONDS}
    first = service_factory(fresh_database, bucket=bucket, audit=audit)
    second = service_factory(fresh_database, bucket=bucket, audit=audit)
    officer = client(first, issue("officer-rollback", "security_officer"))
    clerk = client(first, issue("clerk-rollback", "records_clerk"))
    yield World(first, second, fresh_database, bucket, service_factory, officer, clerk, issue)
    officer.close()
    clerk.close()


def _row(world: World, grant_id: str) -> dict[str, Any]:
    engine = engine_for(world.database)
    try:
        with engine.begin() as connection:
            query = sa.select(access_grants).where(access_grants.c.id == grant_id)
            return dict(connection.execute(query).one()._mapping)
    finally:
        engine.dispose()


def _write_row(world: World, grant_id: str, values: dict[str, Any]) -> None:
    """What a database writer without the token does."""
    engine = engine_for(world.database)
    try:
        with engine.begin() as connection:
            where = access_grants.c.id == grant_id
            connection.execute(access_grants.update().where(where).values(**values))
    finally:
        engine.dispose()


def _marker_versions(world: World, s3_server: Any, grant_id: str) -> list[str]:
    """The versions of the grant's revocation markers (the tests' witness bucket)."""
    listed = s3_server.client().list_objects(
        AuditConfig().witness_bucket, prefix=f"grant-revocations/{world.bucket}/",
        recursive=True, include_version=True,
    )  # fmt: skip
    return [o.version_id for o in listed if (o.object_name or "").endswith(f"-{grant_id}")]


def _revoked_reader(world: World, name: str) -> tuple[Client, str, str, dict[str, Any]]:
    """A physician granted a patient, who read a record, and whose grant was then
    revoked; with the record's id, the grant's id and the row as it was before."""
    patient = new_patient()
    record = put_record(world.clerk, patient)
    reader = client(world.first, world.issue(name, "physician"), name)
    granted = grant(world.clerk, patient, name)
    assert fetch(reader, record.id).code == grpc.StatusCode.OK
    before = _row(world, granted.id)
    revoke = apb.RevokeAccessRequest(grant_id=granted.id)
    world.clerk.access.RevokeAccess(revoke, timeout=TIMEOUT)
    assert fetch(reader, record.id).code == grpc.StatusCode.PERMISSION_DENIED
    return reader, record.id, granted.id, before


def _refused_and_reported(world: World, reader: Client, record_id: str, grant_id: str) -> None:
    assert fetch(reader, record_id).code == grpc.StatusCode.PERMISSION_DENIED, "un-revoked"
    denied = events(world.officer, principal=reader.name, outcome=aupb.OUTCOME_DENIED)
    mine = [e for e in denied if e.resource.startswith(f"record/{record_id}/")]
    # One refusal after the revocation, one after the rollback: each audited.
    assert [e.reason for e in mine] == [NO_GRANT, NO_GRANT], "refusal not audited"
    incidents = events(world.officer, action="incident")
    assert any(e.resource == f"grant/{grant_id}" for e in incidents), "rollback not reported"


def test_clearing_revoked_at_does_not_restore_access(world: World) -> None:
    reader, record_id, grant_id, _before = _revoked_reader(world, "phys-cleared")
    _write_row(world, grant_id, {"revoked_at": None, "revoked_by": None})
    _refused_and_reported(world, reader, record_id, grant_id)
    reader.close()


def test_restoring_the_row_before_revocation_does_not_restore_access(world: World) -> None:
    reader, record_id, grant_id, before = _revoked_reader(world, "phys-restored")
    assert before["revoked_at"] is None, "not the row before the revocation"
    assert before["mac"], "not an authentic row"
    _write_row(world, grant_id, before)  # the earlier authentic state, its MAC included
    assert _row(world, grant_id) == before
    _refused_and_reported(world, reader, record_id, grant_id)
    reader.close()


def test_the_listing_shows_a_rolled_back_grant_revoked_and_altered(world: World) -> None:
    reader, _record_id, grant_id, _before = _revoked_reader(world, "phys-listed")
    _write_row(world, grant_id, {"revoked_at": None, "revoked_by": None})
    request = apb.ListGrantsRequest(principal=reader.name, include_inactive=True)
    listed = {g.id: g for g in world.officer.access.ListGrants(request, timeout=TIMEOUT).grants}
    assert listed[grant_id].HasField("revoked_at"), "listed as active"
    assert listed[grant_id].altered, "the rollback not shown to the officer"
    active = apb.ListGrantsRequest(principal=reader.name)
    assert not world.officer.access.ListGrants(active, timeout=TIMEOUT).grants
    reader.close()


def test_a_rollback_is_refused_on_the_other_replica_and_on_a_new_one(world: World) -> None:
    patient = new_patient()
    record = put_record(world.clerk, patient)
    name = "phys-replicas"
    cert = world.issue(name, "physician")
    on_first = client(world.first, cert, name)
    on_second = client(world.second, cert, name)
    granted = grant(world.clerk, patient, name)
    assert fetch(on_second, record.id).code == grpc.StatusCode.OK
    before = _row(world, granted.id)
    world.clerk.access.RevokeAccess(apb.RevokeAccessRequest(grant_id=granted.id), timeout=TIMEOUT)
    # Through the row, at once, on both.
    assert fetch(on_second, record.id).code == grpc.StatusCode.PERMISSION_DENIED
    _write_row(world, granted.id, before)
    assert fetch(on_first, record.id).code == grpc.StatusCode.PERMISSION_DENIED
    # The other replica learns the marker at its next refresh (REFRESH_SECONDS).
    wait_for(
        lambda: fetch(on_second, record.id).code == grpc.StatusCode.PERMISSION_DENIED,
        timeout=60, what="the other replica's refresh of the markers",
    )  # fmt: skip
    # A replica started now (a restart, or a restore of an older database) loads them all.
    third = world.factory(world.database, bucket=world.bucket)
    on_third = client(third, cert, name)
    assert fetch(on_third, record.id).code == grpc.StatusCode.PERMISSION_DENIED
    incidents = events(world.officer, action="incident")
    assert any(e.resource == f"grant/{granted.id}" for e in incidents)
    for c in (on_first, on_second, on_third):
        c.close()
    third.stop()


def test_a_grant_revoked_before_the_markers_stays_revoked(world: World, s3_server: Any) -> None:
    """Cold review 11b: a revocation committed by a release without the markers (or held
    by a database restored under another record bucket's name, whose markers are under
    the old name) had no marker, so clearing its ``revoked_at`` gave access back. A
    replica now writes the missing marker of every authentic revoked row at start."""
    patient = new_patient()
    record = put_record(world.clerk, patient)
    name = "phys-before-markers"
    cert = world.issue(name, "physician")
    granted = grant(world.clerk, patient, name)
    # The row as the previous release's RevokeAccess left it: revoked, no marker.
    revoked_at = datetime.now(UTC) - timedelta(days=3)
    _write_row(world, granted.id, {"revoked_at": revoked_at, "revoked_by": world.clerk.name})
    # A database writer's revoked row (no MAC of the token) must not become a marker.
    forged = {**_row(world, granted.id), "id": secrets.token_hex(16), "mac": bytes(32)}
    engine = engine_for(world.database)
    with engine.begin() as connection:
        connection.execute(access_grants.insert().values(**forged))
    engine.dispose()
    upgraded = world.factory(world.database, bucket=world.bucket)  # the upgrade
    reader = client(upgraded, cert, name)
    assert fetch(reader, record.id).code == grpc.StatusCode.PERMISSION_DENIED
    _write_row(world, granted.id, {"revoked_at": None, "revoked_by": None})
    assert fetch(reader, record.id).code == grpc.StatusCode.PERMISSION_DENIED, "un-revoked"
    restarted = world.factory(world.database, bucket=world.bucket)  # loads the marker
    again = client(restarted, cert, name)
    assert fetch(again, record.id).code == grpc.StatusCode.PERMISSION_DENIED, "un-revoked"
    assert _marker_versions(world, s3_server, granted.id)
    assert not _marker_versions(world, s3_server, forged["id"]), "a forged row became a marker"
    for c in (reader, again):
        c.close()
    upgraded.stop()
    restarted.stop()


def test_revoking_again_adds_no_marker(world: World, s3_server: Any) -> None:
    """Cold review 11b: each RevokeAccess of a grant revoked already (refused,
    FAILED_PRECONDITION) wrote one more marker, an object locked for years that every
    replica lists at start and in every full refresh: a certificate allowed to revoke
    could add them without bound."""
    patient = new_patient()
    granted = grant(world.clerk, patient, "phys-revoked-twice")
    revoke = apb.RevokeAccessRequest(grant_id=granted.id)
    world.clerk.access.RevokeAccess(revoke, timeout=TIMEOUT)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as refused:
            world.clerk.access.RevokeAccess(revoke, timeout=TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(_marker_versions(world, s3_server, granted.id)) == 1, "one per refusal"
