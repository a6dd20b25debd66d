"""GetRecord fetches while its read event commits (service.guard.ReadAdmission): the
paths test_fail_closed does not take, each attacked for a byte that leaves early.

- Ranged reads (inside the first segment, in a later one, to the end) and a record of
  zero bytes, with the audit insert refused: UNAVAILABLE, neither the metadata message
  nor a content byte.
- The client's deadline passing while the read waits for its event (the audit writer
  held on a lock): DEADLINE_EXCEEDED with nothing sent; once the writer is free again,
  the allowed event precedes the failure's in the trail.
- A tampered object (the first segment, fetched before the wait; the last one; a record
  of one chunk): DATA_LOSS, its allowed event before its failure event; and with the
  audit refused as well, UNAVAILABLE with nothing sent.

PYTEST_DONT_REWRITE: failures name codes, counts and labels only.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from minio import Minio

from service._gen.medvault.v1 import audit_pb2 as aupb
from storage.sql_metadata import records
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import (
    THREE_SEGMENTS,
    Client,
    Fetched,
    audit_inserts_refused,
    audit_writer_held,
    client,
    engine_for,
    events,
    fetch,
    new_patient,
    put_record,
    verify,
    wait_for,
)
from tests.integration.service.calls import server_bucket

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
CONTENT = b"synthetic read-admission note"
LARGE = THREE_SEGMENTS
HEADER = 40  # bytes of the envelope header before the first segment's ciphertext
PRINCIPAL = "test-app"  # unscoped: no grant lookup, so only the audit trail is in the way


@dataclass
class World:
    service: RunningService
    url: str
    engine: sa.Engine
    s3: Minio
    bucket: str
    reader: Client
    officer: Client


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any, s3_server: Any) -> Iterator[World]:
    service: RunningService = service_factory(fresh_database)
    reader = Client(PRINCIPAL, service.channel())
    officer = client(service, issue("officer-admission", "security_officer"))
    engine = engine_for(fresh_database)
    w = World(
        service, fresh_database, engine, s3_server.client(),
        server_bucket(service.config_path), reader, officer,
    )  # fmt: skip
    yield w
    reader.close()
    officer.close()
    engine.dispose()
    service.stop()


def nothing_sent(label: str, fetched: Fetched, code: grpc.StatusCode) -> None:
    assert fetched.code == code, f"{label}: expected {code.name}, got {fetched.code.name}"
    assert fetched.metadata is None, f"{label}: metadata sent"
    assert fetched.content == b"", f"{label}: {len(fetched.content)} content bytes sent"


def reads_of(w: World, record_id: str) -> list[aupb.AuditEvent]:
    """The reader's read events of one record (allowed, denied and failed), in order."""
    found = events(w.officer, principal=PRINCIPAL, action="records.read")
    return [e for e in found if e.resource.startswith(f"record/{record_id}")]


def audit_refused(w: World) -> AbstractContextManager[None]:
    """Every audit insert raises (a trigger a database writer could add)."""
    return audit_inserts_refused(w.url, w.engine)


def tamper(w: World, record_id: str, at: Callable[[int], int]) -> None:
    """Flip one byte of the record's stored object, at ``at(object size)``."""
    with w.engine.connect() as c:
        key = c.scalar(sa.select(records.c.object_key).where(records.c.id == record_id))
    response = w.s3.get_object(w.bucket, key)
    try:
        blob = bytearray(response.read())
    finally:
        response.close()
        response.release_conn()
    blob[at(len(blob))] ^= 0x01
    w.s3.put_object(w.bucket, key, io.BytesIO(bytes(blob)), len(blob))


