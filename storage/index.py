"""What the record index holds: searchable fields a content validator found in a record.

A validator (``storage.formats``) returns ``IndexEntry`` values for the record it just
checked; they are written to the ``record_index`` table in the same transaction as the
record row (``storage.sql_metadata``). The patient is never an entry: every index row
carries the record's keyed blind index (``patient_index``), as the record row does.
Codes, UIDs, dates and modality are stored in clear so they can be searched (see
docs/formats.md for which and why).

The index is a search aid, not an authority: search results are the record rows it
points at, each verified against its sealed metadata and its sealed patient before it
is returned, so an edited index row can hide a record or propose one that is then
checked, never hand out another patient's record.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Field names (the ``field`` column). A filter of ListRecords matches one of them.
STUDY_UID = "study_uid"
SERIES_UID = "series_uid"
SOP_UID = "sop_uid"
SOP_CLASS = "sop_class"
MODALITY = "modality"
DATE = "date"  # the clinical date, YYYYMMDD (study, document or observation date)
DOCUMENT_CODE = "document_code"
OBSERVATION = "observation"
MESSAGE_TYPE = "message_type"
CONTROL_ID = "control_id"
RESOURCE_TYPE = "resource_type"
CODE = "code"

FIELDS = frozenset({
    STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS, MODALITY, DATE, DOCUMENT_CODE, OBSERVATION,
    MESSAGE_TYPE, CONTROL_ID, RESOURCE_TYPE, CODE,
})  # fmt: skip

# Column widths of record_index; longer values are not indexed (they are not codes).
MAX_VALUE = 128
MAX_SYSTEM = 255
MAX_DETAIL = 64
# At most this many entries per record: a message of thousands of observations is still
# stored, its first entries indexed (docs/formats.md).
MAX_ENTRIES = 1000
_DIGITS8 = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})")
# An observation's value and time are stored in clear only in these shapes: a decimal
# number; an HL7 TS (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]) or an ISO 8601 date-time.
# Anything else in those fields (an ST result, a note in OBX-14) is free text that may
# name a patient, and is not indexed (docs/formats.md).
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?\Z")
_INSTANT = re.compile(
    r"\d{4}(\d{2}){0,5}(\.\d{1,4})?([+-]\d{4})?\Z"
    r"|\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})?)?)?)?\Z"
)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One searchable value of a record: ``field`` = ``value`` (``system`` is the code
    system of a code; ``quantity``, ``unit`` and ``observed_at`` qualify an observation)."""

    field: str
    value: str
    system: str | None = None
    quantity: str | None = None
    unit: str | None = None
    observed_at: str | None = None


def entry(field: str, value: object, system: object = None, *, quantity: object = None,
          unit: object = None, observed_at: object = None) -> IndexEntry | None:
    """An entry from parsed values (stripped, bounded), or None when ``value`` is empty or
    too long to be a code. Qualifiers that are too long are dropped, not truncated."""
    text = _text(value, MAX_VALUE)
    if not text:
        return None
    return IndexEntry(
        field, text, _text(system, MAX_SYSTEM) or None, _text(quantity, MAX_DETAIL) or None,
        _text(unit, MAX_DETAIL) or None, _text(observed_at, MAX_DETAIL) or None,
    )  # fmt: skip


def number(value: object) -> str | None:
    """``value`` as text if it is a decimal number, else None (not indexed)."""
    if isinstance(value, bool):
        return None
    text = _text(value, MAX_DETAIL)
    return text if _NUMBER.match(text) else None


def instant(value: object) -> str | None:
    """``value`` as text if it is an HL7 TS or an ISO 8601 date(-time), else None."""
    text = _text(value, MAX_DETAIL)
    return text if _INSTANT.match(text) else None


def day(value: object) -> str | None:
    """``YYYYMMDD`` from a DICOM DA, HL7 TS, CDA TS or FHIR date/dateTime; None otherwise."""
    match = _DIGITS8.match(_text(value, MAX_DETAIL))
    if match is None:
        return None
    y, m, d = match.groups()
    if not ("01" <= m <= "12" and "01" <= d <= "31"):
        return None
    return y + m + d


def bounded(entries: Iterable[IndexEntry | None]) -> list[IndexEntry]:
    """Distinct entries in first-seen order, at most ``MAX_ENTRIES``."""
    seen: dict[IndexEntry, None] = {}
    for e in entries:
        if e is not None and e not in seen:
            seen[e] = None
            if len(seen) >= MAX_ENTRIES:
                break
    return list(seen)


def _text(value: object, limit: int) -> str:
    if value is None:
        return ""
    text = str(value).strip()
    if len(text) > limit or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return ""
    return text
