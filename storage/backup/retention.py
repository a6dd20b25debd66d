"""List complete backups and prune them by a keep-daily/weekly/monthly policy.

Selection follows borg and restic: walking the complete backups newest first (by
completed time, UTC), keep the newest backup of each of the ``keep_daily`` most recent
days that have one, likewise of the ``keep_weekly`` most recent ISO weeks and the
``keep_monthly`` most recent months; a backup kept by any rule stays. A policy that
keeps nothing is refused (fails closed): pruning never empties a target.

What is deleted, and what never is:
* a pruned backup's manifest (first: it stops being complete), signature and snapshot;
* objects no kept manifest references. An object still referenced by any kept
  manifest is never deleted. Objects of a run in progress are referenced by no
  manifest yet, so while a run is live (its marker beat within ``grace``, and never
  less than ``RUN_GRACE`` whatever grace is given; a running run beats every few
  minutes however long it runs, up to ``max_run_age``: ``storage.backup.run_markers``)
  no object is deleted at all, nor that run's snapshot or half-written manifest;
  without one, objects that no manifest references are deleted only when older than
  ``grace`` (leftovers of a run killed midway), objects that only pruned backups
  referenced at once;
* leftover snapshots, half-written manifest pairs and stale run markers older than
  ``grace``. If any manifest cannot be read, no object is deleted (its references are
  unknown).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from storage.backup import BackupError
from storage.backup.manifest import (
    MANIFESTS_PREFIX,
    OBJECTS_PREFIX,
    SNAPSHOTS_PREFIX,
    Manifest,
    backup_id_of,
    manifest_key,
    signature_key,
    snapshot_key,
)
from storage.backup.run_markers import MAX_RUN_AGE, read_markers
from storage.backup.targets import BackupTarget, TargetEntry, read_all
from storage.errors import RecordNotFoundError

DEFAULT_GRACE = timedelta(days=1)
# The least age at which a run marker is taken for a killed run's leftover, whatever
# grace a prune is given (a backup of a large store runs for hours).
RUN_GRACE = DEFAULT_GRACE


@dataclass(frozen=True, slots=True)
class BackupSummary:
    """One complete backup as ``list`` shows it."""

    id: str
    trigger: str
    created_at: datetime
    completed_at: datetime
    records: int
    objects: int
    bytes: int
    audit_events: int
    copied_objects: int
    copied_bytes: int

    @classmethod
    def of(cls, m: Manifest) -> BackupSummary:
        """The summary of manifest ``m``."""
        return cls(
            id=m.id,
            trigger=m.trigger,
            created_at=m.created_at,
            completed_at=m.completed_at,
            records=m.counts.get("records", 0),
            objects=m.counts.get("objects", 0),
            bytes=m.counts.get("bytes", 0),
            audit_events=m.counts.get("audit_events", 0),
            copied_objects=m.copied.get("objects", 0),
            copied_bytes=m.copied.get("bytes", 0),
        )


def _complete_ids(target: BackupTarget) -> tuple[list[str], dict[str, TargetEntry]]:
    """Ids with manifest and signature, and every key under manifests/ with its entry."""
    entries = {e.key: e for e in target.entries(MANIFESTS_PREFIX)}
    ids = [i for k in entries if (i := backup_id_of(k)) and signature_key(i) in entries]
    return ids, entries


def _manifests(target: BackupTarget) -> tuple[list[Manifest], list[str]]:
    """Complete backups' manifests (newest first) and the ids that could not be read."""
    ids, _ = _complete_ids(target)
    found, unreadable = [], []
    for backup_id in ids:
        try:
            found.append(Manifest.from_bytes(read_all(target, manifest_key(backup_id))))
        except (BackupError, RecordNotFoundError):
            unreadable.append(backup_id)
    found.sort(key=lambda m: (m.completed_at, m.id), reverse=True)
    return found, unreadable


def list_backups(target: BackupTarget) -> list[BackupSummary]:
    """Complete backups, newest first (signatures are checked by ``verify``, not here)."""
    return [BackupSummary.of(m) for m in _manifests(target)[0]]


def _newest_per_period(
    manifests: list[Manifest], count: int, period: Callable[[datetime], Hashable]
) -> set[str]:
    kept: set[str] = set()
    seen: set[Hashable] = set()
    for m in manifests:  # newest first
        if len(seen) >= count:
            break
        key = period(m.completed_at.astimezone(UTC))
        if key not in seen:
            seen.add(key)
            kept.add(m.id)
    return kept


