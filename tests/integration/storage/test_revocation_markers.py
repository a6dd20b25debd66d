"""Grant revocation markers in an Object Lock bucket on the real SeaweedFS.

What someone holding the bucket's credentials can do to a marker (a plain DELETE adds a
delete marker; deleting the locked version is refused) does not take it out of what a
replica lists; an incremental listing finds the markers past its window's start.
"""

from __future__ import annotations

import io
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from minio import Minio
from minio.commonconfig import COMPLIANCE
from minio.error import S3Error

from storage.backup.targets import S3Target
from storage.grant_revocations import RevokedGrants, S3RevocationMarkers, marker_key

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def locked(s3_server: Any) -> tuple[Minio, str]:
    client: Minio = s3_server.client()
    name = f"rev-{secrets.token_hex(6)}"
    S3Target(client, name, lock_days=1, lock_mode=COMPLIANCE).ensure_bucket()
    return client, name


def _markers(locked: tuple[Minio, str]) -> tuple[S3RevocationMarkers, str]:
    client, name = locked
    deployment = f"d-{secrets.token_hex(6)}"
    target = S3Target(client, name, lock_days=1, lock_mode=COMPLIANCE)
    return S3RevocationMarkers(client, target, name, deployment), deployment


def test_a_deleted_marker_still_revokes(locked: tuple[Minio, str]) -> None:
    client, bucket = locked
    markers, deployment = _markers(locked)
    grant_id, when = secrets.token_hex(16), datetime.now(UTC).replace(microsecond=0)
    markers.put(grant_id, when)
    key = marker_key(f"grant-revocations/{deployment}/", grant_id, when)
    version = next(iter(client.list_objects(bucket, prefix=key, include_version=True)))
    with pytest.raises(S3Error):
        client.remove_object(bucket, key, version_id=version.version_id)
    client.remove_object(bucket, key)  # only hides it behind a delete marker
    revoked = RevokedGrants(markers, refresh_seconds=1, stale_seconds=60)
    revoked.refresh(full=True)
    assert revoked.revoked_at(grant_id) == when


def test_an_incremental_listing_finds_markers_past_its_window(locked: tuple[Minio, str]) -> None:
    markers, _deployment = _markers(locked)
    old, recent = secrets.token_hex(16), secrets.token_hex(16)
    now = datetime.now(UTC)
    markers.put(old, now - timedelta(days=2))
    revoked = RevokedGrants(markers, refresh_seconds=1, stale_seconds=60)
    revoked.refresh(full=True)
    markers.put(recent, now)
    assert {m.grant_id for m in markers.list(now - timedelta(days=1))} == {recent}
    assert revoked.refresh() == 1
    assert revoked.revoked_at(recent) is not None
    assert revoked.revoked_at(old) is not None


def _put_key(locked: tuple[Minio, str], key: str) -> None:
    """What someone who may write the bucket (not delete locked versions) adds."""
    client, bucket = locked
    client.put_object(bucket, key, io.BytesIO(b"{}\n"), 3)


def test_a_forged_marker_of_year_one_does_not_stop_the_refresh(locked: tuple[Minio, str]) -> None:
    """Cold review 11b: on a deployment without revocations yet, a key dated 0001-01-01
    was the newest marker; the incremental window (newest less SKEW) overflowed, the
    refresh thread died (only StorageError was caught) and every patient-scoped check
    failed closed for good (UNAVAILABLE), the key being locked for years."""
    markers, deployment = _markers(locked)
    forged = secrets.token_hex(16)
    _put_key(locked, f"grant-revocations/{deployment}/00010101T000000000000Z-{forged}")
    # Stale after 25 refresh periods: a slow host's listing may take most of a second; a
    # dead refresh thread is still stale well before the 20 s below.
    revoked = RevokedGrants(markers, refresh_seconds=0.2, stale_seconds=5)
    revoked.start()
    try:
        assert revoked.revoked_at(forged) is not None  # it only takes access away
        later = secrets.token_hex(16)
        markers.put(later, datetime.now(UTC))  # another replica's revocation
        deadline = time.monotonic() + 20
        while revoked.revoked_at(later) is None:  # raises once stale
            assert time.monotonic() < deadline, "the refresh never found the marker"
            time.sleep(0.1)
        assert revoked.refresh() == 0
    finally:
        revoked.stop()


def test_a_forged_marker_of_year_five_does_not_hide_later_ones(locked: tuple[Minio, str]) -> None:
    """Cold review 11b: the incremental listing's start was spelt by strftime, which
    writes year 4 as "4": "grant-revocations/<d>/41231T..." sorts after every real key,
    so the listings in between full ones found no new marker."""
    markers, deployment = _markers(locked)
    _put_key(locked, f"grant-revocations/{deployment}/00050101T000000000000Z-{'e' * 32}")
    revoked = RevokedGrants(markers, refresh_seconds=1, stale_seconds=60)
    revoked.refresh(full=True)
    later = secrets.token_hex(16)
    markers.put(later, datetime.now(UTC))
    assert revoked.refresh() == 1
    assert revoked.revoked_at(later) is not None


@pytest.mark.xfail(
    strict=True,
    reason="design choice (cold review 11b): markers carry no MAC and every replica holds "
    "all it lists, so someone who may write the witness bucket (or the record bucket "
    "without one) can add markers for ids that are no grant: memory (about 250 bytes "
    "each, per process), start-up and full-refresh listing time grow with them, and in "
    "COMPLIANCE mode they cannot be removed before their retention ends (keys dated in "
    "the future are even re-listed by every incremental refresh). Bounded only by "
    "the bucket's write permission: give the witness bucket's PutObject to the service "
    "alone, and watch its object count.",
)
def test_markers_naming_no_grant_are_not_held(locked: tuple[Minio, str]) -> None:
    markers, deployment = _markers(locked)
    junk = [secrets.token_hex(16) for _ in range(20)]
    for grant_id in junk:
        _put_key(locked, marker_key(f"grant-revocations/{deployment}/", grant_id,
                                    datetime.now(UTC)))  # fmt: skip
    revoked = RevokedGrants(markers, refresh_seconds=1, stale_seconds=60)
    revoked.refresh(full=True)
    assert all(revoked.revoked_at(grant_id) is None for grant_id in junk)
