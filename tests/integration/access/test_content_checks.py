"""A record that is not the kind it claims, or names another patient, is refused through
the real service: INVALID_ARGUMENT naming the problem, no row, no object, audited."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from storage.sql_metadata import records
from tests import content
from tests.fixtures.service import RunningService
from tests.integration.access.helpers import client, engine_for, events, new_patient
from tests.integration.service.calls import pieces, requests, server_bucket

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CLERK = "clerk-formats"
TEXT = b"Dear colleague, please find the results below.\n" * 2000


def _objects(s3: Any, bucket: str) -> set[str]:
    return {o.object_name for o in s3.list_objects(bucket, prefix="objects/", recursive=True)}


def _rows(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.scalar(sa.select(sa.func.count()).select_from(records)) or 0)


def _hl7(patient: Any) -> bytes:
    return content.hl7v2(patient.id, patient.assigning_authority)


def test_wrong_kind_or_patient_is_refused_stores_nothing_and_is_audited(
    service_factory: Any, fresh_database: str, issue: Any, s3_server: Any
) -> None:
    service: RunningService = service_factory(fresh_database)
    clerk = client(service, issue(CLERK, "records_clerk"))
    officer = client(service, issue("officer-formats", "security_officer"))
    engine = engine_for(fresh_database)
    s3, bucket = s3_server.client(), server_bucket(service.config_path)
    patient, other = new_patient(), new_patient()
    cases = [  # (kind, content, what the refusal names)
        (pb.RECORD_KIND_DICOM, TEXT, "DICM"),
        (pb.RECORD_KIND_PDF, TEXT, "PDF"),
        (pb.RECORD_KIND_HL7V2, TEXT, "MSH"),
        (pb.RECORD_KIND_CDA, TEXT, "XML"),
        (pb.RECORD_KIND_FHIR, TEXT, "JSON"),
        (pb.RECORD_KIND_PDF, content.pdf()[:-20], "startxref"),
        (pb.RECORD_KIND_HL7V2, content.hl7v2(other.id, other.assigning_authority), "PID-3"),
        (pb.RECORD_KIND_DICOM, content.dicom(other.id, other.assigning_authority,
                                             pixels=bytes(3 << 20)), "PatientID"),
        # Hostile content (attack review): each was INTERNAL, or cost hundreds of MiB.
        (pb.RECORD_KIND_HL7V2, _hl7(patient).replace(b"\rPID|", b"\rPIDX|"), "PID"),
        (pb.RECORD_KIND_HL7V2, _hl7(patient) + _hl7(other)[_hl7(other).index(b"PID"):],
         "more than one PID"),
        (pb.RECORD_KIND_FHIR, b'{"resourceType": "Patient", "x": [' + b"{}," * 300_000
         + b"{}]}", "values"),
        (pb.RECORD_KIND_CDA, content.cda(patient.id, patient.assigning_authority).replace(
            b"<structuredBody", b"<structuredBody" + b' a="x"' * 2000), "attributes"),
    ]
    try:
        objects_before, rows_before = _objects(s3, bucket), _rows(engine)
        failed_before = len(events(officer, principal=CLERK, outcome=aupb.OUTCOME_FAILED))
        for kind, data, named in cases:
            head = pb.RecordHeader(patient=patient, kind=kind, content_type="application/x-test")
            with pytest.raises(grpc.RpcError) as refused:
                clerk.records.PutRecord(requests(head, pieces(data)), timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                refused.value.code().name)
            details = refused.value.details() or ""
            assert "content" in details, f"{named}: field not named"
            assert named in details, f"{named}: reason not named"
            assert patient.id not in details, "a value echoed"
            assert other.id not in details, "a value echoed"
        assert _rows(engine) == rows_before, "a refused put left a row"
        assert _objects(s3, bucket) == objects_before, "a refused put left an object"
        failed = events(officer, principal=CLERK, outcome=aupb.OUTCOME_FAILED)
        assert len(failed) == failed_before + len(cases), "a refusal was not audited"
        assert all(e.status == "INVALID_ARGUMENT" for e in failed[failed_before:])
        # The same patient's valid content of each kind is stored.
        for kind in ("DICOM", "PDF", "HL7V2", "CDA", "FHIR"):
            head = pb.RecordHeader(patient=patient, kind=f"RECORD_KIND_{kind}",
                                   content_type="application/x-test")
            data = content.content(kind, patient.id, patient.assigning_authority)
            clerk.records.PutRecord(requests(head, pieces(data)), timeout=60)
        assert _rows(engine) == rows_before + 5, "valid content was not stored"
    finally:
        clerk.close()
        officer.close()
        engine.dispose()
        service.stop()
