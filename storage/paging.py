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
from storage.model import RecordQuery
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


def first_out_of_place(
    rows: list[StoredRecord], query: RecordQuery, after: ListCursor | None
) -> StoredRecord | None:
    """The first verified row of a page that the query's SQL should not have returned
    there, or None: of another kind, outside the time window, not strictly after the
    cursor, or not strictly after the row before it (newest first).

    SQL decided on the bytes stored, the seal covers the values read: a database writer
    can make them differ (a view whose column calls ``random()``), and a page that
    returns to a row already listed would page for ever. Index filters and
    "latest versions only" are not re-checked here.
    """
    previous = after
    for row in rows:
        key = (row.created_at, row.id, row.version)
        placed = (
            (query.kind is None or row.kind == query.kind.value)
            and (query.created_after is None or row.created_at >= query.created_after)
            and (query.created_before is None or row.created_at < query.created_before)
            and (previous is None or key < (previous.created_at, previous.id, previous.version))
        )
        if not placed:
            return row
        previous = ListCursor(*key)
    return None
