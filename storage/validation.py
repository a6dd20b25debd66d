"""Checks on a record header before anything is stored. Errors name the field."""

from __future__ import annotations

import re

from storage.errors import InvalidRecordError
from storage.model import NewRecord, PatientRef

MAX_ID_LENGTH = 128
MAX_TITLE_LENGTH = 1024
# RFC 6838 type/subtype with optional parameters; enough to reject garbage and injection.
# Only spaces around ";" and no control character inside quotes: a content type is shown
# in tables and exports, where a newline or CR would forge a line. "\Z", not "$", which
# also matches before a final newline (so do the other patterns of this package).
_CONTENT_TYPE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
    r"( *; *[A-Za-z0-9!#$&^_.+-]+=(\"[^\"\x00-\x1f\x7f]*\"|[A-Za-z0-9!#$&^_.+-]+))*\Z"
)
_RECORD_ID = re.compile(r"^[0-9a-f]{32}\Z")
# Idempotency keys: long enough to be chosen at random (a UUID is 36), nothing that
# needs escaping anywhere (logs, SQL, audit exports).
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{16,64}\Z")


def check_printable(field: str, value: str, limit: int, *, required: bool) -> None:
    if required and not value.strip():
        raise InvalidRecordError(field, "is required")
    if len(value) > limit:
        raise InvalidRecordError(field, f"longer than {limit} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidRecordError(field, "contains control characters")


def check_record_id(field: str, value: str) -> None:
    """A record id is 32 lowercase hex digits."""
    if not _RECORD_ID.match(value):
        raise InvalidRecordError(field, "is not a record id (32 lowercase hex digits)")


def check_header_patient(patient: PatientRef) -> None:
    """A patient identifier and its authority are required, printable and bounded."""
    check_printable("patient.id", patient.id, MAX_ID_LENGTH, required=True)
    check_printable("patient.assigning_authority", patient.authority, MAX_ID_LENGTH, required=True)


def check_header(header: NewRecord) -> None:
    """Reject a header that cannot be stored, naming the field and the problem."""
    check_header_patient(header.patient)
    if not _CONTENT_TYPE.match(header.content_type):
        raise InvalidRecordError("content_type", "is not a MIME type such as application/pdf")
    check_printable("title", header.title, MAX_TITLE_LENGTH, required=False)
    if header.supersedes is not None:
        check_record_id("supersedes", header.supersedes)
    if header.supersedes_version is not None and header.supersedes is None:
        raise InvalidRecordError("supersedes_version", "is set without supersedes")
    if header.expected_sha256 is not None and len(header.expected_sha256) != 32:
        raise InvalidRecordError("expected_sha256", "must be 32 bytes (a SHA-256 digest)")
    if header.request_id is not None and not _REQUEST_ID.match(header.request_id):
        raise InvalidRecordError(
            "request_id", "must be 16 to 64 characters of A-Z a-z 0-9 . _ - (e.g. a UUID)"
        )
