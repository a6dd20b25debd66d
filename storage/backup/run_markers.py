"""Run markers: ``runs/<id>.json`` says a backup run is in progress, and keeps saying it.

A run writes its marker first and deletes it last (``storage.backup.runner``). While it
runs, a heartbeat thread writes the marker again every ``HEARTBEAT`` with the run's own
clock in ``beat_at``: a run of any length (a daily backup of a large store that runs
past the next day's slot, with that slot's run and prune beside it) keeps a fresh
marker, and ``prune`` (``storage.backup.retention``) deletes neither its snapshot, nor
its half-written manifest, nor any unreferenced object while it is live. A killed run's
marker stops beating and is pruned, with the run's leftovers, once older than the grace.

A marker's last beat is the later of its ``beat_at`` and the target's modified time.
The evidence is in the backup target, not in the metadata database: a database writer
can neither keep a run live nor make a live run's data prunable. A target writer could
delete backups outright; still, a marker that blocks pruning is bounded and visible:
* a ``beat_at`` more than ``MAX_AHEAD`` past ``now`` is not honoured (its modified time
  is), and the marker is reported;
* a run that started (the time in its id, else ``started_at``) more than ``MAX_RUN_AGE``
  before ``now``, or after it, is not taken for live whatever its beat: its leftovers
  are pruned as a killed run's, and it is reported (``overdue``: a warning here, a ``run-overdue``
  incident in the service). The runner checks its snapshot is still there before it
  writes the manifest, so such a run fails rather than completing a backup it lost.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType

from storage.backup.manifest import RUNS_PREFIX, canonical_json, run_marker_key
from storage.backup.targets import BackupTarget, TargetEntry, read_all
from storage.errors import StorageError

log = logging.getLogger(__name__)
# How often a running run writes its marker again; far below RUN_GRACE (a day), so an
# outage of the target for hours does not let a live run's marker go stale.
HEARTBEAT = timedelta(minutes=5)
# A start or beat dated further ahead than this is a forged or broken clock's, not
# honoured. Not five minutes (cold review 11c): the run's clock is not the pruner's (two
# services on one target, a prune from an operator's machine), and a run a few minutes
# ahead lost its protection and its objects, with a run-overdue incident. An hour ahead
# keeps a marker honoured at most an hour past MAX_RUN_AGE: still bounded.
MAX_AHEAD = timedelta(hours=1)
# No honest backup runs for a week; past it, a beating marker blocks pruning no longer.
MAX_RUN_AGE = timedelta(days=7)
_MAX_MARKER = 4096  # bytes of a marker read; an honest one is about 120


def marker_document(backup_id: str, started: datetime, beat: datetime) -> bytes:
    """The marker's content: the run's id, start, and last beat (the run's clock)."""
    return canonical_json(
        {"id": backup_id, "started_at": started.isoformat(), "beat_at": beat.isoformat()}
    )


class Heartbeat:
    """Writes the run's marker (``marker_document``) now, then every ``interval`` until closed."""

    def __init__(
        self, target: BackupTarget, backup_id: str, started: datetime, *,
        clock: Callable[[], datetime], interval: timedelta = HEARTBEAT,
    ) -> None:  # fmt: skip
        self._target, self._key, self._id = target, run_marker_key(backup_id), backup_id
        self._started, self._clock = started, clock
        self._interval = max(interval.total_seconds(), 0.01)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="backup-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.beat()  # the first write fails the run: without a marker, prune may take it
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:  # fmt: skip
        self._stop.set()
        self._thread.join()

    def beat(self) -> None:
        """Write the marker with the run's clock now."""
        self._target.put(self._key, [marker_document(self._id, self._started, self._clock())])

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except Exception:  # the next beat retries; a day of failures makes it stale
                log.warning("backup run marker not refreshed: %s", self._key, exc_info=True)


@dataclass(frozen=True, slots=True)
class RunMarkers:
    """What ``prune`` makes of ``runs/``: live runs' ids, stale markers' keys, and the
    ids of markers reported (beating past ``MAX_RUN_AGE``, or from the future)."""

    live: frozenset[str]
    stale: tuple[str, ...]
    overdue: tuple[str, ...]


def read_markers(
    target: BackupTarget, now: datetime, run_cutoff: datetime, max_run_age: timedelta
) -> RunMarkers:
    """Sort the markers in ``target``: live (last beat after ``run_cutoff`` and started
    within ``max_run_age``), stale (last beat at or before ``run_cutoff``), overdue."""
    live: set[str] = set()
    stale: list[str] = []
    overdue: list[str] = []
    for entry in target.entries(RUNS_PREFIX):
        run_id = entry.key[len(RUNS_PREFIX) :].removesuffix(".json")
        doc = _document(target, entry.key)
        beat, ahead = _last_beat(entry, doc, now)
        if ahead:
            _not_honoured(entry.key, "its beat_at is ahead of now; its modified time counts")
            overdue.append(run_id)
        if beat <= run_cutoff:
            stale.append(entry.key)
            continue
        started = _started(run_id, doc) or entry.modified
        if not now - max_run_age <= started <= now + MAX_AHEAD:
            _not_honoured(entry.key, f"started {started.isoformat()}, not within "
                          f"{max_run_age} before now")  # fmt: skip
            if not ahead:
                overdue.append(run_id)
            continue
        live.add(run_id)
    return RunMarkers(frozenset(live), tuple(stale), tuple(overdue))


def _not_honoured(key: str, why: str) -> None:
    log.warning("backup run marker not honoured as a live run (%s): %s", why, key)


def _document(target: BackupTarget, key: str) -> dict[str, object]:
    """The marker's JSON object; empty if it is not one (an older release wrote ``{}``
    or less; a writer anything)."""
    try:
        data = read_all(target, key, limit=_MAX_MARKER)
        doc = json.loads(data)
    # StorageError: BackupError, RecordNotFoundError too; RecursionError: JSON nested
    # thousands deep, which fits in the size cap.
    except (StorageError, ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
        return t.astimezone(UTC) if t.tzinfo else None
    except (ValueError, OverflowError):  # OverflowError: year 9999 at -23:00 and the like
        return None


def _last_beat(entry: TargetEntry, doc: dict[str, object], now: datetime) -> tuple[datetime, bool]:
    """The marker's last beat, and whether its ``beat_at`` was too far ahead to honour."""
    beat = _time(doc.get("beat_at"))
    if beat is None:
        return entry.modified, False
    if beat > now + MAX_AHEAD:
        return entry.modified, True
    return max(beat, entry.modified), False


def _started(run_id: str, doc: dict[str, object]) -> datetime | None:
    """When the run started: the time in its id (``yyyymmddThhmmssZ-...``), else the
    marker's ``started_at``."""
    try:
        return datetime.strptime(run_id.split("-", 1)[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return _time(doc.get("started_at"))
