"""The in-memory view of the grant revocation markers: loading, refreshing, failing closed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from storage.grant_revocations import (
    SKEW,
    Marker,
    RevocationMarkerError,
    RevocationsStaleError,
    RevokedGrants,
    copy_markers,
    marker_key,
    parse_marker,
)

PREFIX = "grant-revocations/deployment/"
A, B = "a" * 32, "b" * 32


class FakeMarkers:
    """Markers in a list; ``fail`` makes every call raise as an unreachable bucket would."""

    def __init__(self) -> None:
        self.markers: list[Marker] = []
        self.asked: list[datetime | None] = []
        self.fail = False

    def put(self, grant_id: str, revoked_at: datetime) -> None:
        if self.fail:
            raise RevocationMarkerError("unreachable")
        self.markers.append(Marker(grant_id, revoked_at))

    def list(self, after: datetime | None) -> list[Marker]:
        if self.fail:
            raise RevocationMarkerError("unreachable")
        self.asked.append(after)
        return [m for m in self.markers if after is None or m.revoked_at > after]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _revoked(markers: FakeMarkers, clock: Clock) -> RevokedGrants:
    return RevokedGrants(markers, refresh_seconds=10, stale_seconds=60, clock=clock)


def test_a_key_names_its_marker_and_nothing_else_is_one() -> None:
    when = datetime(2026, 3, 1, 12, 30, 5, 123456, tzinfo=UTC)
    assert parse_marker(marker_key(PREFIX, A, when), PREFIX) == Marker(A, when)
    for key in (f"{PREFIX}junk", f"{PREFIX}20261301T000000000000Z-{A}", f"other/{A}",
                marker_key(PREFIX, A, when) + "x", marker_key(PREFIX, "A" * 32, when)):  # fmt: skip
        assert parse_marker(key, PREFIX) is None, key


def test_a_marker_revokes_once_loaded_and_a_recorded_one_at_once() -> None:
    markers, clock = FakeMarkers(), Clock()
    when = datetime(2026, 3, 1, tzinfo=UTC)
    markers.markers.append(Marker(A, when))
    revoked = _revoked(markers, clock)
    revoked.refresh(full=True)
    assert revoked.revoked_at(A) == when
    assert revoked.revoked_at(B) is None
    revoked.record(B, when)
    assert revoked.revoked_at(B) == when
    assert Marker(B, when) in markers.markers, "not written outside the process"


def test_a_marker_that_cannot_be_written_revokes_nothing_and_raises() -> None:
    markers, clock = FakeMarkers(), Clock()
    revoked = _revoked(markers, clock)
    revoked.refresh()
    markers.fail = True
    with pytest.raises(RevocationMarkerError):
        revoked.record(A, datetime(2026, 3, 1, tzinfo=UTC))
    assert revoked.revoked_at(A) is None


def test_markers_not_refreshed_for_the_stale_bound_fail_closed() -> None:
    markers, clock = FakeMarkers(), Clock()
    revoked = _revoked(markers, clock)
    with pytest.raises(RevocationsStaleError):
        revoked.revoked_at(A)  # never loaded
    revoked.refresh()
    clock.now += 60
    assert revoked.revoked_at(A) is None
    markers.fail = True
    clock.now += 1
    with pytest.raises(RevocationMarkerError):
        revoked.refresh()
    with pytest.raises(RevocationsStaleError):
        revoked.revoked_at(A)
    markers.fail = False
    revoked.refresh()
    assert revoked.revoked_at(A) is None


def test_a_refresh_lists_from_the_newest_marker_less_the_skew_never_past_now() -> None:
    markers, clock = FakeMarkers(), Clock()
    revoked = _revoked(markers, clock)
    revoked.refresh()
    assert markers.asked == [None]
    recent = datetime.now(UTC) - timedelta(hours=1)
    markers.markers.append(Marker(A, recent))
    revoked.refresh()
    revoked.refresh()
    assert markers.asked[-1] == recent - SKEW
    # A marker dated far ahead (a skewed clock, or a bucket writer) must not make the
    # next listings skip the markers written meanwhile.
    markers.markers.append(Marker(B, datetime(2999, 1, 1, tzinfo=UTC)))
    revoked.refresh()
    revoked.refresh()
    after = markers.asked[-1]
    assert after is not None
    assert after <= datetime.now(UTC) - SKEW
    late = datetime.now(UTC) - timedelta(minutes=1)
    markers.markers.append(Marker("c" * 32, late))
    revoked.refresh()
    assert revoked.revoked_at("c" * 32) == late
    revoked.refresh(full=True)
    assert markers.asked[-1] is None


def test_the_earliest_marker_of_a_grant_is_its_revocation() -> None:
    markers, clock = FakeMarkers(), Clock()
    first = datetime(2026, 3, 1, tzinfo=UTC)
    markers.markers += [Marker(A, first + timedelta(hours=1)), Marker(A, first)]
    revoked = _revoked(markers, clock)
    revoked.refresh()
    assert revoked.revoked_at(A) == first


def test_copying_writes_each_missing_marker_once_with_its_time() -> None:
    """A restore under another record bucket's name carries the markers over (review
    11b); run again after a failure it writes only what is still missing."""
    old, new = FakeMarkers(), FakeMarkers()
    first = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    old.markers = [Marker(A, first), Marker(B, first + timedelta(days=1))]
    new.markers = [Marker(A, first)]
    assert copy_markers(old, new) == (2, 1, 0)
    assert sorted(new.markers, key=lambda m: m.grant_id) == sorted(
        old.markers, key=lambda m: m.grant_id
    )
    assert copy_markers(old, new) == (2, 0, 0)
    old.fail = True
    with pytest.raises(RevocationMarkerError):
        copy_markers(old, new)


def test_copying_leaves_markers_of_other_grants_behind() -> None:
    """Cold review 11d: only the markers of the restored snapshot's grants are carried."""
    old, new = FakeMarkers(), FakeMarkers()
    first = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    old.markers = [Marker(A, first), Marker(B, first)]
    assert copy_markers(old, new, frozenset({A})) == (1, 1, 1)
    assert new.markers == [Marker(A, first)]
