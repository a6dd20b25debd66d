"""Revocation markers: a record of every grant revocation that the database cannot undo.

A grant row's MAC (``storage.grant_seal``) does not cover ``revoked_at``, and no MAC
over a row can stop a database writer from putting the row back to an earlier
authentic state: clearing ``revoked_at``, or restoring the whole pre-revocation row
with its MAC (or the whole database, from an older backup). So each revocation first
writes a marker outside the database, then commits the row with its audit event:

* ``S3RevocationMarkers``: one object per revoked grant in the audit witness bucket
  (``storage.audit_witness``: S3 Object Lock, COMPLIANCE by default, so nobody can
  delete or shorten it before its retention ends), or in the record bucket when no
  witness bucket is configured (then only a database writer is kept out, not someone
  holding the S3 credentials). Key: ``grant-revocations/<deployment>/<revoked at, UTC,
  %Y%m%dT%H%M%S%fZ>-<grant id>``; the key says everything the check needs, so a
  listing (versions included: a DELETE on a locked bucket only adds a delete marker)
  is all a replica reads. The body is one line of JSON, for people.
* ``RevokedGrants``: the grant check's in-memory view of the markers, loaded in full at
  start, refreshed every ``refresh_seconds`` by a thread (a listing of the markers
  dated after the newest one seen less ``SKEW``, and in full every ``FULL_EVERY``
  refreshes), and told at once of the revocations this process makes. The grant check
  asks it a dictionary lookup: no SQL, no S3 on the read path. Once it has not been
  refreshed for ``stale_seconds`` (S3 unreachable), the check fails closed
  (``RevocationsStaleError``: UNAVAILABLE) rather than trust a row it cannot check.

A marker written by someone holding the bucket's credentials can only take access
away, as deleting objects can: a marker is honoured without a MAC. A marker written for
a revocation whose commit then failed revokes the grant too (the revoker asked for it;
the row, saying active, is then reported as rolled back until the revocation is
retried). Markers hold grant ids and times: no patient data.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol

from minio import Minio

from storage.audit_witness import LockedBucket
from storage.errors import BackendUnavailableError, StorageError
from storage.grant_rows import GrantRow, is_grant_id, read_grant_row
from storage.s3_blobs import VENDOR_ERRORS

if TYPE_CHECKING:
    from sqlalchemy.engine import Row

    from storage.grant_seal import GrantSealer

log = logging.getLogger(__name__)

MARKER_FORMAT: Final = "medvault.grant.revocation.v1"
KEY_PREFIX: Final = "grant-revocations/"
_TIME: Final = "%Y%m%dT%H%M%S%fZ"
_PAST_YEAR: Final = "%m%dT%H%M%S%fZ"  # _TIME after its year
_KEY = re.compile(r"(\d{8}T\d{12}Z)-([0-9a-f]{32})")
# Replicas' clocks differ, and a marker becomes visible some time after its key's time:
# an incremental listing starts this far before the newest marker seen.
SKEW: Final = timedelta(minutes=5)
# Every this many refreshes, a full listing (a marker dated further back than SKEW).
FULL_EVERY: Final = 30


class RevocationMarkerError(BackendUnavailableError):
    """A revocation marker could not be written or the markers could not be listed."""


class RevocationsStaleError(BackendUnavailableError):
    """The markers have not been refreshed for too long to check a grant against them."""


@dataclass(frozen=True, slots=True)
class Marker:
    """A revocation marker as its key names it."""

    grant_id: str
    revoked_at: datetime


class MarkerStore(Protocol):
    """A place outside the database that keeps one marker per revoked grant."""

    def put(self, grant_id: str, revoked_at: datetime) -> None:
        """Keep a marker; ``RevocationMarkerError`` if it could not be written."""
        ...

    def list(self, after: datetime | None) -> list[Marker]:
        """The markers dated after ``after`` (all if None)."""
        ...


class RevocationCheck(Protocol):
    """What the grant store asks of the markers (``RevokedGrants``)."""

    def revoked_at(self, grant_id: str) -> datetime | None:
        """When the grant was revoked, if a marker says it was."""
        ...

    def record(self, grant_id: str, revoked_at: datetime) -> None:
        """Write the grant's marker (before its revocation commits)."""
        ...


def marker_key(prefix: str, grant_id: str, revoked_at: datetime) -> str:
    """The object key of a marker under ``prefix``."""
    return f"{prefix}{_stamp(revoked_at)}-{grant_id}"


