"""Orphan sweeper: removes objects that no metadata row references.

An object without a row is what a crash between upload and commit leaves behind
(DESIGN.md, write path step 6). Only objects older than a grace period are removed, so
an upload still in flight (its row not yet committed) is never touched. In the service
it runs once per interval across all replicas (``sweep_if_due``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice

from sqlalchemy.engine import Engine

from storage.backup.runs import elected
from storage.interfaces import BlobInfo, BlobStore, MetadataStore
from storage.records import OBJECT_PREFIX
from storage.work_ledger import claim_round

log = logging.getLogger(__name__)
_BATCH = 500


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one sweep looked at and removed."""

    scanned: int
    removed: int


def _batches(items: Iterator[BlobInfo]) -> Iterator[list[BlobInfo]]:
    while batch := list(islice(items, _BATCH)):
        yield batch


def sweep_orphans(
    blobs: BlobStore,
    metadata: MetadataStore,
    grace: timedelta = timedelta(hours=1),
    now: datetime | None = None,
) -> SweepResult:
    """Delete unreferenced objects last modified before ``now - grace``."""
    cutoff = (now or datetime.now(UTC)) - grace
    scanned = removed = 0
    for batch in _batches(blobs.list(OBJECT_PREFIX)):
        scanned += len(batch)
        old = [b.key for b in batch if b.last_modified < cutoff]
        referenced = metadata.referenced(old)
        for key in old:
            if key not in referenced:
                blobs.delete(key)
                removed += 1
    log.info("orphan sweep", extra={"scanned": scanned, "removed": removed})
    return SweepResult(scanned=scanned, removed=removed)


def sweep_if_due(
    engine: Engine,
    blobs: BlobStore,
    metadata: MetadataStore,
    *,
    grace: timedelta,
    interval: timedelta,
    replica: str,
    now: datetime | None = None,
) -> SweepResult | None:
    """One replica's sweep round: sweep if elected and nobody swept within ``interval``.

    The election lock keeps sweeps from overlapping; the ledger
    (``storage.work_ledger``) keeps replicas with their own timers from each sweeping
    once per interval. A round is claimed at 90% of the interval so that one replica's
    timer, drifting slightly early, is not turned away by its own previous sweep.
    None if this replica skipped the round.
    """
    with elected(engine, "sweep") as won:
        if not won:
            return None  # another replica is sweeping right now
        at = now or datetime.now(UTC)
        if not claim_round(engine, "sweep", interval * 0.9, at, replica):
            return None
        return sweep_orphans(blobs, metadata, grace, at)
