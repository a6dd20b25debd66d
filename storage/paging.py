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


def encode_page_token(row: StoredRecord) -> str:
    """Token that resumes the listing after ``row``."""
    body = json.dumps([row.created_at.isoformat(), row.id, row.version]).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def decode_page_token(token: str) -> ListCursor | None:
    """The cursor in ``token``; ``None`` for the first page."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        created_at, record_id, version = json.loads(base64.urlsafe_b64decode(padded))
        cursor = ListCursor(datetime.fromisoformat(created_at), str(record_id), int(version))
    except (ValueError, TypeError, binascii.Error) as e:
        raise InvalidRecordError("page_token", "is not a token this service issued") from e
    if cursor.created_at.tzinfo is None:
        raise InvalidRecordError("page_token", "is not a token this service issued")
    return cursor
