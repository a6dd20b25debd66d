"""Scheduled backups and drills inside the service, run once per slot by one replica.

Every replica runs a ``Scheduler`` thread. Each computes the same slots (UTC) from the
same schedule; at a slot, the replicas race for the election lock, and the winner
claims the slot in ``backup_runs`` before it starts (``storage.backup.runs`` explains
why both are needed). The losers skip that slot and wait for the next one. Slots that
pass while a run is still going are skipped, not queued: the next run covers them.

Schedules are cron expressions (``croniter``, five fields, UTC). ``IntervalSchedule``
exists for tests: slots every N seconds since the epoch, which is the same on every
replica and so is still one slot per interval cluster-wide.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from croniter import croniter

from storage import AuditEntry, RunKind, RunOutcome, SqlRunLedger

log = logging.getLogger(__name__)
PRINCIPAL = "scheduler"
ACTIONS: dict[RunKind, str] = {"backup": "backup.run", "drill": "backup.drill"}
# Re-read the clock at least this often while waiting (a wall-clock step, a suspend).
_MAX_SLEEP = 30.0


class ScheduleError(ValueError):
    """A schedule that cannot be parsed; the message names it."""


class Schedule(Protocol):
    """When runs are due."""

    def next_after(self, moment: datetime) -> datetime:
        """The first slot strictly after ``moment`` (UTC-aware)."""
        ...


@dataclass(frozen=True, slots=True)
class CronSchedule:
    """A five-field cron expression evaluated in UTC."""

    expression: str

    def __post_init__(self) -> None:
        if not croniter.is_valid(self.expression):
            raise ScheduleError(f"not a valid cron expression: {self.expression!r}")

    def next_after(self, moment: datetime) -> datetime:
        """The first slot strictly after ``moment``."""
        nxt: datetime = croniter(self.expression, moment.astimezone(UTC)).get_next(datetime)
        return nxt.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class IntervalSchedule:
    """TESTS ONLY: a slot every ``seconds``, aligned to the Unix epoch."""

    seconds: int

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ScheduleError("an interval schedule needs a positive number of seconds")

    def next_after(self, moment: datetime) -> datetime:
        """The first multiple of ``seconds`` since the epoch after ``moment``."""
        now = moment.timestamp()
        return datetime.fromtimestamp((int(now // self.seconds) + 1) * self.seconds, UTC)


def schedule_from(cron: str, seconds: int = 0) -> Schedule | None:
    """The schedule configured: ``seconds`` (tests) wins over ``cron``; None if neither."""
    if seconds:
        return IntervalSchedule(seconds)
    if cron.strip():
        return CronSchedule(cron.strip())
    return None


@dataclass(frozen=True, slots=True)
class JobResult:
    """How a scheduled run ended (an exception means it failed)."""

    backup_id: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class ScheduledJob:
    """A kind of run, its schedule and the work (called with the slot)."""

    kind: RunKind
    schedule: Schedule
    run: Callable[[datetime], JobResult]


Elect = Callable[[RunKind], AbstractContextManager[bool]]


def _now() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    """Fires due slots in a background thread; ``fire`` is the unit of work (and of tests)."""

    def __init__(
        self,
        jobs: Sequence[ScheduledJob],
        ledger: SqlRunLedger,
        elect: Elect,
        audit: Callable[[AuditEntry], object],
        *,
        replica: str = "",
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self._jobs = tuple(jobs)
        self._ledger = ledger
        self._elect = elect
        self._audit = audit
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="backup-scheduler", daemon=True)

    def start(self) -> None:
        """Start the background thread (a no-op without jobs)."""
        if self._jobs:
            for job in self._jobs:
                log.info(
                    "backup schedule",
                    extra={"kind": job.kind, "next": job.schedule.next_after(self._clock())},
                )
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current run, if any (waits up to ``timeout`` seconds)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        due = {job.kind: job.schedule.next_after(self._clock()) for job in self._jobs}
        while not self._stop.is_set():
            now = self._clock()
            ready = [job for job in self._jobs if due[job.kind] <= now]
            if not ready:
                wait = min(due.values()) - now
                self._stop.wait(min(wait.total_seconds(), _MAX_SLEEP))
                continue
            for job in ready:
                if self._stop.is_set():
                    return
                self.fire(job, due[job.kind])
                # Slots that passed during the run are skipped: the next run covers them.
                due[job.kind] = job.schedule.next_after(max(self._clock(), due[job.kind]))

    def fire(self, job: ScheduledJob, slot: datetime) -> str:
        """Run ``job`` for ``slot`` if this replica wins it: "ran", "lost" or "taken"."""
        try:
            with self._elect(job.kind) as won:
                if not won:
                    log.info("slot run by another replica", extra={"kind": job.kind, "slot": slot})
                    return "lost"
                if not self._ledger.claim(slot, job.kind, self.replica, self._clock()):
                    log.info("slot already claimed", extra={"kind": job.kind, "slot": slot})
                    return "taken"
                self._run(job, slot)
                return "ran"
        except Exception:  # the database or the lock failed: try again at the next slot
            log.exception("scheduled run not started", extra={"kind": job.kind, "slot": slot})
            return "error"

    def _run(self, job: ScheduledJob, slot: datetime) -> None:
        started = self._clock()
        try:
            result = job.run(slot)
        except Exception as e:  # recorded and audited; the scheduler keeps going
            log.exception("scheduled run failed", extra={"kind": job.kind, "slot": slot})
            result = JobResult("", ok=False, detail=f"{type(e).__name__}: {e}")
        outcome: RunOutcome = "ok" if result.ok else "failed"
        took = (self._clock() - started).total_seconds()
        detail = f"slot {slot.isoformat()}, {took:.1f} s: {result.detail}"
        try:
            self._ledger.finish(
                slot, job.kind, self._clock(), outcome=outcome,
                backup_id=result.backup_id or None, detail=result.detail,
            )  # fmt: skip
        finally:
            self._audit_run(job.kind, result, detail)

    def _audit_run(self, kind: RunKind, result: JobResult, reason: str) -> None:
        entry = AuditEntry(
            time=self._clock(), principal=PRINCIPAL, role="scheduler", action=ACTIONS[kind],
            resource=f"backup/{result.backup_id}" if result.backup_id else "backup",
            outcome="allowed" if result.ok else "failed", reason=reason, source=self.replica,
        )  # fmt: skip
        try:
            self._audit(entry)
        except Exception:  # the run happened; the log keeps what the trail could not
            log.exception("could not audit a scheduled run", extra={"kind": kind})


def next_slots(jobs: Sequence[ScheduledJob], after: datetime) -> dict[str, datetime]:
    """The next slot of each job after ``after`` (for ``medvault backup schedule``)."""
    return {job.kind: job.schedule.next_after(after) for job in jobs}


def slot_window(schedule: Schedule, start: datetime, end: datetime) -> list[datetime]:
    """Every slot in ``(start, end]`` (tests count the slots a period should have run)."""
    slots, moment = [], start
    while (moment := schedule.next_after(moment)) <= end:
        slots.append(moment)
        if len(slots) > 100_000:  # a runaway schedule; nobody needs this many
            break
    return slots
