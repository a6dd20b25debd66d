"""Put and get through gRPC: sizes around segment boundaries, ranges and input errors.

PYTEST_DONT_REWRITE: a failed assertion shows no values, since they could look like
patient data; the helpers in calls.py name what differs instead.
"""

from __future__ import annotations

import hashlib
import secrets
import time

import grpc
import pytest

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from storage.envelope import StreamingAead
from tests.fixtures.service import RunningService
from tests.integration.service.calls import (
    expect_error,
    expect_same_content,
    expect_same_record,
    fetch,
    get,
    header,
    list_all,
    pieces,
    put,
    requests,
    rpc_error,
)
from tests.integration.service.streams import FIRST_PLAIN, PLAIN, SEGMENT, data, new_patient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# Three full segments and 7 bytes into a fourth.
MULTI = FIRST_PLAIN + 2 * PLAIN + 7
SIZES = [0, 1, FIRST_PLAIN - 1, FIRST_PLAIN, FIRST_PLAIN + 1, MULTI]


def _stored_size(size: int) -> int:
    return StreamingAead(bytes(32), SEGMENT).ciphertext_size(size)


@pytest.mark.parametrize("size", SIZES, ids=[f"{s}B" for s in SIZES])
def test_put_get_round_trip(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId, size: int
) -> None:
    content = data(size, seed=size)
    before = time.time()
    record = put(stub, patient, content, title="round trip")

    assert len(record.id) == 32, "id is not 32 characters"
    assert set(record.id) <= set("0123456789abcdef"), "id is not lowercase hex"
    assert record.version == 1, record.version
    assert record.supersedes_version == 0, record.supersedes_version
    assert record.size == size, record.size
    assert record.stored_size == _stored_size(size), (record.stored_size, _stored_size(size))
    assert record.sha256 == hashlib.sha256(content).digest(), "sha256 differs"
    assert record.created_by == "test-app", record.created_by
    assert record.patient == patient, "patient differs"
    assert record.kind == pb.RECORD_KIND_OTHER, record.kind
    assert record.content_type == "application/octet-stream", record.content_type
    assert record.title == "round trip", "title differs"
    created = record.created_at.seconds + record.created_at.nanos / 1e9
    assert before - 5 <= created <= time.time() + 5, "created_at is not recent"

    metadata, received = get(stub, record.id)
    expect_same_record(metadata, record)
    expect_same_content(received, content)
    expect_same_record(stub.StatRecord(pb.StatRecordRequest(id=record.id), timeout=30), record)
    expect_same_record(
        stub.StatRecord(pb.StatRecordRequest(id=record.id, version=1), timeout=30), record
    )


@pytest.fixture(scope="module")
def multi_segment(medvault_service: RunningService) -> tuple[str, bytes]:
    """One record of three full segments and 7 bytes, shared by the range tests."""
    content = data(MULTI, seed=7)
    with medvault_service.channel() as channel:
        record = put(pb_grpc.RecordServiceStub(channel), new_patient(), content)
    return record.id, content


RANGES = [
    (0, 10),
    (0, 0),
    (100, 0),
    (FIRST_PLAIN - 1, 2),  # across the first boundary
    (FIRST_PLAIN, 5),  # at the first boundary
    (FIRST_PLAIN - 3, 3),  # ends exactly at the boundary
    (FIRST_PLAIN + PLAIN - 3, PLAIN + 6),  # across two boundaries
    (FIRST_PLAIN + 2 * PLAIN, 0),  # the last segment alone, to the end
    (MULTI - 7, 0),
    (MULTI - 1, 100),  # clipped at the end
    (5, MULTI),  # longer than the rest
]


@pytest.mark.parametrize(("offset", "length"), RANGES)
def test_byte_ranges(
    stub: pb_grpc.RecordServiceStub, multi_segment: tuple[str, bytes], offset: int, length: int
) -> None:
    record_id, content = multi_segment
    metadata, received = get(stub, record_id, offset=offset, length=length)
    expected = content[offset : offset + length] if length else content[offset:]
    assert metadata.size == len(content), metadata.size
    expect_same_content(received, expected)


@pytest.mark.parametrize("offset", [MULTI, MULTI + 1, 1 << 40])
def test_range_beyond_end_is_invalid(
    stub: pb_grpc.RecordServiceStub, multi_segment: tuple[str, bytes], offset: int
) -> None:
    record_id, _ = multi_segment
    for length in (0, 1):
        fetched = fetch(stub, record_id, offset=offset, length=length)
        expect_error(fetched.error, grpc.StatusCode.INVALID_ARGUMENT, "range.offset")
        assert fetched.content == b"", "content sent with an invalid range"


def test_empty_record_reads_empty(stub: pb_grpc.RecordServiceStub, patient: pb.PatientId) -> None:
    record = put(stub, patient, b"")
    assert get(stub, record.id, offset=0, length=10)[1] == b"", "content from an empty record"
    expect_error(fetch(stub, record.id, offset=1).error, grpc.StatusCode.INVALID_ARGUMENT,
                 "range.offset")