def _stamp(when: datetime) -> str:
    """``when`` in UTC as a key spells it (``_TIME``), the year in four digits (strftime
    writes year 5 as "5" on glibc, which would sort after every other key)."""
    utc = when.astimezone(UTC)
    return f"{utc.year:04d}{utc.strftime(_PAST_YEAR)}"


def parse_marker(key: str, prefix: str) -> Marker | None:
    """The marker a key names; None for a key that is not one."""
    match = _KEY.fullmatch(key.removeprefix(prefix)) if key.startswith(prefix) else None
    if match is None:
        return None
    try:
        revoked_at = datetime.strptime(match[1], _TIME).replace(tzinfo=UTC)
    except ValueError:
        return None
    return Marker(match[2], revoked_at)


def copy_markers(
    source: MarkerStore, destination: MarkerStore, grant_ids: Collection[str] | None = None
) -> tuple[int, int, int]:
    """Write under ``destination`` every marker of ``source`` naming one of ``grant_ids``
    (all if None) it lacks, with the same grant id and time; (markers of those grants in
    ``source``, markers written, markers naming another grant, left behind). A restore
    under another record bucket's name carries the old name's markers of the backup's
    grants over with this (the markers are keyed by the record bucket's name; one naming
    no restored grant revokes nothing there, and someone who may write the old bucket
    could add any number: cold review 11d). ``RevocationMarkerError`` when either cannot
    be listed or a marker cannot be written; writing again after a failure skips what is
    there."""
    listed = {(m.grant_id, m.revoked_at) for m in source.list(None)}
    found = {m for m in listed if grant_ids is None or m[0] in grant_ids}
    present = {(m.grant_id, m.revoked_at) for m in destination.list(None)}
    missing = sorted(found - present, key=lambda m: (m[1], m[0]))
    for grant_id, revoked_at in missing:
        destination.put(grant_id, revoked_at)
    return len(found), len(missing), len(listed) - len(found)


def revoked_row_markers(
    rows: Iterable[Row[Any] | Mapping[str, Any]], sealer: GrantSealer, now: datetime
) -> list[Marker]:
    """The marker each authentic revoked grant row calls for, once per grant, dated as
    the row says but never after ``now``: what ``SqlGrantStore.mark_revoked_rows`` writes
    at start, and what ``medvault restore`` writes for a snapshot's revoked grant whose
    marker the old deployment lacks (``service.write_once.MarkerCarry``). A row not
    revoked, with an id of another form, a malformed authenticated column or a MAC the
    token did not make is passed over: it grants nothing already, and a database
    writer's rows must never become locked objects (cold review 11d). One token
    operation per row (its MAC): give it only the rows whose marker is missing."""
    markers: dict[str, Marker] = {}
    for row in rows:
        read = read_grant_row(row)
        grant = read.grant
        if grant.revoked_at is None or grant.id in markers or not _authentic(read, sealer):
            continue
        markers[grant.id] = Marker(grant.id, min(grant.revoked_at, now))
    return list(markers.values())


def authentic_grant_row(row: Row[Any] | Mapping[str, Any], sealer: GrantSealer) -> bool:
    """Whether ``row`` is a grant row the service wrote: an id of the service's form,
    well-formed authenticated columns and the token's MAC over them (one token operation).
    Its id then cannot have been chosen by a database writer."""
    return _authentic(read_grant_row(row), sealer)


def _authentic(read: GrantRow, sealer: GrantSealer) -> bool:
    grant = read.grant
    return (not read.forged and is_grant_id(grant.id)
            and sealer.authentic(grant, read.sealed_reason, read.mac))  # fmt: skip


def _window_start(newest: datetime | None) -> datetime | None:
    """Where an incremental listing starts: ``SKEW`` before the newest marker seen, never
    past now (a marker dated ahead of this clock); None (a full listing) when there is
    none, or when a marker's date leaves no room for ``SKEW`` (a key dated 0001-01-01,
    which someone who may write the bucket can add: cold review 11b)."""
    if newest is None:
        return None
    try:
        return min(newest, datetime.now(UTC)) - SKEW
    except OverflowError:
        return None


