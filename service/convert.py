"""Translation between protobuf messages and domain objects (proto types stay in service/)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from service._gen.medvault.v1 import records_pb2 as pb
from storage import (
    InvalidRecordError,
    NewRecord,
    PatientRef,
    RecordInfo,
    RecordKind,
    RecordQuery,
    StudySummary,
)

_KINDS: dict[pb.RecordKind, RecordKind] = {
    pb.RECORD_KIND_HL7V2: RecordKind.HL7V2,
    pb.RECORD_KIND_CDA: RecordKind.CDA,
    pb.RECORD_KIND_FHIR: RecordKind.FHIR,
    pb.RECORD_KIND_DICOM: RecordKind.DICOM,
    pb.RECORD_KIND_PDF: RecordKind.PDF,
    pb.RECORD_KIND_OTHER: RecordKind.OTHER,
}
_KIND_CODES = {kind: code for code, kind in _KINDS.items()}
# Versions are SQL INTEGER columns: a larger uint32 must not reach the database.
MAX_VERSION = (1 << 31) - 1
# What an id in an audit resource may look like (record, grant, signature, backup ids).
_RESOURCE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}\Z")


def resource_id(value: str) -> str:
    """``value`` if it can stand in an audit resource, else a placeholder.

    The id is checked (with its field named) where it is used; the resource of a failed
    call must still be a short, clean string, whatever the caller sent.
    """
    return value if _RESOURCE_ID.match(value) else "(invalid id)"


def version_from_pb(value: int, field: str) -> int | None:
    """A version number from the wire (0 = latest)."""
    if value > MAX_VERSION:
        raise InvalidRecordError(field, f"must be at most {MAX_VERSION}")
    return value or None


def timestamp_from_pb(ts: Timestamp, field: str) -> datetime:
    """A UTC datetime; ``field`` is named if the timestamp is outside 0001..9999."""
    try:
        value: datetime = ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as e:
        raise InvalidRecordError(
            field, "must be a valid timestamp between 0001-01-01 and 9999-12-31 UTC"
        ) from e
    return value


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
        supersedes_version=version_from_pb(msg.supersedes_version, "header.supersedes_version"),
        expected_sha256=msg.expected_sha256 or None,
        request_id=msg.request_id or None,
    )


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


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
        created_after=_optional_time(msg, "created_after"),
        created_before=_optional_time(msg, "created_before"),
        page_size=msg.page_size or 50,
        page_token=msg.page_token,
        all_versions=msg.all_versions,
        document_code=msg.document_code or None,
        study_uid=msg.study_uid or None,
        series_uid=msg.series_uid or None,
        modality=msg.modality or None,
        observation_code=msg.observation_code or None,
        date_from=msg.date_from or None,
        date_to=msg.date_to or None,
    )


def study_to_pb(study: StudySummary) -> pb.Study:
    """A study summary as sent (its date as YYYY-MM-DD)."""
    date = study.study_date
    return pb.Study(
        study_uid=study.study_uid,
        study_date=f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else "",
        modalities=list(study.modalities),
        series_count=study.series_count,
        instance_count=study.instance_count,
    )


def _optional_time(msg: pb.ListRecordsRequest, field: str) -> datetime | None:
    return timestamp_from_pb(getattr(msg, field), field) if msg.HasField(field) else None
