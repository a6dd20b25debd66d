"""A read-only PostgreSQL gives UNAVAILABLE with a clear message, never INTERNAL (issue 8, 5).

``ALTER DATABASE ... SET default_transaction_read_only = on`` makes every new
connection read-only, as a hot standby would be; the service's connections are then
terminated so its pool reconnects into read-only sessions. Reads (their audit event
cannot be written), writes, grants and audit queries must each fail with UNAVAILABLE,
their message must carry no patient or record data, and everything works again once
the database is writable.

PYTEST_DONT_REWRITE: failures name codes only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import Client, client, fetch, new_patient, put_record

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300), pytest.mark.backend("postgresql")]
CONTENT = b"synthetic read-only note"
TIMEOUT = 30


@dataclass
class World:
    service: RunningService
    database: str
    reader: Client  # CN test-app: records.read/write on every patient
    clerk: Client
    officer: Client
    patient: pb.PatientId
    record: pb.Record


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    service: RunningService = service_factory(fresh_database)
    reader = Client("test-app", service.channel())
    clerk = client(service, issue("clerk-readonly", "records_clerk"))
    officer = client(service, issue("officer-readonly", "security_officer"))
    patient = new_patient()
    record = put_record(reader, patient, CONTENT)
    database = str(sa.make_url(fresh_database).database)
    yield World(service, database, reader, clerk, officer, patient, record)
    for c in (reader, clerk, officer):
        c.close()
    service.stop()


def _set_read_only(admin: Engine, database: str, on: bool) -> None:
    """Make new sessions of ``database`` read-only (or not) and end the existing ones."""
    with admin.connect() as c:
        # The name is a random hex one made by the fixture; identifiers cannot be bound.
        setting = (
            "SET default_transaction_read_only = on"
            if on
            else ("RESET default_transaction_read_only")
        )
        c.execute(sa.text(f'ALTER DATABASE "{database}" {setting}'))
        c.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": database},
        )


@contextmanager
def read_only(admin: Engine, database: str) -> Iterator[None]:
    _set_read_only(admin, database, True)
    try:
        yield
    finally:
        _set_read_only(admin, database, False)


def _refusal(call: Any, *args: Any) -> grpc.RpcError:
    try:
        result = call(*args, timeout=TIMEOUT)
        if not hasattr(result, "ListFields"):
            for _ in result:
                pass
    except grpc.RpcError as e:
        return e
    raise AssertionError("the call succeeded on a read-only database")


def _assert_unavailable(w: World, error: grpc.RpcError) -> None:
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.code().name
    details = error.details() or ""
    for secret in (w.patient.id, w.record.id, CONTENT.decode()):
        assert secret not in details, "the refusal names record or patient data"


def test_every_kind_of_call_is_unavailable_then_recovers(
    world: World, postgres_admin: Engine
) -> None:
    w = world
    assert fetch(w.reader, w.record.id).content == CONTENT
    with read_only(postgres_admin, w.database):
        got = fetch(w.reader, w.record.id)
        assert got.error is not None
        assert not got.content, "a read sent data without its event"
        _assert_unavailable(w, got.error)
        head = pb.RecordHeader(
            patient=new_patient(), kind=pb.RECORD_KIND_OTHER,
            content_type="application/octet-stream",
        )  # fmt: skip
        chunks = iter([pb.PutRecordRequest(header=head), pb.PutRecordRequest(chunk=CONTENT)])
        _assert_unavailable(w, _refusal(w.reader.records.PutRecord, chunks))
        request = apb.GrantAccessRequest(patient=w.patient, principal="dr-readonly")
        _assert_unavailable(w, _refusal(w.clerk.access.GrantAccess, request))
        listing = apb.ListGrantsRequest(patient=w.patient)
        _assert_unavailable(w, _refusal(w.clerk.access.ListGrants, listing))
        _assert_unavailable(w, _refusal(w.officer.audit.QueryEvents, aupb.QueryEventsRequest()))
        _assert_unavailable(w, _refusal(w.officer.audit.VerifyChain, aupb.VerifyChainRequest()))
    # Writable again: the pool's dead read-only sessions are replaced (pre-ping).
    assert fetch(w.reader, w.record.id).content == CONTENT
    assert put_record(w.reader, new_patient(), CONTENT).id
