"""Fuzz targets: the content validators (``storage.formats``), one per record kind.

The validator is called directly (``feed`` per chunk, ``finish``), not through
``storage.formats.checked``: ``checked`` turns any exception into a refusal as a last
line of defence, so a parser error reaching it is a gap the fuzzer should name.
Documented outcomes: accepted, or ``InvalidRecordError`` on field ``content`` whose
text does not quote the input; the same verdict whole and in chunks.
"""

from __future__ import annotations

from storage.errors import InvalidRecordError
from storage.formats import validator_for
from storage.model import PatientRef, RecordKind
from tests import content
from tests.fuzz.chunks import cuts

PATIENT = PatientRef("T0417", "urn:oid:2.999.42.1")


def verdict(kind: RecordKind, pieces: list[bytes]) -> str:
    """``"accepted"`` or the refusal's problem; any other exception is a finding."""
    validator = validator_for(kind, PATIENT)
    try:
        for piece in pieces:
            validator.feed(piece)
        validator.finish()
    except InvalidRecordError as e:
        if e.field != "content":
            raise AssertionError(f"refusal names field {e.field!r}, not content") from e
        return e.problem
    return "accepted"


def check(kind: RecordKind, data: bytes) -> None:
    """One input whole and in chunks: documented outcomes, one verdict."""
    whole = verdict(kind, [data])
    pieces = verdict(kind, cuts(data))
    if (whole == "accepted") != (pieces == "accepted"):
        raise AssertionError(f"verdict depends on the chunking: {whole!r} / {pieces!r}")
    if PATIENT.id in whole + pieces:
        raise AssertionError("a refusal quoted the content")


def seeds(kind: RecordKind) -> list[bytes]:
    """A valid record of ``kind`` for the patient, and its first half."""
    valid = content.content(kind.value, PATIENT.id, PATIENT.authority)
    return [valid, valid[: len(valid) // 2]]


def seeds_dicom() -> list[bytes]:
    """Seeds of the dicom target."""
    return seeds(RecordKind.DICOM)


def seeds_hl7v2() -> list[bytes]:
    """Seeds of the hl7v2 target."""
    return seeds(RecordKind.HL7V2)


def seeds_cda() -> list[bytes]:
    """Seeds of the cda target."""
    return seeds(RecordKind.CDA)


def seeds_fhir() -> list[bytes]:
    """Seeds of the fhir target."""
    return seeds(RecordKind.FHIR)


def seeds_pdf() -> list[bytes]:
    """Seeds of the pdf target."""
    return seeds(RecordKind.PDF)


def dicom(data: bytes) -> None:
    """DICOM Part 10 (pydicom, then the tail walker)."""
    check(RecordKind.DICOM, data)


def hl7v2(data: bytes) -> None:
    """HL7 v2 ER7."""
    check(RecordKind.HL7V2, data)


def cda(data: bytes) -> None:
    """CDA R2 XML (lxml's pull parser)."""
    check(RecordKind.CDA, data)


def fhir(data: bytes) -> None:
    """FHIR JSON."""
    check(RecordKind.FHIR, data)


def pdf(data: bytes) -> None:
    """PDF."""
    check(RecordKind.PDF, data)
