"""Translation between protobuf messages and domain objects (proto types stay in service/)."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from service._gen.medvault.v1 import records_pb2 as pb
from storage.errors import InvalidRecordError
from storage.model import NewRecord, PatientRef, RecordInfo, RecordKind, RecordQuery

_KINDS: dict[pb.RecordKind, RecordKind] = {
    pb.RECORD_KIND_HL7V2: RecordKind.HL7V2,
    pb.RECORD_KIND_CDA: RecordKind.CDA,
    pb.RECORD_KIND_FHIR: RecordKind.FHIR,
    pb.RECORD_KIND_DICOM: RecordKind.DICOM,
    pb.RECORD_KIND_PDF: RecordKind.PDF,
    pb.RECORD_KIND_OTHER: RecordKind.OTHER,
}
_KIND_CODES = {kind: code for code, kind in _KINDS.items()}


def kind_from_pb(code: int, field: str, *, required: bool) -> RecordKind | None:
    """The domain kind for a proto enum value."""
    if code == pb.RECORD_KIND_UNSPECIFIED and not required:
        return None
    if code not in _KINDS:
        raise InvalidRecordError(field, "must be one of HL7V2, CDA, FHIR, DICOM, PDF, OTHER")
    return _KINDS[code]  # type: ignore[index]  # proto enums are ints at run time


def patient_from_pb(msg: pb.PatientId) -> PatientRef:
    """A patient reference from its proto form."""
    return PatientRef(id=msg.id, authority=msg.assigning_authority)


def header_from_pb(msg: pb.RecordHeader) -> NewRecord:
    """The domain header of a PutRecord stream."""
    if not msg.HasField("patient"):
        raise InvalidRecordError("header.patient", "is required")
    kind = kind_from_pb(msg.kind, "header.kind", required=True)
    assert kind is not None
    return NewRecord(
        patient=patient_from_pb(msg.patient),
        kind=kind,
        content_type=msg.content_type,
        title=msg.title,
        supersedes=msg.supersedes or None,
        supersedes_version=msg.supersedes_version or None,
        expected_sha256=msg.expected_sha256 or None,
    )


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def _datetime(ts: Timestamp) -> datetime:
    value: datetime = ts.ToDatetime(tzinfo=UTC)
    return value


def record_to_pb(info: RecordInfo) -> pb.Record:
    """The proto form of a stored version."""
    return pb.Record(
        id=info.id,
        version=info.version,
        patient=pb.PatientId(id=info.patient.id, assigning_authority=info.patient.authority),
        kind=_KIND_CODES[info.kind],
        content_type=info.content_type,
        title=info.title,
        size=info.size,
        stored_size=info.stored_size,
        sha256=info.sha256,
        created_at=_timestamp(info.created_at),
        created_by=info.created_by,
        supersedes_version=info.supersedes_version or 0,
    )


def query_from_pb(msg: pb.ListRecordsRequest) -> RecordQuery:
    """The domain query of a ListRecords request."""
    if not msg.HasField("patient"):
        raise InvalidRecordError("patient", "is required")
    return RecordQuery(
        patient=patient_from_pb(msg.patient),
        kind=kind_from_pb(msg.kind, "kind", required=False),
        created_after=_datetime(msg.created_after) if msg.HasField("created_after") else None,
        created_before=_datetime(msg.created_before) if msg.HasField("created_before") else None,
        page_size=msg.page_size or 50,
        page_token=msg.page_token,
        all_versions=msg.all_versions,
    )
