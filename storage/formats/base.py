"""What every content validator shares: the Protocol, the refusal, the patient match.

A validator watches the plaintext of one put as it streams past (``feed`` per chunk,
``finish`` at the end) and raises ``InvalidRecordError`` to refuse it. It keeps only a
bounded prefix (or tail) and parser state, never the whole record. Refusals name the
field and the problem, never a value from the content: the content is patient data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from storage.errors import InvalidRecordError
from storage.index import IndexEntry
from storage.model import PatientRef

_OID_URN = "urn:oid:"


class ContentValidator(Protocol):
    """Checks one record's content against its claimed kind and header patient."""

    def feed(self, chunk: bytes) -> None:
        """Look at the next chunk of plaintext; raise ``InvalidRecordError`` to refuse."""
        ...

    def finish(self) -> None:
        """The stream ended: raise ``InvalidRecordError`` unless the content was valid."""
        ...

    def index(self) -> list[IndexEntry]:
        """After ``finish``: the searchable fields found (``storage.index``)."""
        ...


def refuse(problem: str) -> InvalidRecordError:
    """The error for content that is not what its header claims (field ``content``)."""
    return InvalidRecordError("content", problem)


def mismatch(content_field: str) -> InvalidRecordError:
    """The patient named by ``content_field`` is not the header's: names both, no values."""
    return refuse(
        f"{content_field} does not match header patient "
        "(patient.id + patient.assigning_authority)"
    )


def authority_key(authority: str) -> str:
    """An assigning authority in the form both sides are compared in.

    An OID is written ``urn:oid:1.2.3`` in FHIR systems and headers, but bare ``1.2.3``
    in a CDA ``@root``, an HL7 v2 HD.2 or DICOM's Universal Entity ID: the ``urn:oid:``
    prefix (any case) is dropped. Anything else is compared exactly (case matters: a
    namespace such as ``HOSP`` is an opaque code).
    """
    a = authority.strip()
    if a[: len(_OID_URN)].lower() == _OID_URN:
        return a[len(_OID_URN) :]
    return a


def same_patient(header: PatientRef, content_id: str, authorities: Iterable[str]) -> bool:
    """True if the content's identifier and one of its authority forms are the header's."""
    if content_id.strip() != header.id:
        return False
    want = authority_key(header.authority)
    return any(a and authority_key(a) == want for a in authorities)


def names_other(header: PatientRef, content_id: str, authorities: Iterable[str]) -> bool:
    """True if the content gives another identifier in the header's assigning authority.

    A list of identifiers (PID-3, a Patient's ``identifier``, a patientRole's ids) is
    one patient's; one naming the header's patient beside another patient's in the same
    authority is a record two readers would file under different patients.
    """
    want = authority_key(header.authority)
    return content_id.strip() != header.id and any(
        a and authority_key(a) == want for a in authorities
    )


class Opaque:
    """``OTHER``: bytes the store does not interpret."""

    def feed(self, chunk: bytes) -> None:
        """Nothing is checked."""

    def finish(self) -> None:
        """Nothing is checked."""

    def index(self) -> list[IndexEntry]:
        """Nothing is indexed."""
        return []
