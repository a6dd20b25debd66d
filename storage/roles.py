"""What the service's use cases ask of storage, one Protocol per role.

The SQL implementations (``SqlGrantStore``, ``SqlAuditLog``, ``SignatureStore``,
``KekManager``, ``SqlRunLedger``) satisfy these structurally; ``service.bootstrap``
wires them, and a unit test may hand a use case an in-memory fake instead
(``tests/unit/fakes.py``). The blob and row Protocols the record store composes are in
:mod:`storage.interfaces`; the backup target's is ``storage.backup.targets.BackupTarget``.

A separate module from ``storage.interfaces`` because these name the domain objects of
the stores that implement them (grants, signatures, KEK versions), and those stores
import ``storage.interfaces``: one module would close an import cycle.

"Changes" (``Change[T]``) are functions of a database connection that a store returns
instead of committing: the audit trail runs them in the transaction that commits their
event, so an action and its audit event happen together or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol, TypeVar

from storage.audit_log import Appended, Change, Pending, SqlAuditLog
from storage.audit_model import AuditEntry, AuditFilter, ChainedEvent, Checkpoint
from storage.backup.run_model import RunKind, RunOutcome, ScheduledRun
from storage.backup.runs import SqlRunLedger
from storage.grants import SqlGrantStore
from storage.grants_model import Grant
from storage.kek import DEFAULT_BATCH, Committer, KekManager, KekVersionInfo, RewrapJob
from storage.model import NewRecord, RecordInfo
from storage.record_types import CommitGate, Gate
from storage.signatures import Signature, SignatureStore, SignedRecord

T = TypeVar("T")

__all__ = [
    "AuditLog",
    "Change",
    "GrantStore",
    "KekRegistry",
    "RecordSignatures",
    "RunLedger",
]


class GrantStore(Protocol):
    """Care-team and break-the-glass grants: checked, sealed, and verified on read."""

    def has_access(self, principal: str, patient_index: bytes, now: datetime) -> Grant | None:
        """An active, authentic grant of ``principal`` on the patient, or ``None``."""
        ...

    def get(self, grant_id: str) -> Grant:
        """The grant as stored; ``RecordNotFoundError`` if absent."""
        ...

    def list(
        self,
        patient_index: bytes | None,
        principal: str | None,
        include_inactive: bool,
        now: datetime,
    ) -> list[Grant]:
        """Authentic grants on a patient, of a principal, or both; newest first."""
        ...

    def new_grant(
        self,
        patient_index: bytes,
        principal: str,
        granted_by: str,
        expires_at: datetime | None,
        now: datetime,
    ) -> Grant:
        """A checked care-team grant, not stored yet (``insert_change`` stores it)."""
        ...

    def new_break_glass(
        self,
        patient_index: bytes,
        principal: str,
        reason: str,
        duration: timedelta,
        now: datetime,
    ) -> Grant:
        """A checked break-the-glass grant, not stored yet."""
        ...

    def insert_change(self, grant: Grant) -> Change[Grant]:
        """Store ``grant`` when the change runs (in the audit event's transaction)."""
        ...

    def revoke_change(self, grant_id: str, revoked_by: str, now: datetime) -> Change[Grant]:
        """End the grant when the change runs; ``RecordConflictError`` if ended already."""
        ...


class AuditLog(Protocol):
    """The hash-chained audit events and their signed checkpoints."""

    def append(self, entries: Sequence[AuditEntry]) -> list[ChainedEvent]:
        """Chain and insert ``entries`` in one transaction, serialised with all writers."""
        ...

    def append_pending(self, items: Sequence[Pending]) -> list[Appended]:
        """Apply each item's change and append the events, all in one transaction."""
        ...

    def run_change(self, change: Change[T]) -> T:
        """Run ``change`` in a transaction of its own (only when auditing is disabled)."""
        ...

    def head(self) -> tuple[int, bytes]:
        """The sequence and hash of the last committed event (0 and zeros when empty)."""
        ...

    def events(self, after_sequence: int = ..., limit: int = ...) -> list[ChainedEvent]:
        """Up to ``limit`` events with sequence > ``after_sequence``, in sequence order."""
        ...

    def query(self, flt: AuditFilter) -> Iterator[ChainedEvent]:
        """Events matching ``flt``; a malformed row as a placeholder (``malformed``)."""
        ...

    def add_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Store ``checkpoint``; False if another replica's checkpoint came first."""
        ...

    def checkpoints(self, after_sequence: int = ...) -> list[Checkpoint]:
        """Checkpoints past ``after_sequence``, oldest first."""
        ...

    def last_checkpoint(self) -> Checkpoint | None:
        """The checkpoint with the highest sequence, or None."""
        ...


class RecordSignatures(Protocol):
    """Document signatures stored beside the records they sign."""

    def open(
        self, record_id: str, version: int | None, *, admit: Gate, content: bool = True
    ) -> SignedRecord:
        """Open a record version for signing or listing (``admit`` checks and audits)."""
        ...

    def get(self, signature_id: str, *, admit: Gate) -> tuple[RecordInfo, Signature]:
        """One signature with the record it signs (``admit`` runs on that record)."""
        ...

    def add_version(
        self,
        header: NewRecord,
        content: Iterable[bytes],
        creator: str,
        *,
        admit: Gate,
        on_commit: CommitGate,
    ) -> SignedRecord:
        """Store a new version (a PAdES-signed PDF) and open it to attach its signature."""
        ...

    def latest_version(self, record_id: str) -> int:
        """The record's latest version number."""
        ...


class KekRegistry(Protocol):
    """The master-key (KEK) versions: rotation, re-wrapping, retirement."""

    def sync(self) -> int:
        """Register the token's versions; mark the newest active. Return it."""
        ...

    def rotate(self, commit: Callable[[int, Change[None]], None] | None = None) -> KekVersionInfo:
        """Create the next version and make it current; ``RecordConflictError`` if raced."""
        ...

    def list(self) -> list[KekVersionInfo]:
        """Every known version, oldest first, with its state and wrapped-key count."""
        ...

    def rewrap(self, from_version: int = 0, batch_size: int = DEFAULT_BATCH) -> RewrapJob:
        """A job moving keys to the current version; run ``step()`` until ``done``."""
        ...

    def retire(
        self, version: int, *, destroy_key: bool = False, commit: Committer | None = None
    ) -> KekVersionInfo:
        """Mark ``version`` retired; refused while in use or active."""
        ...


class RunLedger(Protocol):
    """Scheduled runs (backups, drills, sweeps): one claim per slot across replicas."""

    def claim(self, slot: datetime, kind: RunKind, replica: str, now: datetime) -> bool:
        """Claim the slot; False if another replica claimed it already."""
        ...

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
        """Record the end of the run of ``(slot, kind)``."""
        ...

    def list(self, kind: RunKind | None = None, limit: int = 1000) -> list[ScheduledRun]:
        """The newest ``limit`` runs (of ``kind``), newest first."""
        ...


if TYPE_CHECKING:
    # mypy proves here that each SQL store fits its role (Protocols are structural).
    def _fits(
        grants: SqlGrantStore,
        log: SqlAuditLog,
        signatures: SignatureStore,
        keks: KekManager,
        runs: SqlRunLedger,
    ) -> tuple[GrantStore, AuditLog, RecordSignatures, KekRegistry, RunLedger]:
        return grants, log, signatures, keks, runs
