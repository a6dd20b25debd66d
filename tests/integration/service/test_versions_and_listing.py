"""Amendments (new versions of a record) and ListRecords: paging, filters, versions.

PYTEST_DONT_REWRITE: a failed assertion shows no values, since they could look like
patient data; the helpers in calls.py name what differs instead.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from tests.integration.service.calls import (
    expect_error,
    expect_same_content,
    expect_same_record,
    get,
    list_all,
    put,
    rpc_error,
)
from tests.integration.service.streams import data, hl7v2, new_patient, pdf

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PDF = {"kind": pb.RECORD_KIND_PDF, "content_type": "application/pdf"}
HL7 = {"kind": pb.RECORD_KIND_HL7V2, "content_type": "x-application/hl7-v2+er7"}


def _when(record: pb.Record) -> tuple[int, int]:
    return record.created_at.seconds, record.created_at.nanos


def test_amendment_is_the_next_version(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId
) -> None:
    first_content, second_content = pdf("first"), pdf("second")
    first = put(stub, patient, first_content, title="report", **PDF)
    second = put(stub, patient, second_content, title="report, corrected",
                 supersedes=first.id, supersedes_version=1, **PDF)

    assert second.id == first.id, "the amendment got another id"
    assert second.version == 2, second.version
    assert second.supersedes_version == 1, second.supersedes_version
    assert second.title == "report, corrected", "title differs"
    for version, (record, content) in {1: (first, first_content), 2: (second, second_content),
                                       0: (second, second_content)}.items():  # 0: the latest
        metadata, received = get(stub, first.id, version=version)
        expect_same_record(metadata, record)
        expect_same_content(received, content)
    expect_same_record(stub.StatRecord(pb.StatRecordRequest(id=first.id), timeout=30), second)
    expect_same_record(
        stub.StatRecord(pb.StatRecordRequest(id=first.id, version=1), timeout=30), first
    )

    # Without the optimistic check, an amendment always lands on the latest version.
    third = put(stub, patient, pdf("third"), supersedes=first.id, **PDF)
    assert (third.id, third.version, third.supersedes_version) == (first.id, 3, 2), (
        "third version numbered wrongly")


def test_amending_a_stale_version_fails(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId
) -> None:
    first = put(stub, patient, pdf(), **PDF)
    put(stub, patient, pdf(), supersedes=first.id, supersedes_version=1, **PDF)
    error = rpc_error(stub.PutRecord, iter([pb.PutRecordRequest(header=pb.RecordHeader(
        patient=patient, supersedes=first.id, supersedes_version=1, **PDF,
    )), pb.PutRecordRequest(chunk=pdf())]), timeout=30)
    expect_error(error, grpc.StatusCode.FAILED_PRECONDITION)
    assert [r.version for r in list_all(stub, patient, all_versions=True)] == [2, 1]


def test_amending_with_another_patient_is_invalid(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId
) -> None:
    first = put(stub, patient, pdf(), **PDF)
    other = new_patient()
    error = rpc_error(stub.PutRecord, iter([pb.PutRecordRequest(header=pb.RecordHeader(
        patient=other, supersedes=first.id, **PDF,
    )), pb.PutRecordRequest(chunk=pdf())]), timeout=30)
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "patient")
    assert stub.StatRecord(pb.StatRecordRequest(id=first.id), timeout=30).version == 1
    assert not list_all(stub, other, all_versions=True), "the other patient has records"


def test_amending_an_unknown_record_is_not_found(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId
) -> None:
    error = rpc_error(stub.PutRecord, iter([pb.PutRecordRequest(header=pb.RecordHeader(
        patient=patient, supersedes="0" * 32, **PDF,
    ))]), timeout=30)
    expect_error(error, grpc.StatusCode.NOT_FOUND)


@pytest.fixture
def seven(stub: pb_grpc.RecordServiceStub, patient: pb.PatientId) -> list[pb.Record]:
    """Seven records of one patient (4 PDF, 3 HL7 v2), oldest first, plus a neighbour's."""
    records = []
    for i in range(7):
        if i % 2 == 0:
            records.append(put(stub, patient, pdf(), title=f"doc {i}", **PDF))
        else:
            records.append(put(stub, patient, hl7v2(patient), title=f"msg {i}", **HL7))
    neighbour = new_patient()
    put(stub, neighbour, pdf(), **PDF)
    put(stub, pb.PatientId(id=patient.id, assigning_authority="urn:oid:2.999.42.2"), pdf(),
        **PDF)  # same identifier, another authority: another patient
    return records


