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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice

from sqlalchemy.engine import Engine

from storage.backup.runs import elected
from storage.errors import RecordNotFoundError
from storage.interfaces import BlobInfo, BlobStore, MetadataStore
from storage.records import OBJECT_PREFIX
from storage.work_ledger import claim_round

log = logging.getLogger(__name__)
_BATCH = 500
# Called with the key of a committed object that no row references.
MissingRow = Callable[[str], None]
# Each report is an incident (an audit event and an alert). A bucket writer can add any
# number of tagged objects: one sweep reports this many, counts the rest in one warning.
MAX_REPORTED = 100


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


def sweep_if_due(
    engine: Engine,
    blobs: BlobStore,
    metadata: MetadataStore,
    *,
    grace: timedelta,
    interval: timedelta,
    replica: str,
    now: datetime | None = None,
    backfill: timedelta | None = None,
    on_missing_row: MissingRow | None = None,
) -> SweepResult | None:
    """One replica's sweep round: sweep if elected and nobody swept within ``interval``.

    The election lock keeps sweeps from overlapping; the ledger
    (``storage.work_ledger``) keeps replicas with their own timers from each sweeping
    once per interval. A round is claimed at 90% of the interval so that one replica's
    timer, drifting slightly early, is not turned away by its own previous sweep.
    None if this replica skipped the round. ``backfill`` and ``on_missing_row`` as in
    ``sweep_orphans``.
    """
    with elected(engine, "sweep") as won:
        if not won:
            return None  # another replica is sweeping right now
        at = now or datetime.now(UTC)
        if not claim_round(engine, "sweep", interval * 0.9, at, replica):
            return None
        return sweep_orphans(
            blobs, metadata, grace, at, backfill=backfill, on_missing_row=on_missing_row
        )
