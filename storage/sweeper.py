"""Orphan sweeper: removes objects that no metadata row references.

An object without a row is what a crash between upload and commit leaves behind
(docs/architecture.md, write path step 6). Only objects older than a grace period are removed, so
an upload still in flight (its row not yet committed) is never touched. In the service
it runs once per interval across all replicas (``sweep_if_due``).

A committed record's object carries a tag (``S3BlobStore.mark_committed``, set by the
write path after the row commits). A tagged object without a row lost its row to a
database writer (deleted, or its ``object_key`` re-pointed): it is never deleted, and
``on_missing_row`` reports it (the service raises a ``row-tampered`` incident) so the
row can be restored from a backup. The sweep also tags the referenced objects it finds
untagged (a crash or an S3 error between commit and tag; records stored before tags
existed): all of them when ``backfill`` is None, else those modified within it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice

from storage.backup.runs import elected
from storage.errors import RecordNotFoundError
from storage.interfaces import BlobInfo, BlobStore, MetadataStore
from storage.record_types import OBJECT_PREFIX
from storage.work_ledger import WorkLedger

log = logging.getLogger(__name__)
_BATCH = 500
# Called with the key of a committed object that no row references.
MissingRow = Callable[[str], None]
# Each report is an incident (an audit event and an alert). A bucket writer can add any
# number of tagged objects: one sweep reports this many, counts the rest in one warning.
MAX_REPORTED = 100
# How long a replica that lost the sweep's election waits for the winner's claim before
# it claims the round itself (as the backup scheduler does: a stranger may hold the
# public lock key for ever). Read at each round; capped at half the interval.
LOCK_GRACE = timedelta(seconds=30)
# Told "sweep" when a round was claimed and swept without the election lock.
LockHeld = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one sweep looked at, removed, tagged, and kept for want of a row."""

    scanned: int
    removed: int
    tagged: int = 0  # referenced objects found untagged and tagged as committed
    missing_rows: int = 0  # committed objects without a row: kept, reported


def _batches(items: Iterator[BlobInfo]) -> Iterator[list[BlobInfo]]:
    while batch := list(islice(items, _BATCH)):
        yield batch


@dataclass
class _Tally:
    scanned: int = 0
    removed: int = 0
    tagged: int = 0
    missing_rows: int = 0


def sweep_orphans(
    blobs: BlobStore,
    metadata: MetadataStore,
    grace: timedelta = timedelta(hours=1),
    now: datetime | None = None,
    *,
    backfill: timedelta | None = None,
    on_missing_row: MissingRow | None = None,
) -> SweepResult:
    """Delete unreferenced, untagged objects last modified before ``now - grace``; keep
    and report tagged ones; tag referenced untagged ones (within ``backfill``, or all)."""
    at = now or datetime.now(UTC)
    cutoff, since = at - grace, (None if backfill is None else at - backfill)
    tally = _Tally()
    for batch in _batches(blobs.list(OBJECT_PREFIX)):
        tally.scanned += len(batch)
        referenced = metadata.referenced([b.key for b in batch])
        for blob in batch:
            try:
                if blob.key in referenced:
                    if since is None or blob.last_modified >= since:
                        _backfill(blobs, blob.key, tally)
                elif blob.last_modified < cutoff:
                    _orphan(blobs, blob.key, tally, on_missing_row)
            except RecordNotFoundError:
                continue  # removed meanwhile (S3 lists what existed when asked)
    if tally.missing_rows > MAX_REPORTED:
        log.warning("committed objects without a row beyond the report cap",
                    extra={"unreported": tally.missing_rows - MAX_REPORTED})  # fmt: skip
    log.info("orphan sweep", extra=vars(tally))
    return SweepResult(tally.scanned, tally.removed, tally.tagged, tally.missing_rows)


def _backfill(blobs: BlobStore, key: str, tally: _Tally) -> None:
    if not blobs.committed(key):
        blobs.mark_committed(key)
        tally.tagged += 1


def _orphan(blobs: BlobStore, key: str, tally: _Tally, on_missing_row: MissingRow | None) -> None:
    if blobs.committed(key):  # a record's object whose row is gone: never delete it
        tally.missing_rows += 1
        if tally.missing_rows <= MAX_REPORTED:
            log.warning("committed object without a row kept", extra={"object_key": key})
            if on_missing_row is not None:
                on_missing_row(key)
        return
    blobs.delete(key)
    tally.removed += 1


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def sweep_if_due(
    ledger: WorkLedger,
    blobs: BlobStore,
    metadata: MetadataStore,
    *,
    grace: timedelta,
    interval: timedelta,
    replica: str,
    now: datetime | None = None,
    backfill: timedelta | None = None,
    on_missing_row: MissingRow | None = None,
    wait: Callable[[float], bool] = _sleep,
    on_lock_held: LockHeld | None = None,
) -> SweepResult | None:
    """One replica's sweep round: sweep if nobody swept within ``interval``.

    The election lock keeps sweeps from overlapping; the ledger
    (``storage.work_ledger``, an atomic claim of MACed rows: a database writer's row
    never skips a round) keeps replicas with their own timers from each sweeping once
    per interval. A round is claimed at 90% of the interval so
    that one replica's timer, drifting slightly early, is not turned away by its own
    previous sweep. The lock's key is public: a replica that loses it waits
    ``LOCK_GRACE`` (at most half the interval; ``wait`` returns True to stop), tries it
    once more, then claims the round without it, with a warning and ``on_lock_held``
    told "sweep" when the claim is its (a lock held for ever costs each round the grace,
    never the round). None if this replica skipped the round. ``backfill`` and
    ``on_missing_row`` as in ``sweep_orphans``.
    """

    def claimed() -> bool:
        at = now or datetime.now(UTC)
        return ledger.claim("sweep", interval * 0.9, at, replica)

    def sweep() -> SweepResult:
        at = now or datetime.now(UTC)
        result = sweep_orphans(
            blobs, metadata, grace, at, backfill=backfill, on_missing_row=on_missing_row
        )
        ledger.record_done("sweep", at, replica)
        return result

    for attempt in range(2):
        with elected(ledger.engine, "sweep") as won:
            if won:
                return sweep() if claimed() else None
        if attempt == 0 and wait(min(LOCK_GRACE, interval / 2).total_seconds()):
            return None  # stopping
    # Read before this claim replaces it: a claimed round not yet done is a sweep still
    # running (a large bucket's runs past the interval, holding the lock), no stranger.
    beside = ledger.unfinished("sweep")
    if not claimed():
        return None  # another replica swept this round (the holder, or one without it)
    if beside is not None:
        log.warning(
            "orphan sweep: the election lock is held by the sweep of an earlier round, "
            "still running (claimed at %s by %s); sweeping this round beside it",
            beside[0].isoformat(), beside[1], extra={"replica": replica},
        )  # fmt: skip
        return sweep()
    log.warning(
        "orphan sweep: the election lock was held for the whole grace by a session that "
        "claimed no round (a database writer's, or a sweep longer than the interval); "
        "sweeping without the lock", extra={"replica": replica},
    )  # fmt: skip
    if on_lock_held is not None:
        try:
            on_lock_held("sweep")
        except Exception:  # the sweep matters more than the report; the log line stays
            log.exception("could not report the sweep's election lock held")
    return sweep()
