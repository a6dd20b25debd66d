"""Content checks per record kind: a record is what its header claims, for its patient.

``validator_for`` picks the validator of a kind from one table; ``checked`` runs the
plaintext of a put through it as the stream passes to encryption. See docs/formats.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import hl7.containers
import hl7.util

from storage.errors import InvalidRecordError
from storage.formats.base import ContentValidator, Opaque
from storage.formats.cda import CdaValidator
from storage.formats.fhir import FhirValidator
from storage.formats.hl7v2 import Hl7v2Validator
from storage.formats.pdf import PdfValidator
from storage.model import PatientRef, RecordKind

__all__ = ["ContentValidator", "checked", "validator_for"]

# The parsers' own loggers quote what they parse (pydicom a malformed value, hl7 a stray
# segment): that is patient data, and the root logger writes the service's log. Their
# records stop here; a refusal says what was wrong without them. (hl7 names its loggers
# by file path, not by module.)
for _logger in (logging.getLogger("pydicom"), hl7.util.logger, hl7.containers.logger):
    _logger.propagate = False
    _logger.addHandler(logging.NullHandler())



def _dicom(patient: PatientRef) -> ContentValidator:
    # Imported on the first DICOM record: pydicom (and the numpy it loads) is a fifth of
    # the service's start-up imports, and many deployments store no imaging.
    from storage.formats.dicom import DicomValidator  # noqa: PLC0415

    return DicomValidator(patient)


_VALIDATORS: dict[RecordKind, Callable[[PatientRef], ContentValidator]] = {
    RecordKind.HL7V2: Hl7v2Validator,
    RecordKind.CDA: CdaValidator,
    RecordKind.FHIR: FhirValidator,
    RecordKind.DICOM: _dicom,
    RecordKind.PDF: lambda _patient: PdfValidator(),  # a PDF names no patient
    RecordKind.OTHER: lambda _patient: Opaque(),
}


def validator_for(kind: RecordKind, patient: PatientRef) -> ContentValidator:
    """A fresh validator for one record of ``kind`` claimed to be ``patient``'s."""
    return _VALIDATORS[kind](patient)


def checked(chunks: Iterable[bytes], validator: ContentValidator) -> Iterator[bytes]:
    """Yield ``chunks`` unchanged after ``validator`` has seen each; ``finish`` runs
    before the stream ends, so a refusal aborts the upload before it completes."""
    for chunk in chunks:
        _guarded(validator.feed, chunk)
        yield chunk
    _guarded(validator.finish)


def _guarded(step: Callable[..., None], *args: bytes) -> None:
    """Run a validator step; a library error it did not wrap is a refusal, not INTERNAL.

    Parsers raise many types on hostile input (KeyError, RecursionError, ...); the
    message is dropped (it may quote content). MemoryError is left alone: it is the
    process's, not this record's.
    """
    try:
        step(*args)
    except InvalidRecordError:
        raise
    except MemoryError:
        raise
    except Exception as e:
        raise InvalidRecordError("content", "does not parse as the kind it claims") from e