class S3RevocationMarkers:
    """Markers as objects in a (locked) bucket; see the module docstring."""

    def __init__(self, client: Minio, target: LockedBucket, bucket: str, deployment: str) -> None:
        if not deployment or "/" in deployment:
            raise ValueError("the deployment name must be one path segment")
        self._client = client
        self._target = target
        self._bucket = bucket
        self._prefix = f"{KEY_PREFIX}{deployment}/"

    def put(self, grant_id: str, revoked_at: datetime) -> None:
        """Write the marker, with the bucket's retention when it locks."""
        body = {"format": MARKER_FORMAT, "grant_id": grant_id,
                "revoked_at": revoked_at.astimezone(UTC).isoformat()}  # fmt: skip
        data = json.dumps(body, sort_keys=True).encode() + b"\n"
        try:
            self._target.put(marker_key(self._prefix, grant_id, revoked_at), [data])
        except (StorageError, *VENDOR_ERRORS) as e:
            raise RevocationMarkerError(
                f"could not write the revocation marker to {self.describe()}; the grant "
                "is not revoked: try again"
            ) from e

    def list(self, after: datetime | None) -> list[Marker]:
        """One listing (versions included) of the markers dated after ``after``."""
        start = None if after is None else f"{self._prefix}{_stamp(after)}"
        try:
            keys = {o.object_name for o in self._client.list_objects(
                self._bucket, prefix=self._prefix, recursive=True, include_version=True,
                start_after=start,
            )}  # fmt: skip
        except VENDOR_ERRORS as e:
            raise RevocationMarkerError(f"could not list {self.describe()}") from e
        found = (parse_marker(k, self._prefix) for k in keys if k is not None)
        return [m for m in found if m is not None]

    def describe(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self._bucket}/{self._prefix}"


class RevokedGrants:
    """The revoked grant ids the markers name, in memory (see the module docstring)."""

    def __init__(
        self,
        markers: MarkerStore,
        refresh_seconds: float,
        stale_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < refresh_seconds <= stale_seconds:
            raise ValueError("need 0 < refresh_seconds <= stale_seconds")
        self._markers = markers
        self._refresh_seconds = refresh_seconds
        self._stale_seconds = stale_seconds
        self._clock = clock
        self._revoked: dict[str, datetime] = {}
        self._newest: datetime | None = None
        self._fresh_at = float("-inf")
        self._refreshes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def revoked_at(self, grant_id: str) -> datetime | None:
        """When a marker says the grant was revoked; ``RevocationsStaleError`` when the
        markers are too old to tell (on every read's path: one lookup)."""
        age = self._clock() - self._fresh_at
        if age > self._stale_seconds:
            raise RevocationsStaleError(
                "grant revocations could not be refreshed from the object store for "
                f"{self._stale_seconds:.0f} s; access checks are refused until they are"
            )
        return self._revoked.get(grant_id)

    def record(self, grant_id: str, revoked_at: datetime) -> None:
        """Write the grant's marker, then count it here (it takes effect at once). Not
        again for a grant this process knows a marker of (a revocation refused as made
        already would otherwise add a locked object each time: cold review 11b)."""
        with self._lock:
            if grant_id in self._revoked:
                return
        self._markers.put(grant_id, revoked_at)
        self._add([Marker(grant_id, revoked_at)])

    def refresh(self, *, full: bool = False) -> int:
        """Read the markers (all, or those past the newest seen less ``SKEW``); how many
        were new. ``RevocationMarkerError`` when they cannot be listed."""
        started = self._clock()
        after = None if full else _window_start(self._newest)
        added = self._add(self._markers.list(after))
        with self._lock:
            self._fresh_at = max(self._fresh_at, started)
        return added

    def _add(self, markers: list[Marker]) -> int:
        added = 0
        with self._lock:
            for marker in markers:
                known = self._revoked.get(marker.grant_id)
                if known is None or marker.revoked_at < known:
                    added += known is None
                    self._revoked[marker.grant_id] = marker.revoked_at
                if self._newest is None or marker.revoked_at > self._newest:
                    self._newest = marker.revoked_at
        return added

    def start(self) -> None:
        """Load every marker (``RevocationMarkerError`` if they cannot be read), then
        refresh them in a thread until ``stop``."""
        self.refresh(full=True)
        self._thread = threading.Thread(target=self._run, name="grant-revocations", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._refresh_seconds):
            self._refreshes += 1
            try:
                self.refresh(full=self._refreshes % FULL_EVERY == 0)
            except StorageError as e:
                log.warning("grant revocations not refreshed: %s", e)
            except Exception:  # a thread that dies would leave every check stale for good
                log.exception("grant revocations not refreshed: unexpected error")

    def stop(self) -> None:
        """End the refresh thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
