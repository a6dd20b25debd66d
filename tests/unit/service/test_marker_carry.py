"""``MarkerCarry.check_revoked``: a restore's revoked grants held against the old markers.

The backup's revoked grants each had a marker at the deployment backed up (written
before the row committed, or at start for older rows). None of them there: the markers
are looked for in the wrong place, refused. Some of them: the right place; the missing
ones are written from their rows. Rows the token did not MAC count for nothing.
Fakes for the stores and the token's HMAC; the real ones in
tests/integration/backup/test_restore_revocations.py.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

import pytest

from service.write_once import MarkerCarry
from storage.grant_revocations import Marker, RevocationMarkerError
from storage.grant_seal import GrantSealer
from storage.grants_model import Grant

A, B, C = "a" * 32, "b" * 32, "c" * 32
REVOKED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class FakeIndexer:
    """The token's index key as a fixed HMAC key."""

    def __init__(self, key: bytes = b"k" * 32) -> None:
        self._key = key

    def blind_index(self, value: bytes) -> bytes:
        return hmac.new(self._key, value, hashlib.sha256).digest()


class FakeMarkers:
    def __init__(self, where: str, markers: list[Marker] | None = None) -> None:
        self.where = where
        self.markers = list(markers or [])

    def put(self, grant_id: str, revoked_at: datetime) -> None:
        self.markers.append(Marker(grant_id, revoked_at))

    def list(self, after: datetime | None) -> list[Marker]:
        return list(self.markers)

    def describe(self) -> str:
        return self.where


def _row(grant_id: str, sealer: GrantSealer, revoked: bool = True) -> dict[str, Any]:
    """An authentic row (revoked unless told) as a snapshot holds it (synthetic values)."""
    revoked_at = REVOKED if revoked else None
    grant = Grant(
        id=grant_id, patient_index=b"p" * 32, principal="phys-1", granted_by="clerk-1",
        created_at=datetime(2026, 1, 1, tzinfo=UTC), expires_at=None, revoked_at=revoked_at,
        revoked_by="clerk-1" if revoked else None, break_glass=False, reason=None,
        reviewed_at=None, reviewed_by=None, review_comment=None,
    )  # fmt: skip
    return {
        "id": grant.id, "patient_index": grant.patient_index, "principal": grant.principal,
        "granted_by": grant.granted_by, "created_at": grant.created_at, "expires_at": None,
        "revoked_at": revoked_at, "revoked_by": grant.revoked_by, "break_glass": False,
        "reason": None,
        "reviewed_at": None, "reviewed_by": None, "review_comment": None,
        "mac": sealer.mac(grant, None), "sealed_reason": None, "sealed_comment": None,
    }  # fmt: skip


def _carry(old: list[Marker]) -> tuple[MarkerCarry, FakeMarkers]:
    new = FakeMarkers("s3://new/")
    carry = MarkerCarry(FakeMarkers("s3://wrong/", old), new, "--markers-from x.toml")  # type: ignore[arg-type]
    return carry, new


def test_revoked_grants_none_of_which_has_a_marker_are_refused() -> None:
    sealer = GrantSealer(FakeIndexer())
    carry, new = _carry([Marker(C, REVOKED)])  # another grant's marker only
    with pytest.raises(RevocationMarkerError) as refused:
        carry.check_revoked([_row(A, sealer), _row(B, sealer)], sealer)
    message = str(refused.value)
    assert "2 revoked grant(s)" in message
    assert "s3://wrong/, from --markers-from x.toml" in message
    assert "--without-revocation-markers" in message
    assert not new.markers


def test_a_marker_missing_beside_one_found_is_written_from_its_row() -> None:
    sealer = GrantSealer(FakeIndexer())
    carry, new = _carry([Marker(A, REVOKED)])
    carry.check_revoked([_row(A, sealer), _row(B, sealer)], sealer)
    carry.copy(frozenset({A, B}))
    assert sorted(new.markers, key=lambda m: m.grant_id) == [
        Marker(A, REVOKED), Marker(B, REVOKED),
    ]  # fmt: skip
    assert (carry.found, carry.written, carry.remarked) == (1, 1, 1)
    assert "1 revoked grant(s) of the backup had no marker there" in carry.describe()
    carry.copy(frozenset({A, B}))  # run again (--force): nothing written twice
    assert len(new.markers) == 2


def test_rows_the_token_did_not_mac_neither_refuse_nor_become_markers() -> None:
    """A database writer's revoked rows (a MAC of another key) grant nothing: they must
    not block a restore nor be written as locked objects."""
    forged = [_row(A, GrantSealer(FakeIndexer(b"x" * 32)))]
    sealer = GrantSealer(FakeIndexer())
    carry, new = _carry([])
    carry.check_revoked(forged, sealer)
    carry.copy(frozenset({A}))
    assert not new.markers
    assert "had no marker" not in carry.describe()


def test_a_marker_only_of_a_grant_revoked_after_the_backup_is_the_right_place() -> None:
    """The backup's one revoked grant has no marker there (revoked by a release before
    the markers), but a grant active in the backup was revoked after it, and its marker
    is there: that is the deployment's place. Refusing left no way to restore at all
    (``--without-revocation-markers`` is refused while a marker can be read)."""
    sealer = GrantSealer(FakeIndexer())
    later = datetime(2026, 4, 1, tzinfo=UTC)
    carry, new = _carry([Marker(B, later)])
    carry.check()
    carry.check_revoked([_row(A, sealer), _row(B, sealer, revoked=False)], sealer)
    carry.copy(frozenset({A, B}))
    assert sorted(new.markers, key=lambda m: m.grant_id) == [
        Marker(A, REVOKED), Marker(B, later),
    ]  # fmt: skip
    assert carry.marked == {B}


def test_a_forged_row_naming_a_marker_of_the_wrong_place_does_not_pass_it() -> None:
    """A database writer chooses a forged row's id: one naming a marker of the wrong
    place must not make it look like the right one (only rows the token MAC'd count)."""
    sealer = GrantSealer(FakeIndexer())
    forged = _row(C, GrantSealer(FakeIndexer(b"x" * 32)))
    carry, new = _carry([Marker(C, REVOKED)])  # another deployment's marker
    with pytest.raises(RevocationMarkerError) as refused:
        carry.check_revoked([_row(A, sealer), forged], sealer)
    assert "1 revoked grant(s)" in str(refused.value)
    assert not new.markers
