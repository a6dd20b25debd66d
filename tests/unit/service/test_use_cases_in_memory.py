"""Use cases run against in-memory fakes of their storage roles (tests/unit/fakes.py).

What these prove is the use case's own logic (who runs a slot, what is recorded and
audited, when an incident is raised); the SQL stores behind the same roles are proved by
the integration suites on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest

from service.authz.model import IncidentConfig
from service.backup.scheduler import IntervalSchedule, JobResult, ScheduledJob, Scheduler
from service.incidents import EventRecorder, IncidentDetector
from storage import RunKind, RunLedger
from tests.unit.fakes import InMemoryRunLedger, RecordedEvents, conforms

SLOT = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)


@contextmanager
def _always_elected(_kind: RunKind) -> Iterator[bool]:
    yield True


def _scheduler(ledger: RunLedger, events: RecordedEvents, job: ScheduledJob, replica: str):
    return Scheduler([job], ledger, _always_elected, events, replica=replica, clock=lambda: SLOT)


def _job(result: JobResult | Exception) -> ScheduledJob:
    def run(_slot: datetime) -> JobResult:
        if isinstance(result, Exception):
            raise result
        return result

    return ScheduledJob("backup", IntervalSchedule(3600), run)


def test_the_fakes_keep_their_roles_shape() -> None:
    assert conforms(InMemoryRunLedger, RunLedger) == []
    assert conforms(RecordedEvents, EventRecorder) == []


def test_a_slot_runs_once_across_replicas_and_is_recorded_and_audited() -> None:
    ledger, events = InMemoryRunLedger(), RecordedEvents()
    job = _job(JobResult("b-1", ok=True, detail="3 records"))
    first = _scheduler(ledger, events, job, "replica-a")
    second = _scheduler(ledger, events, job, "replica-b")

    assert first.fire(job, SLOT) == "ran"
    assert second.fire(job, SLOT) == "taken"

    [run] = ledger.list("backup")
    assert (run.replica, run.outcome, run.backup_id) == ("replica-a", "ok", "b-1")
    [event] = events.entries
    assert (event.action, event.outcome, event.resource) == ("backup.run", "allowed", "backup/b-1")
    assert event.principal == "scheduler"


def test_a_failed_run_is_recorded_failed_and_audited_as_such() -> None:
    ledger, events = InMemoryRunLedger(), RecordedEvents()
    job = _job(OSError("target unreachable"))

    assert _scheduler(ledger, events, job, "replica-a").fire(job, SLOT) == "ran"

    [run] = ledger.list()
    assert run.outcome == "failed"
    assert "target unreachable" in run.detail
    [event] = events.entries
    assert (event.action, event.outcome) == ("backup.run", "failed")


@contextmanager
def _never_elected(_kind: RunKind) -> Iterator[bool]:
    yield False  # a session that runs nothing holds the lock (its key is public)


def _unelected(ledger: RunLedger, events: RecordedEvents, job: ScheduledJob, missed: list[str]):
    return Scheduler(
        [job], ledger, _never_elected, events, replica="replica-b", clock=lambda: SLOT,
        grace=timedelta(0), on_missed=missed.append,
    )  # fmt: skip


def test_a_lock_nobody_runs_under_does_not_skip_the_slot() -> None:
    """Losing the election is no longer a slot skipped: unclaimed, it runs, reported."""
    ledger, events, missed = InMemoryRunLedger(), RecordedEvents(), []
    job = _job(JobResult("b-1", ok=True, detail=""))
    assert _unelected(ledger, events, job, missed).fire(job, SLOT) == "ran"
    [run] = ledger.list("backup")
    assert (run.replica, run.outcome) == ("replica-b", "ok")
    assert missed == ["backup-run/backup/2026-01-05T02:00:00+00:00"]
    # A slot another replica claimed is still left to it, lock or no lock.
    assert _unelected(ledger, events, job, missed).fire(job, SLOT) == "taken"
    assert len(missed) == 1


def test_a_run_of_an_earlier_slot_still_going_is_no_incident() -> None:
    ledger, events, missed = InMemoryRunLedger(), RecordedEvents(), []
    assert ledger.claim(SLOT - timedelta(hours=1), "backup", "replica-a", SLOT)
    job = _job(JobResult("b-2", ok=True, detail=""))
    assert _unelected(ledger, events, job, missed).fire(job, SLOT) == "ran"
    assert missed == []


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("threshold", [1, 3])
def test_a_burst_of_denials_raises_one_incident_per_window(threshold: int) -> None:
    events, clock = RecordedEvents(), _Clock()
    limits = IncidentConfig(denied_threshold=threshold, denied_window_seconds=60)
    detector = IncidentDetector(lambda: limits, events, clock=clock)

    for _ in range(threshold - 1):
        detector.denied("10.0.0.7")
    assert events.entries == []  # below the threshold: nothing yet
    detector.denied("10.0.0.7")
    assert [(e.action, e.resource, e.source) for e in events.entries] == [
        ("incident", "incident/denied-burst", "10.0.0.7")
    ]
    for _ in range(threshold):
        detector.denied("10.0.0.7")
    assert len(events.entries) == 1  # same window: still one

    clock.now += 61  # the window has passed
    for _ in range(threshold):
        detector.denied("10.0.0.7")
    assert len(events.entries) == 2