def test_listing_pages_newest_first(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId, seven: list[pb.Record]
) -> None:
    request = pb.ListRecordsRequest(patient=patient, page_size=3)
    pages = []
    tokens = []
    for _ in range(5):
        page = stub.ListRecords(request, timeout=30)
        pages.append(list(page.records))
        tokens.append(page.next_page_token)
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert [len(p) for p in pages] == [3, 3, 1], [len(p) for p in pages]
    assert all(tokens[:2]), "a page before the last has no token"
    assert not tokens[2], "the last page has a token"
    listed = [r for page in pages for r in page]
    assert [r.id for r in listed] == [r.id for r in reversed(seven)], "not newest first"
    assert len({r.id for r in listed}) == 7, "duplicates"
    assert [_when(r) for r in listed] == sorted((_when(r) for r in listed), reverse=True)
    for got, want in zip(listed, reversed(seven), strict=True):
        expect_same_record(got, want)  # full metadata: patient and title unsealed
    # Page tokens are opaque but carry no patient data.
    for token in tokens[:2]:
        decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        assert patient.id.encode() not in decoded, "a page token holds the patient id"


def test_listing_default_page_and_limits(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId, seven: list[pb.Record]
) -> None:
    page = stub.ListRecords(pb.ListRecordsRequest(patient=patient), timeout=30)
    assert len(page.records) == 7, len(page.records)
    assert not page.next_page_token, "a token after the last page"
    page = stub.ListRecords(pb.ListRecordsRequest(patient=patient, page_size=7), timeout=30)
    assert len(page.records) == 7, len(page.records)
    assert not page.next_page_token, "a token after the last page"
    error = rpc_error(stub.ListRecords, pb.ListRecordsRequest(patient=patient, page_size=501),
                      timeout=30)
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "page_size")


def test_listing_by_kind(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId, seven: list[pb.Record]
) -> None:
    pdfs = list_all(stub, patient, kind=pb.RECORD_KIND_PDF, page_size=2)
    assert [r.id for r in pdfs] == [r.id for r in reversed(seven[0::2])]
    hl7s = list_all(stub, patient, kind=pb.RECORD_KIND_HL7V2)
    assert [r.id for r in hl7s] == [r.id for r in reversed(seven[1::2])]
    assert not list_all(stub, patient, kind=pb.RECORD_KIND_DICOM), "DICOM listed"
    error = rpc_error(stub.ListRecords, pb.ListRecordsRequest(patient=patient, kind=42),
                      timeout=30)
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "kind")


def test_listing_by_creation_time(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId, seven: list[pb.Record]
) -> None:
    # created_after is inclusive, created_before exclusive.
    window = list_all(stub, patient, created_after=seven[2].created_at,
                      created_before=seven[5].created_at, page_size=2)
    assert [r.id for r in window] == [seven[4].id, seven[3].id, seven[2].id]
    since = list_all(stub, patient, created_after=seven[5].created_at)
    assert [r.id for r in since] == [seven[6].id, seven[5].id]
    until = list_all(stub, patient, created_before=seven[1].created_at)
    assert [r.id for r in until] == [seven[0].id]
    future = Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    assert not list_all(stub, patient, created_after=future), "records from the future"
    combined = list_all(stub, patient, kind=pb.RECORD_KIND_PDF,
                        created_after=seven[1].created_at)
    assert [r.id for r in combined] == [seven[6].id, seven[4].id, seven[2].id]


def test_listing_versions(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId, seven: list[pb.Record]
) -> None:
    amended = put(stub, patient, pdf("amended"), supersedes=seven[0].id, **PDF)
    latest = list_all(stub, patient, page_size=3)
    assert len(latest) == 7, len(latest)
    expect_same_record(latest[0], amended)  # the amendment is the newest row
    assert (seven[0].id, 1) not in {(r.id, r.version) for r in latest}, "old version listed"

    every = list_all(stub, patient, all_versions=True, page_size=3)
    assert len(every) == 8, len(every)
    assert len({(r.id, r.version) for r in every}) == 8, "duplicates"
    expect_same_record(every[0], amended)
    expect_same_record(every[-1], seven[0])


def test_garbage_page_token_is_invalid(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId
) -> None:
    forged = base64.urlsafe_b64encode(json.dumps(["yesterday", "x", 1]).encode()).decode()
    for token in ["garbage!", "bm90IGpzb24", forged, "%%%"]:
        error = rpc_error(stub.ListRecords,
                          pb.ListRecordsRequest(patient=patient, page_token=token), timeout=30)
        expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "page_token")


def test_listing_requires_a_patient(stub: pb_grpc.RecordServiceStub) -> None:
    error = rpc_error(stub.ListRecords, pb.ListRecordsRequest(page_size=3), timeout=30)
    expect_error(error, grpc.StatusCode.INVALID_ARGUMENT, "patient")


def test_listing_unknown_patient_is_empty(stub: pb_grpc.RecordServiceStub) -> None:
    assert not list_all(stub, new_patient()), "records of an unknown patient"


def test_large_amendment_reads_back(
    stub: pb_grpc.RecordServiceStub, patient: pb.PatientId
) -> None:
    first = put(stub, patient, data(2_000_000, seed=1))
    second_content = data(1_500_000, seed=2)
    second = put(stub, patient, second_content, supersedes=first.id)
    expect_same_content(get(stub, first.id, version=1)[1], data(2_000_000, seed=1))
    expect_same_content(get(stub, second.id, version=2)[1], second_content)
