"""A read's and a signing's admission: the gate a record passes, and when its allowed
audit event commits (docs/architecture.md, read path step 1: nothing is released
before it has).

``ReadAdmission`` lets GetRecord fetch while its event commits; ``SigningAdmission``
holds the event to commit with the signature, in one transaction. Both are made by
``AccessGuard`` (``service.guard``), which they reach only through ``AdmittingGuard``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from service.audit.trail import AuditTrail, Receipt
from service.call_facts import Call
from storage import AuditEntry, Change, RecordRef

T = TypeVar("T")


class AdmittingGuard(Protocol):
    """What an admission asks of the access guard (``service.guard.AccessGuard``)."""

    trail: AuditTrail

    def allowed_read(self, call: Call, ref: RecordRef) -> AuditEntry:
        """The allowed event of ``call`` reading ``ref``, once its scope is checked."""
        ...

    def count_read(self, call: Call) -> None:
        """Count an admitted read for the bulk-read incident detector."""
        ...

    def audit_change(
        self,
        call: Call,
        resource: str,
        change: Change[T],
        patient_index: bytes | None = None,
        *,
        before: Sequence[AuditEntry] = (),
    ) -> T:
        """Run ``change`` and commit its allowed event in one transaction, or neither."""
        ...


class ReadAdmission:
    """One read's gate and the receipt of its allowed event (``AccessGuard.read_admission``).

    ``gate`` refuses out of scope at once (its denial committed, as ``patient_gate``
    does) and queues the allowed event without waiting for it; ``wait`` returns once
    every queued event is committed, and raises ``AuditUnavailableError`` otherwise. The
    caller fetches and decrypts between the two and sends nothing before ``wait``.
    """

    def __init__(self, guard: AdmittingGuard, call: Call) -> None:
        self._guard = guard
        self._call = call
        self._receipts: list[Receipt] = []

    def gate(self, ref: RecordRef) -> None:
        """The ``Gate``: check scope now, queue the allowed event."""
        entry = self._guard.allowed_read(self._call, ref)
        self._receipts.append(self._guard.trail.submit(entry))
        self._guard.count_read(self._call)

    def wait(self) -> None:
        """Return once the allowed events are committed; raise if one is not."""
        for receipt in self._receipts:
            receipt.wait()


class SigningAdmission:
    """SignRecord's gate and its held read event (``AccessGuard.signing_admission``).

    ``gate`` refuses out of scope at once (its denial committed, as ``patient_gate``)
    and holds the allowed read event. ``commit_change`` commits the held events, the
    signature's event and its row in ONE audit transaction (one writer round trip, one
    fsync); the read events commit even when the row's insert fails. ``settle``, run
    on every way out, commits the read events still held (the signing failed before
    its commit) and raises ``AuditUnavailableError`` if it cannot. The caller releases
    nothing before ``commit_change`` has returned.
    """

    def __init__(self, guard: AdmittingGuard, call: Call) -> None:
        self._guard = guard
        self._call = call
        self._held: list[AuditEntry] = []

    def gate(self, ref: RecordRef) -> None:
        """The ``Gate``: check scope now, hold the allowed event."""
        self._held.append(self._guard.allowed_read(self._call, ref))
        self._guard.count_read(self._call)

    def commit_change(
        self, resource: str, change: Change[T], patient_index: bytes | None = None
    ) -> T:
        """Commit the held read events, then ``change`` with its allowed event on
        ``resource``, in one transaction (``AccessGuard.audit_change`` with ``before``).

        If the trail refuses the transaction, none of its events is written: the call
        fails (``AuditUnavailableError``), as a read whose event fails."""
        held, self._held = self._held, []
        return self._guard.audit_change(self._call, resource, change, patient_index, before=held)

    def settle(self) -> None:
        """Commit the read events no ``commit_change`` took; raise if one cannot be."""
        held, self._held = self._held, []
        for entry in held:
            self._guard.trail.record(entry)
