"""Domain objects of the record store. Frozen; no gRPC, SQLAlchemy, minio or PKCS#11."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class RecordKind(enum.Enum):
    """What a record holds."""

    HL7V2 = "HL7V2"
    CDA = "CDA"
    FHIR = "FHIR"
    DICOM = "DICOM"
    PDF = "PDF"
    OTHER = "OTHER"


@dataclass(frozen=True, slots=True)
class PatientRef:
    """A patient identifier and the authority that assigned it."""

    id: str
    authority: str

    def canonical(self) -> bytes:
        """Unambiguous byte encoding used for the blind index."""
        a, i = self.authority.encode(), self.id.encode()
        return len(a).to_bytes(4, "big") + a + len(i).to_bytes(4, "big") + i


@dataclass(frozen=True, slots=True)
class NewRecord:
    """The header of a record being stored."""

    patient: PatientRef
    kind: RecordKind
    content_type: str
    title: str = ""
    supersedes: str | None = None
    supersedes_version: int | None = None
    expected_sha256: bytes | None = None
    # Client-chosen idempotency key: a retry with it returns the first put's version.
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """Everything a caller may see about one stored version (decrypted metadata)."""

    id: str
    version: int
    patient: PatientRef
    kind: RecordKind
    content_type: str
    title: str
    size: int
    stored_size: int
    sha256: bytes
    created_at: datetime
    created_by: str
    supersedes_version: int | None


@dataclass(frozen=True, slots=True)
class RecordQuery:
    """A page of ListRecords."""

    patient: PatientRef
    kind: RecordKind | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    page_size: int = 50
    page_token: str = ""
    all_versions: bool = False
    # Filters on the record index (storage.index); None matches any record. Dates are
    # YYYYMMDD, inclusive, compared with the record's clinical date.
    document_code: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    modality: str | None = None
    observation_code: str | None = None
    date_from: str | None = None
    date_to: str | None = None


@dataclass(frozen=True, slots=True)
class StudySummary:
    """One imaging study of a patient, as its indexed instances describe it."""

    study_uid: str
    study_date: str  # YYYYMMDD, or "" when the instances give none
    modalities: tuple[str, ...]
    series_count: int
    instance_count: int
