"""Group-committed audit writer with signed checkpoints.

``record()`` returns only once its event is committed. Callers do not each open a
transaction: they put the entry and a ``Future`` on a queue, and one writer thread takes
everything waiting (up to ``MAX_BATCH``) and appends it in a single transaction, so one
fsync serves a whole batch. This is how the trail keeps up with many concurrent reads
without weakening durability. An event is either committed and acknowledged, or its
caller knows it was not (``AuditUnavailableError``).

One caller must not fail another's event: every entry is normalised before it is
queued (``storage.audit_fields``: control characters escaped, over-long values cut
with a marker), and if a batch is still refused for its content, its events are
retried one by one so that only the faulty event's caller sees the error. An outage
(database unreachable or read-only) fails the whole batch at once, without retries.

State changes commit with their event (``record_change``): the change runs on the
batch's connection under a savepoint, before the events are chained. A change that
raises is rolled back and only its caller gets the error; the rest of the batch
commits. So a grant, a revocation or a record row exists exactly when its audit
event does. A caller may queue events without a change ahead of its own (``before``:
SignRecord's read of the record version it signs) as ONE item: they are appended in
the same transaction, consecutively, and retried as a unit; they are written whatever
becomes of the change, and fail with the item when the database refuses any of its
events. ``MAX_BATCH`` counts events, not items.

Checkpoints: after ``checkpoint_every`` events written by this trail, or after
``checkpoint_seconds`` with unsigned events, the writer signs the committed head with
the audit key, chained to the previous checkpoint, and copies it to the write-once
witnesses; it first checks the chain from the last checkpoint it witnessed and refuses
to sign a forged one (:class:`service.audit.checkpoints.Checkpointer`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

from prometheus_client import Histogram

from keystore import Signer
from service.audit import AuditUnavailableError
from service.audit.checkpoints import Checkpointer, signature_checker
from storage import (
    GENESIS_HASH,
    Appended,
    AuditEntry,
    AuditLog,
    BackendUnavailableError,
    ChainedEvent,
    Change,
    Checkpoint,
    CheckpointWitness,
    Pending,
    VerifyResult,
    normalise,
    verify_chain,
)

logger = logging.getLogger(__name__)
# A read's data leaves only after its event commits: this is on every read's path.
COMMIT_SECONDS = Histogram(
    "medvault_audit_commit_seconds", "Time to commit one batch of audit events",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)  # fmt: skip

MAX_BATCH: Final = 512
# Longest wait for stragglers before a commit under concurrent load.
LINGER_SECONDS: Final = 0.002
# A caller waits at most this long for its event to commit, then the call is refused.
RECORD_TIMEOUT_SECONDS: Final = 30.0

T = TypeVar("T")
_STOP: Final = object()


@dataclass(frozen=True, slots=True)
class _Item:
    """One caller's queued events (the last may carry a state change), appended in one
    transaction, and the future its caller waits on: the last event and change result."""

    pending: tuple[Pending, ...]
    future: Future[tuple[ChainedEvent, Any]] = field(default_factory=Future)

    @property
    def changes(self) -> bool:
        """Whether one of its events carries a state change."""
        return any(p.change is not None for p in self.pending)


def _events(items: Sequence[_Item]) -> int:
    return sum(len(i.pending) for i in items)


def _settled(item: _Item) -> tuple[ChainedEvent, Any]:
    """Wait for ``item``'s commit: its event (and change result), or the error."""
    try:
        return item.future.result(timeout=RECORD_TIMEOUT_SECONDS)
    except TimeoutError as e:
        # Fail closed rather than hold the caller forever: the call is refused, and
        # the item, still queued, is cancelled so it is never written.
        if item.future.cancel() or not item.changes:
            raise AuditUnavailableError("the audit trail did not commit in time") from e
    # Its transaction is under way: the caller must learn whether the change committed
    # (a put deletes its object on an error; a row committed after that would point
    # at nothing).
    return item.future.result()


class Receipt:
    """An event queued by ``AuditTrail.submit``: ``wait`` until it is committed."""

    __slots__ = ("_item", "_refused")

    def __init__(self, item: _Item | None) -> None:
        self._item = item
        self._refused: AuditUnavailableError | None = None

    def wait(self) -> None:
        """Return once the event is committed; ``AuditUnavailableError`` if it is not.

        A refusal is final and is raised again by every later ``wait``: a timed-out
        event was cancelled, and its future would now raise a bare ``CancelledError``
        (INTERNAL), or make the caller wait out the timeout again."""
        if self._refused is not None:
            raise AuditUnavailableError(str(self._refused)) from self._refused
        if self._item is not None:
            try:
                _settled(self._item)
            except AuditUnavailableError as e:
                self._refused = e
                raise


