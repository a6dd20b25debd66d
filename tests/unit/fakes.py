"""In-memory fakes of the storage role Protocols (``storage.roles``), for unit tests of
one use case at a time: no database, no token, no object store, and milliseconds a test.

The contract suites (tests/integration/...) prove the real stores; these fakes only keep
the role's promises that the use case under test relies on, and ``conforms`` checks
that each still has the Protocol's methods with the Protocol's parameters.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import replace
from datetime import datetime

from storage import AuditEntry, RunKind, RunOutcome, ScheduledRun


def conforms(fake: type, role: type) -> list[str]:
    """How ``fake`` differs from Protocol ``role`` (missing methods, other parameters)."""
    problems = []
    for name, member in vars(role).items():
        if name.startswith("_") or not callable(member):
            continue
        mine = getattr(fake, name, None)
        if mine is None:
            problems.append(f"{fake.__name__} has no {name}")
            continue
        want = [p.name for p in inspect.signature(member).parameters.values()]
        have = [p.name for p in inspect.signature(mine).parameters.values()]
        if want != have:
            problems.append(f"{fake.__name__}.{name}{tuple(have)} is not {tuple(want)}")
    return problems


class InMemoryRunLedger:
    """``RunLedger``: one claim per (slot, kind), shared by every replica that holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[tuple[datetime, str], ScheduledRun] = {}

    def claim(self, slot: datetime, kind: RunKind, replica: str, now: datetime) -> bool:
        with self._lock:
            if (slot, kind) in self._runs:
                return False
            self._runs[slot, kind] = ScheduledRun(
                slot=slot, kind=kind, replica=replica, started_at=now, finished_at=None,
                backup_id=None, outcome="running", detail="", auth="authentic",
            )  # fmt: skip
            return True

    def finish(
        self,
        slot: datetime,
        kind: RunKind,
        now: datetime,
        *,
        outcome: RunOutcome,
        backup_id: str | None,
        detail: str = "",
    ) -> None:
        with self._lock:
            run = self._runs[slot, kind]
            self._runs[slot, kind] = replace(
                run, finished_at=now, outcome=outcome, backup_id=backup_id, detail=detail
            )

    def list(self, kind: RunKind | None = None, limit: int = 1000) -> list[ScheduledRun]:
        with self._lock:
            runs = [r for r in self._runs.values() if kind is None or r.kind == kind]
        return sorted(runs, key=lambda r: r.slot, reverse=True)[:limit]


class RecordedEvents:
    """The audit trail as an incident detector or a scheduler sees it: events kept in order."""

    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    def record(self, entry: AuditEntry, /) -> object:
        self.entries.append(entry)
        return entry

    __call__ = record  # the scheduler takes a plain callable