def select_kept(
    manifests: list[Manifest], keep_daily: int, keep_weekly: int, keep_monthly: int
) -> set[str]:
    """Ids the policy keeps; ``manifests`` newest first."""
    if min(keep_daily, keep_weekly, keep_monthly) < 0:
        raise BackupError("retention counts must not be negative")
    if keep_daily + keep_weekly + keep_monthly == 0:
        raise BackupError("retention policy keeps nothing; refusing to prune every backup")

    def day(t: datetime) -> date:
        return t.date()

    def week(t: datetime) -> tuple[int, int]:
        iso = t.isocalendar()
        return iso.year, iso.week

    def month(t: datetime) -> tuple[int, int]:
        return t.year, t.month

    return (
        _newest_per_period(manifests, keep_daily, day)
        | _newest_per_period(manifests, keep_weekly, week)
        | _newest_per_period(manifests, keep_monthly, month)
    )


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What ``prune`` kept and removed."""

    kept: tuple[str, ...]
    removed: tuple[str, ...]
    objects_removed: int
    bytes_removed: int
    leftovers_removed: int
    objects_deferred: bool  # a run was in progress or a manifest unreadable
    # Run markers not honoured: beating past max_run_age, or dated ahead (run_markers).
    overdue_runs: tuple[str, ...] = ()


def _delete_all(target: BackupTarget, keys: Iterable[str], dry_run: bool) -> int:
    count = 0
    for key in keys:
        if not dry_run:
            target.delete(key)
        count += 1
    return count


def prune(
    target: BackupTarget,
    keep_daily: int,
    keep_weekly: int,
    keep_monthly: int,
    now: datetime | None = None,
    *,
    grace: timedelta = DEFAULT_GRACE,
    dry_run: bool = False,
    max_run_age: timedelta = MAX_RUN_AGE,
) -> PruneResult:
    """Apply the retention policy to ``target``; see the module docstring."""
    now = now or datetime.now(UTC)
    cutoff = now - grace
    manifests, unreadable = _manifests(target)
    kept = select_kept(manifests, keep_daily, keep_weekly, keep_monthly)
    pruned = [m for m in manifests if m.id not in kept]
    for m in pruned:
        if not dry_run:
            for key in (manifest_key(m.id), signature_key(m.id), snapshot_key(m.id)):
                target.delete(key)
    # A run whose marker beat within RUN_GRACE is in progress whatever the caller's
    # grace, and whatever its age (storage.backup.run_markers: it beats while it runs):
    # a shorter grace, or a run beside it, must not delete its snapshot, objects or marker.
    run_cutoff = now - max(grace, RUN_GRACE)
    markers = read_markers(target, now, run_cutoff, max_run_age)
    active = bool(markers.live)
    leftovers = _prune_leftovers(target, run_cutoff if active else cutoff, markers.live, dry_run)
    leftovers += _delete_all(target, markers.stale, dry_run)
    removed_objects, removed_bytes = 0, 0
    deferred = active or bool(unreadable)
    if not deferred:
        referenced = {o.target_key for m in manifests if m.id in kept for o in m.objects}
        released = {o.target_key for m in pruned for o in m.objects}
        for entry in target.entries(OBJECTS_PREFIX):
            if entry.key in referenced:
                continue
            if entry.key in released or entry.modified <= cutoff:
                removed_objects += _delete_all(target, [entry.key], dry_run)
                removed_bytes += entry.size
    return PruneResult(
        kept=tuple(m.id for m in manifests if m.id in kept),
        removed=tuple(m.id for m in pruned),
        objects_removed=removed_objects,
        bytes_removed=removed_bytes,
        leftovers_removed=leftovers,
        objects_deferred=deferred,
        overdue_runs=markers.overdue,
    )


def _prune_leftovers(
    target: BackupTarget, cutoff: datetime, live: frozenset[str], dry_run: bool
) -> int:
    """Old snapshots without a complete manifest, and half of a manifest pair, of no
    live run."""
    # manifests/ is listed again, after read_markers, not reused from _manifests: a run
    # that completed in between wrote its manifest before it deleted its marker, so
    # this listing sees it, and its snapshot is not taken for a leftover.
    ids, entries = _complete_ids(target)
    keep = live.union(ids)
    candidates = [*entries.values(), *target.entries(SNAPSHOTS_PREFIX)]
    stale = [e.key for e in candidates if e.modified <= cutoff and _id_part(e.key) not in keep]
    return _delete_all(target, stale, dry_run)


def _id_part(key: str) -> str:
    """The backup id in ``manifests/<id>.json`` or ``snapshots/<id>.jsonl.gz``."""
    return key.split("/", 1)[-1].split(".", 1)[0]
