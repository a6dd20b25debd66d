"""What holds for every kind: valid content passes in any chunking, a text file claiming
the kind does not, another patient does not, and no refusal echoes content."""

from __future__ import annotations

import pytest

from storage.errors import InvalidRecordError
from storage.formats import checked, validator_for
from storage.model import PatientRef, RecordKind
from tests import content
from tests.unit.storage.formats.helpers import OTHER_PATIENT, PATIENT, refused, run

KINDS = [RecordKind.DICOM, RecordKind.HL7V2, RecordKind.CDA, RecordKind.FHIR, RecordKind.PDF]
NAMING = [k for k in KINDS if k is not RecordKind.PDF]  # a PDF names no patient
TEXT = b"Dear colleague,\nplease find the results below.\n" * 20


def valid(kind: RecordKind, patient: PatientRef = PATIENT) -> bytes:
    return content.content(kind.value, patient.id, patient.authority)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_valid_content_passes_in_any_chunking(kind: RecordKind, chunk: int) -> None:
    run(kind, valid(kind), chunk=chunk)


@pytest.mark.parametrize("kind", KINDS)
def test_a_text_file_claiming_the_kind_is_refused(kind: RecordKind) -> None:
    refused(kind, TEXT)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_content_is_refused(kind: RecordKind) -> None:
    refused(kind, b"")


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_content_is_refused(kind: RecordKind) -> None:
    data = valid(kind)
    # Cut where no format can end: DICOM and PDF mid-structure, text formats mid-PID/tag.
    if kind is RecordKind.HL7V2:
        cut = data.index(b"PID") + 5
    elif kind is RecordKind.PDF:
        cut = len(data) - 8
    else:
        cut = len(data) // 2
    refused(kind, data[:cut])


@pytest.mark.parametrize("kind", NAMING)
@pytest.mark.parametrize("other", [
    OTHER_PATIENT,                                   # another identifier
    PatientRef(PATIENT.id, "urn:oid:2.999.42.2"),    # the same identifier elsewhere
])
def test_another_patient_is_refused_naming_both_fields(
    kind: RecordKind, other: PatientRef
) -> None:
    problem = refused(kind, valid(kind, other))
    assert "does not match header patient" in problem, problem
    assert other.id not in problem, "a value is echoed"
    assert "2.999.42" not in problem, "a value is echoed"


@pytest.mark.parametrize("kind", NAMING)
def test_authority_as_urn_or_bare_oid_is_the_same(kind: RecordKind) -> None:
    bare = PatientRef(PATIENT.id, "2.999.42.1")
    run(kind, valid(kind, bare))  # content says urn:oid:… (FHIR) or bare (others)
    run(kind, valid(kind), patient=bare)


def test_other_stays_opaque() -> None:
    run(RecordKind.OTHER, TEXT + bytes(range(256)))
    run(RecordKind.OTHER, b"")


def test_every_kind_has_a_validator() -> None:
    for kind in RecordKind:
        assert validator_for(kind, PATIENT) is not None, kind


def test_an_unexpected_library_error_is_a_refusal_not_internal() -> None:
    """A validator bug or a parser raising a type it does not document (the HL7 check
    raised KeyError for a ``PIDX`` segment) must be INVALID_ARGUMENT on ``content``."""

    class Broken:
        def feed(self, chunk: bytes) -> None:
            raise KeyError(chunk[:4])  # the message would quote content

        def finish(self) -> None:
            """Not reached."""

    with pytest.raises(InvalidRecordError) as caught:
        list(checked([b"SECRET"], Broken()))
    assert caught.value.field == "content"
    assert "SECRET" not in str(caught.value)
