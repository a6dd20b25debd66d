"""What the scheduled-run ledger holds: :class:`ScheduledRun` (no SQL, no token)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

RunKind = Literal["backup", "drill", "sweep"]  # sweep: the orphan sweeper (lock only)
RunOutcome = Literal["running", "ok", "failed"]
# authentic: the row's MAC verified (storage.backup.run_seal); legacy: the row has no
# MAC (written before migration 0015, or by a replica of an earlier release during an
# upgrade); forged: a MAC that does not verify, or a value medvault never writes.
RunAuth = Literal["authentic", "legacy", "forged"]
MAX_DETAIL = 1000


@dataclass(frozen=True, slots=True)
class ScheduledRun:
    """One row of ``backup_runs``.

    Only an ``authentic`` run is evidence that a slot was claimed or how it ended: the
    scheduler claims over any other row, and the gauges count no other as a result.
    """

    slot: datetime
    kind: RunKind
    replica: str
    started_at: datetime
    finished_at: datetime | None
    backup_id: str | None
    outcome: RunOutcome
    detail: str
    # Columns of the row holding a value medvault never writes (another type, or a kind
    # or outcome outside the constraint's): the run is then listed as failed.
    unreadable: tuple[str, ...] = ()
    auth: RunAuth = "forged"  # fail closed: only a verified MAC makes a run count
