"""A PutRecord whose client goes away mid-stream stores nothing.

The attack (or a network failure): send the header and part of the content, then cancel
the call. The upload runs in a worker thread that pulls messages from the call; once
the call was cancelled, grpc ends its request stream as if the client had finished.
Before, the worker took that for the end of the content and committed a truncated
record, with an "allowed" audit event, while the client had been told the call was
cancelled. Now a stream cut by cancellation is an error in the worker: no row, no
object kept, no write event. A put whose client deadline passes mid-stream is the same,
and is audited as failed with DEADLINE_EXCEEDED (a cancelled one is not audited again).

PYTEST_DONT_REWRITE: failures name counts and codes only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from storage.sql_metadata import records
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import (
    Client,
    client,
    engine_for,
    events,
    new_patient,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CLERK = "clerk-cancel"


def _rows(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.scalar(sa.select(sa.func.count()).select_from(records)) or 0)


class CutStream:
    """A header and one chunk, then it waits until the call is cancelled."""

    def __init__(self) -> None:
        self.sent = threading.Event()
        self.release = threading.Event()

    def __iter__(self) -> Iterator[pb.PutRecordRequest]:
        head = pb.RecordHeader(
            patient=new_patient(), kind=pb.RECORD_KIND_OTHER, content_type="text/plain"
        )
        yield pb.PutRecordRequest(header=head)
        yield pb.PutRecordRequest(chunk=b"first part of a synthetic note " * 64)
        self.sent.set()
        self.release.wait(30)


def _writes(officer: Client, principal: str) -> list[aupb.AuditEvent]:
    """The allowed records.write events of ``principal`` (its WhoAmI calls are not)."""
    allowed = events(officer, principal=principal, outcome=aupb.OUTCOME_ALLOWED)
    return [e for e in allowed if e.action == "records.write"]


def _slot_free(c: Client) -> bool:
    """With a share of one call, the clerk's next call is served only once every job of
    its previous call has ended (the slot is held until then): a barrier, not a sleep."""
    try:
        c.access.WhoAmI(apb.WhoAmIRequest(), timeout=10)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return False
        raise
    return True


def test_a_put_cancelled_mid_stream_stores_nothing(
    service_factory: Any, fresh_database: str, issue: Any
) -> None:
    service: RunningService = service_factory(fresh_database, max_calls_per_principal=1)
    clerk = client(service, issue(CLERK, "records_clerk"))
    officer = client(service, issue("officer-cancel", "security_officer"))
    engine = engine_for(fresh_database)
    try:
        writes_before = len(_writes(officer, CLERK))
        for _ in range(4):
            stream = CutStream()
            future = clerk.records.PutRecord.future(iter(stream), timeout=30)
            assert stream.sent.wait(10), "the stream did not start"
            time.sleep(0.3)  # the upload is under way in its worker
            future.cancel()
            stream.release.set()
            with pytest.raises(grpc.FutureCancelledError):
                future.result()
            wait_for(lambda: _slot_free(clerk), 30, "the end of a cancelled put")
        # The client's deadline passes mid-stream: the same, and audited as failed.
        stream = CutStream()
        with pytest.raises(grpc.RpcError) as expired:
            clerk.records.PutRecord(iter(stream), timeout=1.0)
        stream.release.set()
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, expired.value.code()
        # What its worker would still commit, and the expiry's event (written once the
        # worker stopped), are committed before the slot comes back (service.edge).
        wait_for(lambda: _slot_free(clerk), 30, "the end of the expired put")
        assert _rows(engine) == 0, "a cancelled put left a record"
        writes = len(_writes(officer, CLERK))
        assert writes == writes_before, "a cancelled put was audited as written"
        failed = events(officer, principal=CLERK, outcome=aupb.OUTCOME_FAILED)
        statuses = [(e.resource, e.status) for e in failed]
        assert statuses == [("record/new", "DEADLINE_EXCEEDED")], statuses
    finally:
        clerk.close()
        officer.close()
        engine.dispose()
        service.stop()


# --- cancelled at every point of the handler: before, during and after prefill ----------

STRESS_CLERK = "clerk-cancel-stress"
CHUNK = 1 << 20  # the service's default chunk_size: prefill stops at this many bytes


class StreamStoppedError(Exception):
    """Ends a client's request iterator: grpc then cancels, it never half-closes."""


def _shapes() -> dict[str, list[bytes]]:
    """The content messages of each stream shape, against prefill's bounds: waiting for
    its first chunk, holding less than a chunk, holding 3 of its 4 messages, done by
    count, done by bytes (the worker then reads), and more than a chunk."""
    note = b"synthetic cancelled note " * 40
    return {
        "header only": [],
        "one small chunk": [note],
        "three empty chunks": [b"", b"", b""],
        "four empty then small": [b"", b"", b"", b"", note],
        "one full chunk": [b"f" * CHUNK],
        "full chunk then small": [b"f" * CHUNK, note],
    }


def _stream(chunks: list[bytes], hold: threading.Event | None) -> Iterator[pb.PutRecordRequest]:
    """Header then ``chunks``; with ``hold``, wait for it and raise (never the end)."""
    head = pb.RecordHeader(
        patient=new_patient(), kind=pb.RECORD_KIND_OTHER, content_type="text/plain"
    )
    yield pb.PutRecordRequest(header=head)
    for chunk in chunks:
        yield pb.PutRecordRequest(chunk=chunk)
    if hold is not None:
        hold.wait(30)
        raise StreamStoppedError


def test_puts_cancelled_at_any_point_store_nothing(
    service_factory: Any, fresh_database: str, issue: Any
) -> None:
    """Each stream shape, cancelled by its client after varied delays and ended by its
    deadline, then completed once as a control: only the controls are stored. The
    delays only vary where the cancellation lands; the check holds at any of them."""
    service: RunningService = service_factory(
        fresh_database, max_calls_per_principal=1, chunk_size=CHUNK
    )
    clerk = client(service, issue(STRESS_CLERK, "records_clerk"))
    officer = client(service, issue("officer-cancel-stress", "security_officer"))
    engine = engine_for(fresh_database)
    shapes = _shapes()
    try:
        rows_before = _rows(engine)
        for name, chunks in shapes.items():
            for delay in (0.0, 0.01, 0.05, 0.2):
                hold = threading.Event()
                future = clerk.records.PutRecord.future(_stream(chunks, hold), timeout=30)
                time.sleep(delay)  # varies where the cancellation lands, asserts nothing
                future.cancel()
                hold.set()
                with pytest.raises((grpc.FutureCancelledError, grpc.RpcError)):
                    future.result()
                wait_for(lambda: _slot_free(clerk), 30, f"the end of a cancelled put ({name})")
            for deadline in (0.3, 0.8):
                hold = threading.Event()
                with pytest.raises(grpc.RpcError) as ended:
                    clerk.records.PutRecord(_stream(chunks, hold), timeout=deadline)
                hold.set()
                assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (
                    f"{name}: {ended.value.code().name}"
                )
                wait_for(lambda: _slot_free(clerk), 30, f"the end of an expired put ({name})")
            assert _rows(engine) == rows_before, f"{name}: a cancelled put left a record"
            # The control: the same messages, then the end, are stored.
            clerk.records.PutRecord(_stream(chunks, None), timeout=30)
            rows_before += 1
            assert _rows(engine) == rows_before, f"{name}: the control was not stored"
        writes = _writes(officer, STRESS_CLERK)
        assert len(writes) == len(shapes), f"{len(writes)} write events for {len(shapes)} puts"
    finally:
        clerk.close()
        officer.close()
        engine.dispose()
        service.stop()
