"""Attack: principals, each within its share, hold every store thread with slow uploads.

An upload holds a store thread while its client streams (up to ``idle_seconds`` per
message). With a small pool (``workers = 2``: 4 threads) and ``server.max_uploads`` at
its default (``workers``), uploads beyond the cap get RESOURCE_EXHAUSTED (audited) and
reads are still served at once.

PYTEST_DONT_REWRITE: failures name codes and counts, never what was sent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from tests.fixtures.service import DEFAULT_POLICY, free_port
from tests.integration.access.helpers import (
    TIMEOUT,
    Metrics,
    client,
    events,
    fetch,
    grant,
    new_patient,
    put_record,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WORKERS = 2
IDLE = 4.0


class Slow:
    """An upload that sends its header, then nothing until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __iter__(self) -> Iterator[pb.PutRecordRequest]:
        head = pb.RecordHeader(
            patient=new_patient(), kind=pb.RECORD_KIND_OTHER, content_type="text/plain"
        )
        yield pb.PutRecordRequest(header=head)
        self.release.wait(IDLE + 5)


def _code(future: Any) -> grpc.StatusCode:
    try:
        future.result()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_slow_uploads_cannot_take_every_thread(
    service_factory: Any, fresh_database: str, issue: Any
) -> None:
    metrics_port = free_port()
    service = service_factory(
        fresh_database, policy=DEFAULT_POLICY.read_text(), workers=WORKERS,
        max_calls_per_principal=2, first_message_seconds=IDLE, idle_seconds=IDLE,
        metrics_listen=f"127.0.0.1:{metrics_port}", health_probe_seconds=3600,
    )  # fmt: skip
    metrics = Metrics(metrics_port)
    clerks = [client(service, issue(f"cap-clerk-{i}", "records_clerk")) for i in range(2 * WORKERS)]
    reader = client(service, issue("cap-physician", "physician"))
    officer = client(service, issue("cap-officer", "security_officer"))
    patient = new_patient()
    record = put_record(clerks[0], patient)
    grant(clerks[0], patient, "cap-physician")
    uploads = [Slow() for _ in range(2 * WORKERS)]  # would fill the pool
    try:
        # One slow upload per principal, each well within its share of 2.
        held = [clerks[i].records.PutRecord.future(iter(u), timeout=TIMEOUT)
                for i, u in enumerate(uploads[:WORKERS])]  # fmt: skip
        # Each takes its upload slot, then its thread: the pool's only jobs (no health
        # probe runs in this test), so both are counted once both hold their slots.
        wait_for(lambda: metrics.value("medvault_worker_jobs") == WORKERS, 20,
                 "the held uploads in their threads")  # fmt: skip
        extra = [clerks[i].records.PutRecord.future(iter(uploads[i]), timeout=TIMEOUT)
                 for i in range(WORKERS, 2 * WORKERS)]  # fmt: skip
        wait_for(lambda: all(f.done() for f in extra), 30, "uploads over the cap refused")
        codes = {_code(f).name for f in extra}
        assert codes == {"RESOURCE_EXHAUSTED"}, sorted(codes)
        assert not any(f.done() for f in held), "a held upload ended early"
        for _ in range(5):  # reads find threads while every upload slot is taken
            got = fetch(reader, record.id)
            assert got.code == grpc.StatusCode.OK, got.code.name
        # ...served while every upload slot was still taken: they did not wait for one.
        assert not any(f.done() for f in held), "reads waited for the uploads"
    finally:
        for u in uploads:
            u.release.set()
    for i in range(WORKERS, 2 * WORKERS):
        refused = events(officer, principal=f"cap-clerk-{i}", outcome=aupb.OUTCOME_FAILED)
        assert [e.status for e in refused] == ["RESOURCE_EXHAUSTED"], "refusal not audited"
    # Released, the held uploads end (content empty is refused or stored: either is a
    # finished call) and free their slots: a new upload is accepted.
    for future in held:
        future.exception()
    assert put_record(clerks[WORKERS], new_patient()).id
    for c in (*clerks, reader, officer):
        c.close()
    service.stop()
