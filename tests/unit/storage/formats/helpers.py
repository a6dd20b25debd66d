"""Running a validator over content the way the record store does."""

from __future__ import annotations

import pytest

from storage.errors import InvalidRecordError
from storage.formats import ContentValidator, checked, validator_for
from storage.model import PatientRef, RecordKind

PATIENT = PatientRef("T0417", "urn:oid:2.999.42.1")
OTHER_PATIENT = PatientRef("T0418", "urn:oid:2.999.42.1")


def run(kind: RecordKind, data: bytes, patient: PatientRef = PATIENT,
        chunk: int = 1 << 16) -> ContentValidator:
    """Stream ``data`` through a fresh validator in ``chunk``-byte pieces."""
    validator = validator_for(kind, patient)
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    for _ in checked(pieces, validator):
        pass
    return validator


def refused(kind: RecordKind, data: bytes, patient: PatientRef = PATIENT,
            chunk: int = 1 << 16) -> str:
    """The refusal's message; fails the test if the content is accepted."""
    with pytest.raises(InvalidRecordError) as caught:
        run(kind, data, patient, chunk)
    assert caught.value.field == "content", caught.value.field
    return caught.value.problem
