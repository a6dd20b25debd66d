"""Contract tests of ``SqlGrantStore``: the same tests on SQLite and on PostgreSQL.

Every time is an explicit ``now``; nothing sleeps.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool
from storage.errors import InvalidRecordError, RecordConflictError, RecordNotFoundError
from storage.grant_seal import GrantSealer
from storage.grants import MAX_BREAK_GLASS_DURATION, SqlGrantStore, access_grants
from storage.grants_model import Grant

pytestmark = pytest.mark.integration

T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
HOUR = timedelta(hours=1)
PATIENT = bytes(range(32))
OTHER_PATIENT = bytes(32)
REASON = "synthetic: unconscious patient in ED, no care-team member reachable"


@pytest.fixture
def forged() -> list[str]:
    """Ids the store reported as failing their MAC."""
    return []


@pytest.fixture
def store(
    metadata_engine: Engine, keystore_pool: Pkcs11SessionPool, forged: list[str]
) -> SqlGrantStore:
    """A store over an empty ``access_grants`` table (rows of earlier tests deleted)."""
    with metadata_engine.begin() as connection:
        connection.execute(access_grants.delete())
    return SqlGrantStore(
        metadata_engine, GrantSealer(Pkcs11BlindIndexer(keystore_pool)), forged.append
    )


# --- care-team grants, expiry ---------------------------------------------------------


def test_grant_round_trips_and_gives_access(store: SqlGrantStore) -> None:
    made = store.grant(PATIENT, "dr.house", "clerk.cuddy", T0 + HOUR, T0)
    found = store.has_access("dr.house", PATIENT, T0)
    assert found == made
    assert found.created_at == T0
    assert found.created_at.tzinfo is not None
    assert not found.break_glass
    assert found.reason is None
    assert found.active(T0)


def test_grant_without_expiry_lasts(store: SqlGrantStore) -> None:
    store.grant(PATIENT, "dr.house", "clerk.cuddy", None, T0)
    assert store.has_access("dr.house", PATIENT, T0 + timedelta(days=3650)) is not None


def test_access_ends_at_expiry(store: SqlGrantStore) -> None:
    grant = store.grant(PATIENT, "dr.house", "clerk.cuddy", T0 + HOUR, T0)
    just_before = T0 + HOUR - timedelta(microseconds=1)
    assert store.has_access("dr.house", PATIENT, just_before) == grant
    assert store.has_access("dr.house", PATIENT, T0 + HOUR) is None
    assert not grant.active(T0 + HOUR)


def test_access_is_per_principal_and_patient(store: SqlGrantStore) -> None:
    store.grant(PATIENT, "dr.house", "clerk.cuddy", None, T0)
    assert store.has_access("dr.wilson", PATIENT, T0) is None
    assert store.has_access("dr.house", OTHER_PATIENT, T0) is None


def test_other_time_zones_are_the_same_instant(store: SqlGrantStore) -> None:
    plus2 = timezone(timedelta(hours=2))
    store.grant(PATIENT, "dr.house", "clerk.cuddy", (T0 + HOUR).astimezone(plus2), T0)
    assert store.has_access("dr.house", PATIENT, (T0 + 30 * timedelta(minutes=1))) is not None
    assert store.has_access("dr.house", PATIENT, (T0 + 2 * HOUR).astimezone(plus2)) is None


def test_care_team_grant_is_preferred_to_break_glass(store: SqlGrantStore) -> None:
    store.break_glass(PATIENT, "dr.house", REASON, HOUR, T0)
    regular = store.grant(PATIENT, "dr.house", "clerk.cuddy", None, T0 + timedelta(seconds=1))
    assert store.has_access("dr.house", PATIENT, T0 + timedelta(minutes=5)) == regular


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"expires_at": T0 - HOUR}, "expires_at"),
        ({"expires_at": T0}, "expires_at"),
        ({"expires_at": datetime(2024, 3, 2)}, "expires_at"),  # naive on purpose
        ({"now": datetime(2024, 3, 1)}, "now"),  # naive on purpose
        ({"principal": ""}, "principal"),
        ({"principal": "   "}, "principal"),
        ({"principal": "x" * 129}, "principal"),
        ({"principal": "dr.house\nforged"}, "principal"),
        ({"principal": "dr.\x1b[31mhouse"}, "principal"),
        ({"granted_by": ""}, "granted_by"),
        ({"patient_index": b"short"}, "patient_index"),
    ],
)
def test_grant_rejects_bad_input(
    store: SqlGrantStore, changes: dict[str, object], field: str
) -> None:
    args: dict[str, object] = {
        "patient_index": PATIENT,
        "principal": "dr.house",
        "granted_by": "clerk.cuddy",
        "expires_at": T0 + HOUR,
        "now": T0,
    }
    args.update(changes)
    with pytest.raises(InvalidRecordError) as caught:
        store.grant(**args)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert store.list(PATIENT, None, True, T0) == []


def test_principal_of_128_characters_is_accepted(store: SqlGrantStore) -> None:
    grant = store.grant(PATIENT, "x" * 128, "clerk.cuddy", None, T0)
    assert store.has_access("x" * 128, PATIENT, T0) == grant


# --- revoke ---------------------------------------------------------------------------


def test_revoke_ends_access(store: SqlGrantStore) -> None:
    grant = store.grant(PATIENT, "dr.house", "clerk.cuddy", None, T0)
    revoked = store.revoke(grant.id, "clerk.cuddy", T0 + HOUR)
    assert revoked.revoked_at == T0 + HOUR
    assert revoked.revoked_by == "clerk.cuddy"
    assert not revoked.active(T0 + HOUR)
    assert store.has_access("dr.house", PATIENT, T0 + 2 * HOUR) is None


def test_revoke_counts_even_on_a_lagging_clock(store: SqlGrantStore) -> None:
    grant = store.grant(PATIENT, "dr.house", "clerk.cuddy", None, T0)
    store.revoke(grant.id, "clerk.cuddy", T0 + HOUR)
    # A replica whose clock is behind the revoking one must not see the grant alive.
    assert store.has_access("dr.house", PATIENT, T0 + HOUR - timedelta(seconds=2)) is None


def test_second_revoke_conflicts(store: SqlGrantStore) -> None:
    grant = store.grant(PATIENT, "dr.house", "clerk.cuddy", None, T0)
    first = store.revoke(grant.id, "clerk.cuddy", T0 + HOUR)
    with pytest.raises(RecordConflictError):
        store.revoke(grant.id, "admin", T0 + 2 * HOUR)
    assert store.list(PATIENT, None, True, T0) == [first]


def test_revoke_leaves_other_grants(store: SqlGrantStore) -> None:
    grant = store.grant(PATIENT, "dr.house", "clerk.cuddy", None, T0)
    other = store.grant(PATIENT, "dr.wilson", "clerk.cuddy", None, T0)
    store.revoke(grant.id, "clerk.cuddy", T0 + HOUR)
    assert store.has_access("dr.wilson", PATIENT, T0 + 2 * HOUR) == other


@pytest.mark.parametrize(
    "call",
    [
        lambda s, gid: s.revoke(gid, "clerk.cuddy", T0),
        lambda s, gid: s.review(gid, "officer.sec", "looked fine", T0),
    ],
    ids=["revoke", "review"],
)
def test_unknown_grant_id_is_not_found(store: SqlGrantStore, call: object) -> None:
    with pytest.raises(RecordNotFoundError):
        call(store, "0" * 32)  # type: ignore[operator]


@pytest.mark.parametrize("grant_id", ["", "xyz", "0" * 31, "A" * 32, "0" * 32 + "'--"])
def test_malformed_grant_id_is_invalid(store: SqlGrantStore, grant_id: str) -> None:
    with pytest.raises(InvalidRecordError) as caught:
        store.revoke(grant_id, "clerk.cuddy", T0)
    assert caught.value.field == "grant_id"


# --- break-the-glass ------------------------------------------------------------------


def test_break_glass_is_time_limited_and_self_granted(store: SqlGrantStore) -> None:
    grant = store.break_glass(PATIENT, "dr.house", REASON, 2 * HOUR, T0)
    assert grant.break_glass
    assert grant.reason == REASON
    assert grant.granted_by == "dr.house"
    assert grant.expires_at == T0 + 2 * HOUR
    found = store.has_access("dr.house", PATIENT, T0 + 2 * HOUR - timedelta(seconds=1))
    # The read path never opens the sealed reason: only the review queue does.
    assert found == dataclasses.replace(grant, reason=None)
    assert store.has_access("dr.house", PATIENT, T0 + 2 * HOUR) is None


def test_break_glass_accepts_the_maximum_duration(store: SqlGrantStore) -> None:
    grant = store.break_glass(PATIENT, "dr.house", REASON, MAX_BREAK_GLASS_DURATION, T0)
    assert grant.expires_at == T0 + MAX_BREAK_GLASS_DURATION


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"reason": ""}, "reason"),
        ({"reason": " \u00a0 "}, "reason"),
        ({"reason": "x" * 1001}, "reason"),
        ({"reason": "line one\x1b[2Kforged"}, "reason"),
        ({"duration": timedelta(0)}, "duration"),
        ({"duration": -HOUR}, "duration"),
        ({"duration": MAX_BREAK_GLASS_DURATION + timedelta(seconds=1)}, "duration"),
        ({"principal": ""}, "principal"),
        ({"now": datetime(2024, 3, 1)}, "now"),  # naive on purpose
        ({"patient_index": b""}, "patient_index"),
    ],
)
def test_break_glass_rejects_bad_input(
    store: SqlGrantStore, changes: dict[str, object], field: str
) -> None:
    args: dict[str, object] = {
        "patient_index": PATIENT,
        "principal": "dr.house",
        "reason": REASON,
        "duration": HOUR,
        "now": T0,
    }
    args.update(changes)
    with pytest.raises(InvalidRecordError) as caught:
        store.break_glass(**args)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert store.break_glass_queue(include_reviewed=True) == []


def test_reason_of_1000_characters_is_accepted(store: SqlGrantStore) -> None:
    grant = store.break_glass(PATIENT, "dr.house", "r" * 1000, HOUR, T0)
    assert store.break_glass_queue(include_reviewed=False) == [grant]


def test_error_messages_do_not_carry_the_reason(store: SqlGrantStore) -> None:
    secret = "synthetic-patient-detail " * 41  # over the limit
    with pytest.raises(InvalidRecordError) as caught:
        store.break_glass(PATIENT, "dr.house", secret, HOUR, T0)
    assert "synthetic-patient-detail" not in str(caught.value)


# --- review queue ---------------------------------------------------------------------


def _three_break_glass(store: SqlGrantStore) -> list[Grant]:
    return [
        store.break_glass(PATIENT, "dr.house", REASON, HOUR, T0 + i * timedelta(minutes=1))
        for i in range(3)
    ]


def test_queue_holds_only_unreviewed_break_glass_oldest_first(store: SqlGrantStore) -> None:
    store.grant(PATIENT, "dr.house", "clerk.cuddy", None, T0)
    first, second, third = _three_break_glass(store)
    store.review(second.id, "officer.sec", "justified", T0 + HOUR)
    assert store.break_glass_queue(include_reviewed=False) == [first, third]


def test_queue_lists_unreviewed_before_reviewed(store: SqlGrantStore) -> None:
    first, second, third = _three_break_glass(store)
    reviewed = store.review(first.id, "officer.sec", "justified", T0 + HOUR)
    assert store.break_glass_queue(include_reviewed=True) == [second, third, reviewed]


def test_queue_keeps_expired_and_revoked_grants(store: SqlGrantStore) -> None:
    # Expiry or revocation does not make an emergency access any less in need of review.
    grant = store.break_glass(PATIENT, "dr.house", REASON, HOUR, T0)
    revoked = store.revoke(grant.id, "dr.house", T0 + timedelta(minutes=5))
    assert store.break_glass_queue(include_reviewed=False) == [
        dataclasses.replace(revoked, reason=REASON)
    ]


def test_review_records_reviewer_and_comment(store: SqlGrantStore) -> None:
    grant = store.break_glass(PATIENT, "dr.house", REASON, HOUR, T0)
    reviewed = store.review(grant.id, "officer.sec", "justified by ED notes", T0 + HOUR)
    assert reviewed.reviewed_at == T0 + HOUR
    assert reviewed.reviewed_by == "officer.sec"
    assert reviewed.review_comment == "justified by ED notes"
    assert reviewed.reason == REASON


def test_second_review_conflicts_and_keeps_the_first(store: SqlGrantStore) -> None:
    grant = store.break_glass(PATIENT, "dr.house", REASON, HOUR, T0)
    first = store.review(grant.id, "officer.sec", "justified", T0 + HOUR)
    with pytest.raises(RecordConflictError):
        store.review(grant.id, "officer.other", "not justified", T0 + 2 * HOUR)
    assert store.break_glass_queue(include_reviewed=True) == [first]


def test_review_of_care_team_grant_conflicts(store: SqlGrantStore) -> None:
    grant = store.grant(PATIENT, "dr.house", "clerk.cuddy", None, T0)
    with pytest.raises(RecordConflictError):
        store.review(grant.id, "officer.sec", "n/a", T0 + HOUR)
    assert store.list(PATIENT, None, True, T0)[0].reviewed_at is None


@pytest.mark.parametrize(
    ("reviewer", "comment", "field"),
    [
        ("officer.sec", "", "comment"),
        ("officer.sec", "   ", "comment"),
        ("officer.sec", "c" * 1001, "comment"),
        ("", "justified", "reviewer"),
    ],
)
def test_review_rejects_bad_input(
    store: SqlGrantStore, reviewer: str, comment: str, field: str
) -> None:
    grant = store.break_glass(PATIENT, "dr.house", REASON, HOUR, T0)
    with pytest.raises(InvalidRecordError) as caught:
        store.review(grant.id, reviewer, comment, T0 + HOUR)
    assert caught.value.field == field
    assert store.break_glass_queue(include_reviewed=False) == [grant]


# --- list -----------------------------------------------------------------------------


def test_list_filters_by_patient_principal_or_both(store: SqlGrantStore) -> None:
    a = store.grant(PATIENT, "dr.house", "clerk.cuddy", None, T0)
    b = store.grant(PATIENT, "dr.wilson", "clerk.cuddy", None, T0 + timedelta(seconds=1))
    c = store.grant(OTHER_PATIENT, "dr.house", "clerk.cuddy", None, T0 + timedelta(seconds=2))
    now = T0 + HOUR
    assert store.list(PATIENT, None, False, now) == [b, a]
    assert store.list(None, "dr.house", False, now) == [c, a]
    assert store.list(PATIENT, "dr.house", False, now) == [a]
    assert store.list(OTHER_PATIENT, "dr.wilson", False, now) == []


def test_list_hides_inactive_unless_asked(store: SqlGrantStore) -> None:
    live = store.grant(PATIENT, "dr.house", "clerk.cuddy", None, T0)
    expiring = store.grant(PATIENT, "dr.wilson", "clerk.cuddy", T0 + HOUR, T0)
    to_revoke = store.grant(PATIENT, "dr.chase", "clerk.cuddy", None, T0)
    revoked = store.revoke(to_revoke.id, "clerk.cuddy", T0 + timedelta(minutes=1))
    later = T0 + 2 * HOUR
    assert store.list(PATIENT, None, False, later) == [live]
    everything = store.list(PATIENT, None, True, later)
    assert sorted(g.id for g in everything) == sorted([live.id, expiring.id, revoked.id])


def test_list_needs_a_filter(store: SqlGrantStore) -> None:
    with pytest.raises(InvalidRecordError):
        store.list(None, None, True, T0)
