"""The audit trail's SQL store: an append-only, hash-chained event table.

Every append runs in one transaction that first locks the single ``audit_head`` row, so
writers in other threads, processes and replicas serialise on it and the chain stays
one line: the first statement is a no-op ``UPDATE`` of the head row ``RETURNING`` it,
which takes PostgreSQL's row lock and SQLite's database write lock (SQLite has no row
locks) before anything is read (a deferred transaction that reads first could see a
stale head), and reads the head under that lock.
The hash chain and the canonical encoding are defined in :mod:`storage.audit_model`;
the tables, and the three statements every append runs (compiled once into the driver's
SQL), in :mod:`storage.audit_sql`.

The reads (head, events, checkpoints) are ``storage.audit_reads``; driver errors are
translated in ``storage.audit_errors``.

Durability: the engine's SQLite connections are set to ``synchronous=FULL`` (in WAL
mode ``NORMAL`` may lose the last commits on power loss, and an audit event must never
be acknowledged and then lost). On PostgreSQL the engine's sessions never run with
``synchronous_commit=off`` (``storage.sql_engine.make_engine``).
Group commit (``service.audit.trail``) pays for the fsync once per batch instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from storage.audit_errors import (
    AuditColumnAlteredError,
    AuditEventRejectedError,
    DuplicateAuditRowError,
)
from storage.audit_fields import FIELD_WIDTHS
from storage.audit_model import (
    AuditEntry,
    ChainedEvent,
    Checkpoint,
    chain_hash,
)
from storage.audit_reads import QUERY_BATCH, AuditReader
from storage.audit_rows import read_head
from storage.audit_sql import WriterStatements, audit_checkpoints, audit_events, audit_head
from storage.errors import BackendUnavailableError, InvalidRecordError
from storage.sqlite_text import text_as_read

# Re-exported: callers (the tests among them) import these with the log.
__all__ = [
    "QUERY_BATCH",
    "Appended",
    "AuditColumnAlteredError",
    "AuditEventRejectedError",
    "Change",
    "Pending",
    "SqlAuditLog",
    "audit_checkpoints",
    "audit_events",
    "audit_head",
]

T = TypeVar("T")

# A state change that must commit with its audit event: it runs on the audit batch's
# connection, inside that transaction (under a savepoint), and returns its result.
Change = Callable[[Connection], T]


@dataclass(frozen=True, slots=True)
class Pending:
    """An event to append, with the state change (if any) that commits with it."""

    entry: AuditEntry
    change: Change[Any] | None = None


@dataclass(frozen=True, slots=True)
class Appended:
    """What became of one ``Pending``: its event and the change's result, or the
    change's error (then neither it nor its event was written)."""

    event: ChainedEvent | None
    value: Any = None
    error: Exception | None = None


