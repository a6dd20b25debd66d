"""The record store's vocabulary: its limits, the gates its callers pass, what a read
returns, and the object-key prefix and fault points of its write path.

Apart from ``storage.records`` so that the write path, the read path and the stores
that take a ``Gate`` (``storage.signatures``, ``storage.roles``) share them without
loading the whole store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from storage.model import RecordInfo

OBJECT_PREFIX = "objects/"
# The write path's named fault points, in the order a put passes them (RecordStore's
# ``fault`` seam; MEDVAULT_FAULT in service.bootstrap, docs/reliability.md).
WRITE_FAULT_POINTS = (
    "after-key-wrap",
    "after-upload",
    "before-commit",
    "during-audit-write",
    "after-commit",
)


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Configured limits of the record store."""

    max_record_size: int = 4 << 30
    segment_size: int = 1 << 20
    # Segments encrypted ahead of the upload (memory per put: this many segments).
    read_ahead_segments: int = 4


@dataclass(frozen=True, slots=True)
class RecordRef:
    """What access control sees of a record before any key or content is touched."""

    id: str | None
    version: int | None
    patient_index: bytes


# Called with the record about to be written or read; raises to refuse. The service
# checks patient scope and commits the audit event here, before any byte moves.
Gate = Callable[[RecordRef], None]
# Commits a new row: called with the record and the insert (a function of a database
# connection), it must run the insert in the same transaction as the write's audit
# event (docs/architecture.md, write path step 5), and raise what the insert raised.
CommitGate = Callable[[RecordRef, Callable[[Connection], None]], None]


def pass_gate(gate: Gate | None, ref: RecordRef) -> None:
    """Run ``gate`` on ``ref`` if there is one (it raises to refuse)."""
    if gate is not None:
        gate(ref)


@dataclass(frozen=True, slots=True)
class OpenRecord:
    """A record being read: its metadata, and plaintext that is released segment by segment
    only after each segment authenticates."""

    info: RecordInfo
    content: Iterator[bytes]


@dataclass(frozen=True, slots=True)
class StudyMember:
    """A record version indexed as an instance of a study (its series and SOP instance
    UIDs as indexed: labels, the record itself is verified when opened).

    ``patient_index`` is the row's, unverified: GetStudy skips, without opening it, a
    member whose row names a patient already refused in the call (an edited row can
    only hide itself that way), so refusing a large study costs one token operation
    per patient, not one per instance.
    """

    id: str
    version: int
    series_uid: str
    sop_uid: str
    patient_index: bytes = b""
    # Indexed labels too (the DICOM service answers C-FIND from them).
    sop_class: str = ""
    modality: str = ""
    study_date: str = ""
