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

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from storage.sql_metadata import records
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import (
    client,
    engine_for,
    events,
    new_patient,
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


def test_a_put_cancelled_mid_stream_stores_nothing(
    service_factory: Any, fresh_database: str, issue: Any
) -> None:
    service: RunningService = service_factory(fresh_database)
    clerk = client(service, issue(CLERK, "records_clerk"))
    officer = client(service, issue("officer-cancel", "security_officer"))
    engine = engine_for(fresh_database)
    try:
        writes_before = len(events(officer, principal=CLERK, outcome=aupb.OUTCOME_ALLOWED))
        for _ in range(4):
            stream = CutStream()
            future = clerk.records.PutRecord.future(iter(stream), timeout=30)
            assert stream.sent.wait(10), "the stream did not start"
            time.sleep(0.3)  # the upload is under way in its worker
            future.cancel()
            stream.release.set()
            with pytest.raises(grpc.FutureCancelledError):
                future.result()
        # The client's deadline passes mid-stream: the same, and audited as failed.
        stream = CutStream()
        with pytest.raises(grpc.RpcError) as expired:
            clerk.records.PutRecord(iter(stream), timeout=1.0)
        stream.release.set()
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, expired.value.code()
        time.sleep(2)  # what a worker would still commit, it commits by now
        assert _rows(engine) == 0, "a cancelled put left a record"
        allowed = events(officer, principal=CLERK, outcome=aupb.OUTCOME_ALLOWED)
        assert len(allowed) == writes_before, "a cancelled put was audited as written"
        failed = events(officer, principal=CLERK, outcome=aupb.OUTCOME_FAILED)
        statuses = [(e.resource, e.status) for e in failed]
        assert statuses == [("record/new", "DEADLINE_EXCEEDED")], statuses
    finally:
        clerk.close()
        officer.close()
        engine.dispose()
        service.stop()