def _sqlite_full_sync(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def _check_widths(entry: AuditEntry) -> None:
    """Last line of defence: the trail normalises entries (``storage.audit_fields``)
    before they get here, so this fails only for a caller that did not."""
    for field, width in FIELD_WIDTHS.items():
        if len(getattr(entry, field)) > width:
            raise InvalidRecordError(field, f"at most {width} characters in an audit event")


def _row_values(event_: ChainedEvent) -> dict[str, Any]:
    e = event_.entry
    return {
        "sequence": event_.sequence,
        "time": e.time.astimezone(UTC),
        "principal": e.principal,
        "application": e.application,
        "role": e.role,
        "action": e.action,
        "resource": e.resource,
        "patient_index": e.patient_index,
        "outcome": e.outcome,
        "status": e.status,
        "reason": e.reason,
        "source": e.source,
        "prev_hash": event_.prev_hash,
        "hash": event_.hash,
    }


class SqlAuditLog(AuditReader):
    """Append-only audit events, their chain head and checkpoints, in SQL."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self._sqlite = engine.dialect.name == "sqlite"
        self._writer: WriterStatements | None = None  # compiled on first use (connected)
        if self._sqlite and not event.contains(engine, "connect", _sqlite_full_sync):
            event.listen(engine, "connect", _sqlite_full_sync)

    def append(self, entries: Sequence[AuditEntry]) -> list[ChainedEvent]:
        """Chain and insert ``entries`` in one transaction, serialised with all writers."""
        done = self.append_pending([Pending(entry) for entry in entries])
        return [a.event for a in done if a.event is not None]

    def append_pending(self, items: Sequence[Pending]) -> list[Appended]:
        """Apply each item's change and append the events, all in one transaction.

        Each change runs under its own savepoint: one that raises is rolled back and
        reported in its ``Appended`` (its event is not written); the others commit with
        their events. Anything else that fails, fails the whole transaction: an outage
        raises ``BackendUnavailableError``, an event the database refuses raises
        ``AuditEventRejectedError`` (the trail then retries events one by one).
        """
        if not items:
            return []
        for item in items:
            _check_widths(item.entry)
        try:
            return self._run(lambda c: self._append_locked(c, items), write=True)
        except DuplicateAuditRowError as e:
            # Only rows written around the head lock collide: fail closed, loudly.
            raise BackendUnavailableError(
                "audit sequence taken by a row written outside the audit writer; "
                "run `medvault audit verify`"
            ) from e

    def run_change(self, change: Change[T]) -> T:
        """Run ``change`` in a transaction of its own (only when auditing is disabled)."""
        return self._run(change, write=True)

    def add_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Store ``checkpoint``; False if another replica's checkpoint came first.

        Under the writers' head lock: a version 2 checkpoint is stored only while its
        predecessor is still the last checkpoint, so two replicas signing at once cannot
        fork the chain of checkpoints (the loser signs again, later).
        """
        values = {
            "sequence": checkpoint.sequence,
            "hash": checkpoint.hash,
            "signature": checkpoint.signature,
            "key_label": checkpoint.key_label,
            "public_key_der": checkpoint.public_key_der,
            "created_at": checkpoint.created_at.astimezone(UTC),
            "version": checkpoint.version,
            "prev_sequence": checkpoint.prev_sequence if checkpoint.version > 1 else None,
            "prev_digest": checkpoint.prev_digest if checkpoint.version > 1 else None,
        }

        def insert(connection: Connection) -> bool:
            self._lock_head(connection)
            with text_as_read(connection):
                last = connection.execute(_LAST_CHECKPOINT_SEQUENCE).scalar() or 0
            if type(last) is not int:  # a database writer's value: never sign past it
                raise BackendUnavailableError(
                    "audit checkpoint sequence malformed; run `medvault audit verify`"
                )
            if last >= checkpoint.sequence or (
                checkpoint.version > 1 and last != checkpoint.prev_sequence
            ):
                return False
            connection.execute(audit_checkpoints.insert().values(**values))
            return True

        try:
            return self._run(insert, write=True)
        except DuplicateAuditRowError:
            return False

    def _append_locked(self, connection: Connection, items: Sequence[Pending]) -> list[Appended]:
        sequence, prev = self._lock_head(connection)
        writer = self._statements(connection)
        done: list[Appended] = []
        rows: list[dict[str, Any]] = []
        for item in items:
            value, error = _apply(connection, item.change) if item.change else (None, None)
            if error is not None:
                done.append(Appended(None, error=error))
                continue
            sequence += 1
            digest = chain_hash(prev, sequence, item.entry)
            event_ = ChainedEvent(sequence, item.entry, prev, digest)
            rows.append(_row_values(event_))
            done.append(Appended(event_, value))
            prev = digest
        if rows:
            writer.insert_events.execute_many(connection, rows)
            writer.update_head.execute(connection, {"sequence": sequence, "hash": prev})
        return done

    def _lock_head(self, connection: Connection) -> tuple[int, bytes]:
        """Take the writers' lock and read the head under it, in one statement.

        The no-op UPDATE takes SQLite's write lock (waiting up to busy_timeout) and
        PostgreSQL's row lock, so concurrent writers, in this process or another
        replica, serialise here; RETURNING reads the head under that lock.
        A malformed head raises ``AuditHeadMalformedError``, an outage to the trail:
        nothing is chained onto a head that cannot be read as the writer stored it.
        """
        with text_as_read(connection):
            row = self._statements(connection).lock_head.execute(connection, {}).one()
        return read_head(row[0], row[1])

    def _statements(self, connection: Connection) -> WriterStatements:
        """The writer's statements as driver SQL (``storage.audit_sql``: the CPU they save)."""
        if self._writer is None:  # two threads may both compile: the same result
            self._writer = WriterStatements.compile(connection.dialect)
        return self._writer


_LAST_CHECKPOINT_SEQUENCE = sa.select(sa.func.max(audit_checkpoints.c.sequence))


def _apply(connection: Connection, change: Change[Any]) -> tuple[Any, Exception | None]:
    """Run ``change`` under a savepoint: its result, or its error after rolling it back.

    If the rollback itself fails (the connection is gone) that error propagates and
    the whole batch fails: only a change's own error is the change's caller's alone.
    """
    savepoint = connection.begin_nested()
    try:
        value = change(connection)
    except Exception as e:  # noqa: BLE001  (reported to the change's caller only)
        savepoint.rollback()
        return None, e
    savepoint.commit()
    return value, None
