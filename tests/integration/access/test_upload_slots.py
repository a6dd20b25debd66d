"""Attack: leak the server's upload slots (``server.max_uploads``) by ending uploads badly.

A slot that an ended upload does not give back is lost until restart; with the cap at
one (``workers = 1``), a single leak refuses every later upload. Each way an upload can
end is tried in turn — the client cancels mid-stream, its deadline expires, the server's
idle deadline ends it, it is refused for patient scope, its request id was used for
other content, its content breaks the size limit — and after each a normal upload must
be accepted again within seconds. And a trickle — a few bytes sent just often enough to
never be idle — is ended by ``server.min_upload_bytes_per_second`` instead of holding
its slot for ever.

PYTEST_DONT_REWRITE: failures name codes, never what was sent.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from service._gen.medvault.v1 import records_pb2 as pb
from tests.fixtures.service import DEFAULT_POLICY
from tests.integration.access.helpers import TIMEOUT, Client, client, new_patient, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

IDLE = 2.0
RATE = 1000  # bytes/s an upload must average after its first IDLE seconds


def _header(patient: pb.PatientId, **fields: Any) -> pb.PutRecordRequest:
    head = pb.RecordHeader(
        patient=patient, kind=pb.RECORD_KIND_OTHER, content_type="text/plain", **fields
    )
    return pb.PutRecordRequest(header=head)


def _stalled(patient: pb.PatientId, started: threading.Event, hold: float) -> Iterator[Any]:
    """The header and a first chunk, then silence for ``hold`` seconds."""
    yield _header(patient)
    yield pb.PutRecordRequest(chunk=b"synthetic part")
    started.set()
    threading.Event().wait(hold)


def _trickle(patient: pb.PatientId) -> Iterator[Any]:
    """The header, then ten bytes every half second: never idle, never done."""
    yield _header(patient)
    for _ in range(120):
        time.sleep(0.5)
        yield pb.PutRecordRequest(chunk=b"synthetic!")


def _code(run: Callable[[], Any]) -> grpc.StatusCode:
    try:
        run()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _slot_is_free(clerk: Client) -> None:
    """A normal upload is accepted within seconds (else a slot leaked)."""
    codes: list[str] = []

    def accepted() -> bool:
        stream = iter([_header(new_patient()), pb.PutRecordRequest(chunk=b"synthetic")])
        code = _code(lambda: clerk.records.PutRecord(stream, timeout=TIMEOUT))
        codes.append(code.name)
        return code == grpc.StatusCode.OK

    wait_for(accepted, 30, "the upload slot to come back")
    assert codes[-1] == "OK", codes


def test_upload_slots_come_back_however_an_upload_ends(
    service_factory: Any, fresh_database: str, issue: Any
) -> None:
    service = service_factory(
        fresh_database, policy=DEFAULT_POLICY.read_text(), workers=1, max_calls_per_principal=4,
        first_message_seconds=IDLE, idle_seconds=IDLE, max_record_size=1024,
        min_upload_bytes_per_second=RATE,
    )  # fmt: skip
    clerk = client(service, issue("slots-clerk", "records_clerk"))
    physician = client(service, issue("slots-physician", "physician"))  # no grant
    try:
        _slot_is_free(clerk)

        # The client cancels mid-stream.
        started = threading.Event()
        future = clerk.records.PutRecord.future(
            _stalled(new_patient(), started, 10), timeout=TIMEOUT
        )
        assert started.wait(10)
        future.cancel()
        _slot_is_free(clerk)

        # The client's deadline expires mid-stream.
        late = _stalled(new_patient(), threading.Event(), 10)
        code = _code(lambda: clerk.records.PutRecord(late, timeout=1.0))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, code.name
        _slot_is_free(clerk)

        # The server's idle deadline ends a silent upload.
        idle = _stalled(new_patient(), threading.Event(), IDLE + 3)
        code = _code(lambda: clerk.records.PutRecord(idle, timeout=TIMEOUT))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, code.name
        _slot_is_free(clerk)

        # A trickle (never silent for IDLE) is ended by the rate floor, not held for ever.
        began = time.monotonic()
        code = _code(lambda: clerk.records.PutRecord(_trickle(new_patient()), timeout=TIMEOUT))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, code.name
        assert time.monotonic() - began < IDLE + 5, "the trickle held its slot too long"
        _slot_is_free(clerk)

        # Refused for patient scope (no grant), after the header.
        denied = iter([_header(new_patient()), pb.PutRecordRequest(chunk=b"synthetic")])
        code = _code(lambda: physician.records.PutRecord(denied, timeout=TIMEOUT))
        assert code == grpc.StatusCode.PERMISSION_DENIED, code.name
        _slot_is_free(clerk)

        # A request id reused for other content.
        key, patient = str(uuid.uuid4()), new_patient()
        for content, want in ((b"synthetic one", "OK"), (b"synthetic two", "FAILED_PRECONDITION")):
            stream = iter([_header(patient, request_id=key), pb.PutRecordRequest(chunk=content)])
            code = _code(lambda s=stream: clerk.records.PutRecord(s, timeout=TIMEOUT))
            assert code.name == want, code.name
        _slot_is_free(clerk)

        # Content over the size limit (an error inside the store's worker).
        big = iter([_header(new_patient()), pb.PutRecordRequest(chunk=b"x" * 2048)])
        code = _code(lambda: clerk.records.PutRecord(big, timeout=TIMEOUT))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, code.name
        _slot_is_free(clerk)
    finally:
        clerk.close()
        physician.close()
        service.stop()