def test_ranged_and_empty_reads_send_nothing_when_their_event_fails(world: World) -> None:
    small = put_record(world.reader, new_patient(), CONTENT)
    large = put_record(world.reader, new_patient(), LARGE, chunk=1 << 20)
    empty = put_record(world.reader, new_patient(), b"")
    cases: list[tuple[str, str, int, int]] = [
        ("small, ranged", small.id, 5, 4),
        ("large, inside the first segment", large.id, 100, 1000),
        ("large, in the second segment", large.id, (1 << 20) + 10, 5000),
        ("large, to the end", large.id, len(LARGE) - 3000, 0),
        ("empty", empty.id, 0, 0),
    ]
    for label, record_id, offset, length in cases:  # they read when the trail works
        fetched = fetch(world.reader, record_id, offset=offset, length=length)
        assert fetched.error is None, f"{label}: {fetched.code.name} before the fault"
    allowed_before = len(reads_of(world, small.id) + reads_of(world, large.id))
    allowed_before += len(reads_of(world, empty.id))
    with audit_refused(world):
        refused = [
            (label, fetch(world.reader, rid, offset=o, length=n)) for label, rid, o, n in cases
        ]
    for label, fetched in refused:
        nothing_sent(label, fetched, grpc.StatusCode.UNAVAILABLE)
    after = reads_of(world, small.id) + reads_of(world, large.id) + reads_of(world, empty.id)
    assert len(after) == allowed_before, "a refused read left an event"
    result = verify(world.officer)
    assert result.ok, f"chain broken: {result.reason}"


def test_a_deadline_passing_while_the_event_waits_sends_nothing(world: World) -> None:
    small = put_record(world.reader, new_patient(), CONTENT)
    large = put_record(world.reader, new_patient(), LARGE, chunk=1 << 20)
    with audit_writer_held(world.url, world.engine):
        expired = [
            ("small", fetch(world.reader, small.id, timeout=1.0)),
            ("large", fetch(world.reader, large.id, timeout=1.0)),
            (
                "large, ranged",
                fetch(world.reader, large.id, offset=(1 << 20) + 10, length=100, timeout=1.0),
            ),
        ]
    for label, fetched in expired:
        nothing_sent(label, fetched, grpc.StatusCode.DEADLINE_EXCEEDED)
    for record in (small, large):
        # Each expired read: the allowed event, committed once the writer was free (or
        # refused, SQLite's busy timeout), and before its DEADLINE_EXCEEDED failure.
        def settled(record_id: str = record.id) -> bool:
            return any(e.outcome == aupb.OUTCOME_FAILED for e in reads_of(world, record_id))

        wait_for(settled, 30, "the expired reads' failure events")
        # Each failure follows an allowed event not yet matched by an earlier failure.
        # Not necessarily the event just before it: two calls read the large record,
        # and a call's expiry is audited once its worker has stopped (service.calls),
        # which may be after the next call's allowed event.
        unmatched = 0
        for n, e in enumerate(reads_of(world, record.id)):
            if e.outcome == aupb.OUTCOME_ALLOWED:
                unmatched += 1
            elif e.outcome == aupb.OUTCOME_FAILED:
                assert e.status == "DEADLINE_EXCEEDED", e.status
                assert unmatched > 0, f"a failure event without its allowed event before it: {n}"
                unmatched -= 1
    for record, content in ((small, CONTENT), (large, LARGE)):
        fetched = fetch(world.reader, record.id)
        assert fetched.error is None, f"no read after the lock: {fetched.code.name}"
        assert fetched.content == content, "content differs after the lock"


def test_a_tampered_object_is_data_loss_after_its_read_event(world: World) -> None:
    cases = {
        "one chunk": (put_record(world.reader, new_patient(), CONTENT), lambda n: HEADER + 3),
        "first segment": (
            put_record(world.reader, new_patient(), LARGE, chunk=1 << 20),
            lambda n: HEADER + 100,
        ),
        "last segment": (
            put_record(world.reader, new_patient(), LARGE, chunk=1 << 20),
            lambda n: n - 20,
        ),
    }
    for record, at in cases.values():
        tamper(world, record.id, at)
    for label, (record, _) in cases.items():
        fetched = fetch(world.reader, record.id)
        assert fetched.code == grpc.StatusCode.DATA_LOSS, f"{label}: {fetched.code.name}"
        if label != "last segment":  # detected before the reply's first message
            assert fetched.metadata is None, f"{label}: metadata sent"
            assert fetched.content == b"", f"{label}: content sent"
        trail = [(e.outcome, e.status) for e in reads_of(world, record.id)]
        assert trail == [(aupb.OUTCOME_ALLOWED, ""), (aupb.OUTCOME_FAILED, "DATA_LOSS")], (
            f"{label}: {[(aupb.Outcome.Name(o), s) for o, s in trail]}"
        )
    with audit_refused(world):
        refused = [(label, fetch(world.reader, r.id)) for label, (r, _) in cases.items()]
    for label, fetched in refused:
        nothing_sent(f"{label}, audit refused", fetched, grpc.StatusCode.UNAVAILABLE)
