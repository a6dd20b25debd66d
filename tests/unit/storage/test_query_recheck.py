"""The Python re-check of a verified row against the query SQL answered (review 9b):
``Grant.answers`` for grants, ``storage.paging.first_out_of_place`` for record pages.

SQL decides on the bytes stored, a MAC or seal covers the values Python reads; a
database writer can make them differ (a view whose column calls ``random()``, a time
respelled), on either database. The integration tests drive these through the stores.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from storage.grants_model import Grant
from storage.interfaces import ListCursor, StoredRecord
from storage.model import PatientRef, RecordKind, RecordQuery
from storage.paging import first_out_of_place

T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
HOUR = timedelta(hours=1)
PATIENT, OTHER = bytes(range(32)), bytes(32)

GRANT = Grant(
    id="0" * 32, patient_index=PATIENT, principal="dr.alice", granted_by="clerk.one",
    created_at=T0, expires_at=T0 + HOUR, revoked_at=None, revoked_by=None,
    break_glass=False, reason=None, reviewed_at=None, reviewed_by=None, review_comment=None,
)  # fmt: skip


def test_a_grant_answers_the_query_it_meets() -> None:
    assert GRANT.answers(PATIENT, "dr.alice", T0)
    assert GRANT.answers(None, "dr.alice", None)
    assert GRANT.answers(PATIENT, None, T0 + HOUR - timedelta(microseconds=1))


@pytest.mark.parametrize(
    ("patient", "principal", "now"),
    [
        (OTHER, "dr.alice", T0),  # another patient's
        (PATIENT, "dr.mallory", T0),  # another principal's
        (PATIENT, "dr.alice", T0 + HOUR),  # expired
    ],
)
def test_a_grant_does_not_answer_a_query_it_does_not_meet(
    patient: bytes, principal: str, now: datetime
) -> None:
    assert not GRANT.answers(patient, principal, now)


def test_a_revoked_grant_answers_no_query_for_active_grants() -> None:
    revoked = replace(GRANT, revoked_at=T0 + HOUR * 10, revoked_by="clerk.one")
    assert not revoked.answers(PATIENT, "dr.alice", T0)  # whatever the revocation's time
    assert revoked.answers(PATIENT, "dr.alice", None)  # listing inactive grants too


def _row(record_id: str, created_at: datetime, kind: str = "OTHER") -> StoredRecord:
    return StoredRecord(
        id=record_id, version=1, kind=kind, content_type="application/octet-stream",
        patient_index=PATIENT, sealed_meta=b"", object_key="k", kek_version=1,
        wrapped_dek=b"", size=1, stored_size=1, ciphertext_sha256=b"", segment_size=1,
        created_at=created_at, created_by="test-app", supersedes_version=None,
    )  # fmt: skip


QUERY = RecordQuery(PatientRef("SYNTH1", "urn:oid:2.999.1"), page_size=10)


def test_a_page_in_order_and_in_the_window_is_in_place() -> None:
    rows = [_row("b" * 32, T0), _row("a" * 32, T0), _row("c" * 32, T0 - HOUR)]
    assert first_out_of_place(rows, QUERY, None) is None
    after = ListCursor(T0 + HOUR, "0" * 32, 1)
    window = replace(QUERY, created_after=T0 - HOUR, created_before=T0 + HOUR)
    assert first_out_of_place(rows, window, after) is None


def test_a_row_back_at_or_before_the_cursor_is_out_of_place() -> None:
    """What made a listing page for ever: a row at or above the page token's."""
    again = _row("a" * 32, T0)
    assert first_out_of_place([again], QUERY, ListCursor(T0, "a" * 32, 1)) is again
    later = _row("b" * 32, T0 + HOUR)
    assert first_out_of_place([_row("c" * 32, T0), later], QUERY, None) is later


@pytest.mark.parametrize(
    "query",
    [
        replace(QUERY, kind=RecordKind.PDF),
        replace(QUERY, created_after=T0 + HOUR),
        replace(QUERY, created_before=T0),
    ],
)
def test_a_row_outside_the_query_is_out_of_place(query: RecordQuery) -> None:
    row = _row("a" * 32, T0)
    assert first_out_of_place([row], query, None) is row