class AuditTrail:
    """Records audit events (group commit), signs checkpoints, verifies the chain.

    ``enabled=False`` is a BENCHMARK-ONLY switch: ``record()`` then returns at once and
    writes NOTHING. It exists so ``bench/`` can measure the cost of auditing; a
    production configuration must never set it (reads would leave no trace).
    """

    def __init__(
        self,
        log: AuditLog,
        signer: Signer | None,
        *,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        enabled: bool = True,
        witnesses: Sequence[CheckpointWitness] = (),
    ) -> None:
        if checkpoint_every < 1 or checkpoint_seconds <= 0:
            raise ValueError("checkpoint_every and checkpoint_seconds must be positive")
        self._log = log
        self._signer = signer
        self._checkpointer = Checkpointer(log, signer, witnesses) if signer is not None else None
        self._every = checkpoint_every
        self._seconds = checkpoint_seconds
        self._enabled = enabled
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._state_lock = threading.Lock()
        self._closed = False
        self._last_batch = 0  # items in the previous batch: >1 means concurrent callers
        self._carried: _Item | None = None  # drained, but past MAX_BATCH: opens the next
        self._unsigned = 0  # events this trail committed since its last checkpoint
        self._last_checkpoint = time.monotonic()
        self._writer = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        if not enabled:
            logger.warning("audit trail DISABLED (benchmark-only switch); nothing is recorded")
            return
        self._writer.start()

    def record(self, entry: AuditEntry) -> ChainedEvent:
        """Commit ``entry`` and return it chained; ``AuditUnavailableError`` if it cannot."""
        if not self._enabled:
            # Benchmark-only: a placeholder, never written (see the class docstring).
            return ChainedEvent(0, entry, GENESIS_HASH, GENESIS_HASH)
        event, _ = _settled(self._enqueue(Pending(normalise(entry))))
        return event

    def record_change(
        self, entry: AuditEntry, change: Change[T], *, before: Sequence[AuditEntry] = ()
    ) -> T:
        """Run ``change`` and commit ``entry`` in the same transaction; the change's result.

        Both happen or neither: the change's own error (a conflict, a missing row) is
        raised here with ``entry`` not written; ``AuditUnavailableError`` if the trail
        cannot commit, and then the change did not happen either.

        ``before``: events without a change (what the change follows from: the read of
        the record a signature signs) committed in the same transaction, just ahead of
        ``entry``. They commit even when the change raises (its error is raised once
        they are committed), and not at all when the trail refuses any of the events.
        """
        if not self._enabled:
            return self._log.run_change(change)  # benchmark-only: no event, still the change
        pending = [Pending(normalise(e)) for e in before]
        pending.append(Pending(normalise(entry), change))
        _, value = _settled(self._enqueue(*pending))
        return cast(T, value)

    def submit(self, entry: AuditEntry) -> Receipt:
        """Queue ``entry`` now and return at once; ``Receipt.wait`` returns once it is
        committed (``AuditUnavailableError`` if it cannot be). A read starts fetching while
        its event commits, and releases nothing before ``wait`` has returned."""
        if not self._enabled:
            return Receipt(None)  # benchmark-only: nothing is written (class docstring)
        return Receipt(self._enqueue(Pending(normalise(entry))))

    def _enqueue(self, *pending: Pending) -> _Item:
        item = _Item(pending)
        with self._state_lock:
            if self._closed or not self._writer.is_alive():
                raise AuditUnavailableError("the audit trail is closed; the event was not recorded")
            self._queue.put(item)
        return item

    def checkpoint_now(self) -> Checkpoint | None:
        """Sign the committed head now; None if nothing new to sign or no signer.

        ``AuditChainError`` if the chain no longer reaches the last checkpoint this
        trail witnessed (it then signs nothing; see ``Checkpointer``).
        """
        if self._checkpointer is None or not self._enabled:
            return None
        try:
            checkpoint = self._checkpointer.checkpoint()
        finally:
            # Also after a refusal: the next attempt waits for N more events or T seconds.
            self._unsigned = 0
            self._last_checkpoint = time.monotonic()
        if checkpoint is not None:
            logger.info("audit checkpoint", extra={"sequence": checkpoint.sequence})
        return checkpoint

    def verify(self) -> VerifyResult:
        """Verify the chain against the witnesses; checkpoints must carry the current key."""
        if self._checkpointer is not None:
            return self._checkpointer.verify()
        return verify_chain(self._log, signature_checker(None))

    def close(self) -> None:
        """Commit what is queued, write a final checkpoint, stop the writer; idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if self._enabled:
            self._writer.join()
            self._try_checkpoint()

    def __enter__(self) -> AuditTrail:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        """Writer thread: take what waits, append it in one transaction, wake callers."""
        stop = False
        while not stop:
            try:
                first = self._next()
            except queue.Empty:
                self._checkpoint_if_due()
                continue
            batch, stop = self._drain(first)
            if batch:
                self._write(batch)
            self._checkpoint_if_due()

    def _next(self) -> object:
        """The item the previous batch had no room for, else the next one queued."""
        if self._carried is not None:
            item, self._carried = self._carried, None
            return item
        return self._queue.get(timeout=self._until_checkpoint())

    def _drain(self, first: object) -> tuple[list[_Item], bool]:
        """``first`` and everything queued behind it, up to MAX_BATCH events; True on stop.

        Under concurrent load (the previous batch held several items) the writer
        lingers briefly for stragglers: a commit costs about the same for 1 event or 16,
        so fuller batches cost each caller less than the wait. A lone caller never waits.
        An item that would take the batch past MAX_BATCH events opens the next one.
        """
        batch: list[_Item] = []
        events = 0
        item = first
        linger = self._last_batch > 1
        while True:
            if item is _STOP:
                return batch, True
            queued = cast(_Item, item)  # only _Item or _STOP is queued
            if batch and events + len(queued.pending) > MAX_BATCH:
                self._carried = queued
                break
            # False if its caller gave up waiting (cancelled): then it is not written.
            if queued.future.set_running_or_notify_cancel():
                batch.append(queued)
                events += len(queued.pending)
            if events >= MAX_BATCH:
                break
            try:
                item = (
                    self._queue.get(timeout=LINGER_SECONDS) if linger else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        self._last_batch = len(batch)
        return batch, False

    def _write(self, batch: list[_Item]) -> None:
        """Append one batch; on a refusal (not an outage) retry its items one by one."""
        try:
            with COMMIT_SECONDS.time():
                done = self._log.append_pending([p for i in batch for p in i.pending])
        except BackendUnavailableError as e:
            self._fail(batch, e)  # an outage: every caller now, no retries to wait on
            return
        except Exception as e:  # noqa: BLE001  (isolated below, item by item)
            if len(batch) == 1:
                self._fail(batch, e)
                return
            logger.warning(
                "audit batch refused; retrying its callers' events one caller at a time",
                extra={"events": _events(batch), "error": type(e).__name__},
            )
        else:
            self._settle(batch, done)
            return
        for n, item in enumerate(batch):
            try:
                # An item's events stay together: one transaction, all or none of them.
                self._settle([item], self._log.append_pending(item.pending))
            except BackendUnavailableError as e:
                self._fail(batch[n:], e)
                return
            except Exception as e:  # noqa: BLE001  (this item's caller alone)
                self._fail([item], e)

    def _settle(self, batch: Sequence[_Item], done: Sequence[Appended]) -> None:
        """Hand each caller its last committed event (and change result) or its change's
        error; every event written counts towards (and is noted for) the checkpoint."""
        if _events(batch) != len(done):
            raise ValueError("the audit log answered for another number of events")
        results = iter(done)
        for item in batch:
            appended = [next(results) for _ in item.pending]
            for a in appended:
                if a.event is not None:
                    self._unsigned += 1
                    if self._checkpointer is not None:  # it refuses a head that lost it
                        self._checkpointer.note_committed(a.event.sequence, a.event.hash)
            last = appended[-1]
            if last.event is not None and all(a.event is not None for a in appended):
                item.future.set_result((last.event, last.value))
            else:  # a change raised: its error (its event was not written)
                error = next((a.error for a in appended if a.error is not None), None)
                item.future.set_exception(error or AuditUnavailableError("not recorded"))

    def _fail(self, batch: Sequence[_Item], error: Exception) -> None:
        # Not log.exception: a database error's text carries the statement's bound
        # parameters (principal, blind index), which must not reach the log.
        logger.error(
            "audit append failed", extra={"events": _events(batch), "error": type(error).__name__}
        )
        # An outage's message names the database and its address, never a row's data
        # (storage builds it so): the caller and the operator see what is down.
        why = f": {error}" if isinstance(error, BackendUnavailableError) else "; retry later"
        for item in batch:
            failure = AuditUnavailableError(f"audit trail unavailable{why}")
            failure.__cause__ = error
            item.future.set_exception(failure)

    def _until_checkpoint(self) -> float | None:
        """How long the writer may sleep before a time-based checkpoint is due."""
        if self._signer is None or self._unsigned == 0:
            return None  # nothing to sign: sleep until work arrives
        return max(0.0, self._last_checkpoint + self._seconds - time.monotonic())

    def _checkpoint_if_due(self) -> None:
        if self._signer is None or self._unsigned == 0:
            return
        if self._unsigned >= self._every or (
            time.monotonic() - self._last_checkpoint >= self._seconds
        ):
            self._try_checkpoint()

    def _try_checkpoint(self) -> None:
        """Checkpoint, logging (not raising) a failure: the next attempt signs a later head."""
        try:
            self.checkpoint_now()
        except Exception as e:  # noqa: BLE001  (the writer thread must survive any failure)
            logger.warning("audit checkpoint failed", extra={"error": type(e).__name__})