def test_expected_sha256_mismatch_stores_nothing(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId
) -> None:
    content = data(300_000, seed=3)
    wrong = hashlib.sha256(content + b"x").digest()
    error = rpc_error(stub.PutRecord, requests(
        header(patient, expected_sha256=wrong), pieces(content)), timeout=30)
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "expected_sha256")
    assert not list_all(stub, patient, all_versions=True), "a failed put is listed"
    error = rpc_error(stub.PutRecord, requests(
        header(patient, expected_sha256=b"short"), pieces(content)), timeout=30)
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "expected_sha256")
    # The right digest is accepted.
    right = hashlib.sha256(content).digest()
    assert put(stub, patient, content, expected_sha256=right).size == len(content)
    assert len(list_all(stub, patient, all_versions=True)) == 1, "not exactly one record"


def _put_error(
    stub: pb_grpc.RecordServiceStub, messages: list[pb.PutRecordRequest]
) -> grpc.RpcError:
    return rpc_error(stub.PutRecord, iter(messages), timeout=30)


def test_missing_header(stub: pb_grpc.RecordServiceStub) -> None:
    error = _put_error(stub, [pb.PutRecordRequest(chunk=b"abc")])
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "header")
    error = _put_error(stub, [])
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "header")


def test_header_twice(stub: pb_grpc.RecordServiceStub, patient: pb.PatientId) -> None:
    head = pb.PutRecordRequest(header=header(patient))
    error = _put_error(stub, [head, pb.PutRecordRequest(chunk=b"abc"), head])
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "header")
    error = _put_error(stub, [head, head])
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "header")
    assert not list_all(stub, patient, all_versions=True), "a failed put is listed"


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"kind": 99}, "kind"),
        ({"kind": pb.RECORD_KIND_UNSPECIFIED}, "kind"),
        ({"content_type": "not a mime type"}, "content_type"),
        ({"content_type": ""}, "content_type"),
        ({"patient": pb.PatientId(id="", assigning_authority="urn:oid:2.999")}, "patient.id"),
        ({"patient": pb.PatientId(id="   ", assigning_authority="urn:oid:2.999")}, "patient.id"),
        ({"patient": pb.PatientId(id="X1", assigning_authority="")},
         "patient.assigning_authority"),
        ({"title": "line\nbreak"}, "title"),
        ({"supersedes": "not-an-id"}, "supersedes"),
        ({"supersedes_version": 1}, "supersedes_version"),
    ],
    ids=["unknown-kind", "unspecified-kind", "bad-content-type", "empty-content-type",
         "empty-patient-id", "blank-patient-id", "empty-authority", "control-char-title",
         "bad-supersedes", "version-without-supersedes"],
)
def test_invalid_header_names_the_field(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId, fields: dict[str, object],
    field_name: str
) -> None:
    head = header(patient)
    for name, value in fields.items():
        if name == "patient":
            head.patient.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(head, name, value)
    error = _put_error(stub, [pb.PutRecordRequest(header=head), pb.PutRecordRequest(chunk=b"x")])
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, field_name)
    assert not list_all(stub, patient, all_versions=True), "a failed put is listed"


def test_missing_patient_is_invalid(stub: pb_grpc.RecordServiceStub) -> None:
    head = pb.RecordHeader(kind=pb.RECORD_KIND_OTHER, content_type="application/octet-stream")
    error = _put_error(stub, [pb.PutRecordRequest(header=head)])
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "patient")


def test_unknown_id_is_not_found(stub: pb_grpc.RecordServiceStub) -> None:
    unknown = secrets.token_hex(16)
    expect_error(fetch(stub, unknown).error, grpc.StatusCode.NOT_FOUND)
    error = rpc_error(stub.StatRecord, pb.StatRecordRequest(id=unknown), timeout=30)
    expect_error(error, grpc.StatusCode.NOT_FOUND)


def test_unknown_version_is_not_found(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId
) -> None:
    record = put(stub, patient, b"one version")
    expect_error(fetch(stub, record.id, version=2).error, grpc.StatusCode.NOT_FOUND)
    error = rpc_error(stub.StatRecord, pb.StatRecordRequest(id=record.id, version=2), timeout=30)
    expect_error(error, grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize(
    "bad_id",
    ["", "xyz", "ABCDEF0123456789ABCDEF0123456789", "0123456789abcdef0123456789abcde",
     "0123456789abcdef0123456789abcdef00", "../23456789abcdef0123456789abcdef",
     "0123456789abcdef0123456789abcd%0"],
    ids=["empty", "short", "uppercase", "31-hex", "34-hex", "path", "percent"],
)
def test_malformed_id_is_invalid(stub: pb_grpc.RecordServiceStub, bad_id: str) -> None:
    fetched = fetch(stub, bad_id)
    expect_error(fetched.error, grpc.StatusCode.INVALID_ARGUMENT, "id")
    assert fetched.metadata is None, "metadata sent for a malformed id"
    error = rpc_error(stub.StatRecord, pb.StatRecordRequest(id=bad_id), timeout=30)
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "id")
