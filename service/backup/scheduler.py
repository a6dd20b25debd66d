"""Scheduled backups and drills inside the service, run once per slot by one replica.

Every replica runs a ``Scheduler`` thread. Each computes the same slots (UTC) from the
same schedule; at a slot, the replicas race for the election lock, and the winner
claims the slot in ``backup_runs`` before it starts. The claim is what makes a slot run
once (``storage.backup.runs``); the lock only keeps runs of a kind from overlapping.
Its key is public, so any database session may hold it (cold review 9h): a loser
therefore waits a grace period for the winner's claim and, if the slot is still
unclaimed, claims and runs it itself, with a warning (and a ``run-missed`` incident
unless a run of an earlier slot was still running when the slot came due). A lock a
stranger holds for ever costs each slot the grace, never the slot. A replica's own
slots that pass while it runs are skipped, not queued: the next run covers them.

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
from datetime import UTC, datetime, timedelta
from typing import Protocol

from croniter import croniter

from storage import AuditEntry, RunKind, RunLedger, RunOutcome, ScheduledRun, run_resource

log = logging.getLogger(__name__)
PRINCIPAL = "scheduler"
ACTIONS: dict[RunKind, str] = {"backup": "backup.run", "drill": "backup.drill"}
# Re-read the clock at least this often while waiting (a wall-clock step, a suspend).
_MAX_SLEEP = 30.0
# How long a replica that lost the election waits for the winner's claim before it
# claims the slot itself. A winner claims within milliseconds of taking the lock (a
# claim waits 10 s at most for a row lock: storage.backup.runs.LOCK_WAIT_MS), so a slot
# still unclaimed after this is no winner's. Capped at half the gap to the next slot.
CLAIM_GRACE = timedelta(seconds=30)
# Told "backup-run/<kind>/<slot>" of a slot nobody claimed while the lock was held.
Missed = Callable[[str], None]


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
        ledger: RunLedger,
        elect: Elect,
        audit: Callable[[AuditEntry], object],
        *,
        replica: str = "",
        clock: Callable[[], datetime] = _now,
        grace: timedelta = CLAIM_GRACE,
        on_missed: Missed | None = None,
    ) -> None:
        self._jobs = tuple(jobs)
        self._ledger = ledger
        self._elect = elect
        self._audit = audit
        self._grace = grace
        self._on_missed = on_missed
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
        """Run ``job`` for ``slot`` unless another replica claimed it: "ran", "taken",
        "lost" (stopped while waiting for the winner's claim) or "error".

        Losing the election does not skip the slot: after the grace, the slot's claim
        decides (see the module's docstring).
        """
        try:
            outcome = self._if_elected(job, slot)
            if outcome is None:
                if self._stop.wait(self._grace_for(job, slot)):
                    return "lost"
                outcome = self._if_elected(job, slot) or self._unelected(job, slot)
        except Exception:  # the database or the lock failed: try again at the next slot
            log.exception("scheduled run not started", extra={"kind": job.kind, "slot": slot})
            return "error"
        return outcome

    def _grace_for(self, job: ScheduledJob, slot: datetime) -> float:
        """Seconds a loser waits for the winner's claim: the grace, at most half the gap
        to the next slot (so a slot's wait never spills into the next one)."""
        gap = job.schedule.next_after(slot) - slot
        return max(min(self._grace, gap / 2).total_seconds(), 0.0)

    def _if_elected(self, job: ScheduledJob, slot: datetime) -> str | None:
        """Claim and run the slot holding the election lock; None if another holds it."""
        with self._elect(job.kind) as won:
            if not won:
                return None
            if not self._ledger.claim(slot, job.kind, self.replica, self._clock()):
                log.info("slot already claimed", extra={"kind": job.kind, "slot": slot})
                return "taken"
            self._run(job, slot)
            return "ran"

    def _unelected(self, job: ScheduledJob, slot: datetime) -> str:
        """The lock was held elsewhere for the whole grace: claim the slot without it.
        The claim (a primary key, an authentic row re-read) keeps the slot to one run;
        runs of a kind may then overlap, as a manual backup may overlap a scheduled one."""
        if not self._ledger.claim(slot, job.kind, self.replica, self._clock()):
            log.info("slot run by another replica", extra={"kind": job.kind, "slot": slot})
            return "taken"
        self._report_unelected(job.kind, slot)
        self._run(job, slot)
        return "ran"

    def _report_unelected(self, kind: RunKind, slot: datetime) -> None:
        """Warn of a slot run without the lock; an incident unless the lock's holder may
        be a replica running an earlier slot. Never raises: the slot must run."""
        name = run_resource(slot, kind)
        earlier = self._still_running(kind, slot)
        if earlier is not None:
            log.warning(
                "%s runs without the election lock, beside the run of an earlier slot "
                "still running when it came due (%s, replica %s)",
                name, run_resource(earlier.slot, kind), earlier.replica,
                extra={"kind": kind, "slot": slot},
            )  # fmt: skip
            return
        log.warning(
            "%s unclaimed while the election lock was held by a session that runs no "
            "slot (a database writer's?); running it without the lock",
            name, extra={"kind": kind, "slot": slot},
        )  # fmt: skip
        if self._on_missed is None:
            return
        try:
            self._on_missed(name)
        except Exception:  # the run matters more than the report; the log line stays
            log.exception("could not report a missed slot: %s", name)

    def _still_running(self, kind: RunKind, slot: datetime) -> ScheduledRun | None:
        """The newest authentic run of an earlier slot of ``kind`` (among the 20 newest)
        that was still running when ``slot`` came due (``_running_at``); else None. Its
        replica may hold the lock, or have released it during the grace to another
        honest replica's retry. Not only the newest earlier run (cold review 9j): a run
        spanning two slots has the run of the slot between beside it, maybe finished."""
        try:
            runs = self._ledger.list(kind, limit=20)
        except Exception:  # unknown: report the slot as missed rather than keep quiet
            log.exception("could not read the run ledger", extra={"kind": kind})
            return None
        return next((run for run in runs if _running_at(run, slot)), None)

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


def _running_at(run: ScheduledRun, slot: datetime) -> bool:
    """True when ``run`` is authentic, of an earlier slot, and was running when ``slot``
    came due: still ``running``, or started before ``slot`` and finished after it."""
    if run.auth != "authentic" or run.slot >= slot:
        return False
    if run.outcome == "running":
        return True
    return run.started_at <= slot and run.finished_at is not None and run.finished_at > slot


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
