"""A record listing's search fields checked and turned into index filters.

DICOM UIDs, codes and dates are checked here (errors name the field) before any query
runs; ``storage.index`` says what the index holds.
"""

from __future__ import annotations

import re
from datetime import datetime

from storage.errors import InvalidRecordError
from storage.index import (
    DATE,
    DOCUMENT_CODE,
    MAX_VALUE,
    MODALITY,
    OBSERVATION,
    SERIES_UID,
    STUDY_UID,
)
from storage.interfaces import IndexFilter
from storage.model import RecordQuery

_UID = re.compile(r"[0-9]+(\.[0-9]+)*\Z")
_DAY = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})\Z")


def check_uid(field: str, value: str) -> None:
    """A DICOM UID: digits and dots, at most 64 characters (PS3.5 9.1)."""
    if not value or len(value) > 64 or not _UID.match(value):
        raise InvalidRecordError(field, "is not a DICOM UID (digits and dots, at most 64)")


def _check_code(field: str, value: str) -> None:
    if (
        not value.strip()
        or len(value) > MAX_VALUE
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
    ):
        raise InvalidRecordError(field, f"must be 1 to {MAX_VALUE} printable characters (a code)")


def _check_day(field: str, value: str) -> str:
    """``YYYY-MM-DD`` or ``YYYYMMDD`` as ``YYYYMMDD``, a real calendar day."""
    match = _DAY.match(value)
    if match is not None:
        try:
            return datetime.strptime("".join(match.groups()), "%Y%m%d").strftime("%Y%m%d")
        except ValueError:
            pass
    raise InvalidRecordError(field, "is not a date (YYYY-MM-DD)")


def search_filters(query: RecordQuery) -> list[IndexFilter]:
    """The index filters of ``query``, each value checked (errors name the field)."""
    filters: list[IndexFilter] = []
    for name, value, fields in (
        ("document_code", query.document_code, {DOCUMENT_CODE}),
        ("modality", query.modality, {MODALITY}),
        ("observation_code", query.observation_code, {OBSERVATION}),
    ):
        if value is not None:
            _check_code(name, value)
            filters.append(IndexFilter(frozenset(fields), value=value))
    for name, value, fields in (
        ("study_uid", query.study_uid, {STUDY_UID}),
        ("series_uid", query.series_uid, {SERIES_UID}),
    ):
        if value is not None:
            check_uid(name, value)
            filters.append(IndexFilter(frozenset(fields), value=value))
    low = _check_day("date_from", query.date_from) if query.date_from is not None else None
    high = _check_day("date_to", query.date_to) if query.date_to is not None else None
    if low is not None and high is not None and low > high:
        raise InvalidRecordError("date_from", "is after date_to")
    if low is not None or high is not None:
        filters.append(IndexFilter(frozenset({DATE}), low=low, high=high))
    return filters
