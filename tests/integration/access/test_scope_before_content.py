"""Attack: hold the server's upload slots as a principal with no grant for any patient.

docs/architecture.md's write path authorises the patient (step 2) before the content streams in
(step 3). A patient-scoped caller (here a nurse with no care-team grant) whose put names
a patient outside its scope must be refused after the header, before the server waits
for any content: otherwise it holds one of the server's upload slots (``max_uploads``,
here one) for as long as the stream's deadlines let it stay silent, and every other
upload is refused meanwhile.

PYTEST_DONT_REWRITE: failures name codes only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from service._gen.medvault.v1 import records_pb2 as pb
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import client, new_patient, put_record

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

IDLE = 60.0  # the server waits this long for each next message
REFUSED_WITHIN = 20.0  # a bound on a refusal the server decides in milliseconds


def _header_then_silence(hold: threading.Event) -> Iterator[pb.PutRecordRequest]:
    head = pb.RecordHeader(
        patient=new_patient(), kind=pb.RECORD_KIND_OTHER, content_type="text/plain"
    )
    yield pb.PutRecordRequest(header=head)
    hold.wait(IDLE * 2)


def test_an_out_of_scope_put_is_refused_before_its_content(
    service_factory: Any, fresh_database: str, issue: Any
) -> None:
    service: RunningService = service_factory(
        fresh_database, workers=1, max_uploads=1, idle_seconds=IDLE,
        first_message_seconds=IDLE,
    )  # fmt: skip
    nurse = client(service, issue("nurse-no-grant", "nurse"))
    clerk = client(service, issue("clerk-scope-first", "records_clerk"))
    hold = threading.Event()
    try:
        future = nurse.records.PutRecord.future(_header_then_silence(hold), timeout=IDLE * 2)
        try:
            error = future.exception(timeout=REFUSED_WITHIN)
        except grpc.FutureTimeoutError:
            error = None
        refused = error.code() if isinstance(error, grpc.RpcError) else None
        # The upload slot is free again: the clerk's put is stored, not RESOURCE_EXHAUSTED.
        clerk_code = grpc.StatusCode.OK
        try:
            put_record(clerk, new_patient(), b"synthetic note")
        except grpc.RpcError as e:
            clerk_code = e.code()
        assert clerk_code == grpc.StatusCode.OK, f"another upload refused: {clerk_code.name}"
        assert refused == grpc.StatusCode.PERMISSION_DENIED, (
            f"out-of-scope put not refused while its stream was silent: {refused}"
        )
    finally:
        hold.set()
        nurse.close()
        clerk.close()
        service.stop()
