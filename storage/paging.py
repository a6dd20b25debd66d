"""Opaque page tokens for ListRecords: the position after a page's last row.

The token holds only a timestamp and a record id and version (no patient data); the
patient filter is applied again on every page, so a token cannot widen a query.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from storage.errors import InvalidRecordError
from storage.interfaces import ListCursor, StoredRecord
from storage.validation import check_record_id


def encode_page_token(row: StoredRecord) -> str:
    """Token that resumes the listing after ``row``."""
    body = json.dumps([row.created_at.isoformat(), row.id, row.version]).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


# A token we issue is about 120 characters; anything far longer is not one of ours, and
# is refused before it is decoded (a deeply nested JSON body would exhaust the stack).
MAX_PAGE_TOKEN_LENGTH = 512
_MAX_VERSION = (1 << 31) - 1  # versions are SQL INTEGER columns
_NOT_OURS = "is not a token this service issued"


def decode_page_token(token: str) -> ListCursor | None:
    """The cursor in ``token``; ``None`` for the first page."""
    if not token:
        return None
    if len(token) > MAX_PAGE_TOKEN_LENGTH:
        raise InvalidRecordError("page_token", _NOT_OURS)
    try:
        padded = token + "=" * (-len(token) % 4)
        created_at, record_id, version = json.loads(base64.urlsafe_b64decode(padded))
        when = datetime.fromisoformat(created_at)
    except (ValueError, TypeError, RecursionError, binascii.Error) as e:
        raise InvalidRecordError("page_token", _NOT_OURS) from e
    # Exact types and ranges: a huge integer or a non-id must not reach the database.
    ours = (
        when.tzinfo is not None and isinstance(record_id, str)
        and type(version) is int and 0 < version <= _MAX_VERSION
    )  # fmt: skip
    if not ours:
        raise InvalidRecordError("page_token", _NOT_OURS)
    try:
        check_record_id("page_token", record_id)
    except InvalidRecordError as e:
        raise InvalidRecordError("page_token", _NOT_OURS) from e
    return ListCursor(when, record_id, version)
