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

Durability: the engine's SQLite connections are set to ``synchronous=FULL`` (in WAL
mode ``NORMAL`` may lose the last commits on power loss, and an audit event must never
be acknowledged and then lost). On PostgreSQL the engine's sessions never run with
``synchronous_commit=off`` (``storage.sql_metadata.make_engine``).
Group commit (``service.audit.trail``) pays for the fsync once per batch instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine

from storage.audit_fields import FIELD_WIDTHS
from storage.audit_model import (
    AuditEntry,
    AuditFilter,
    ChainedEvent,
    Checkpoint,
    chain_hash,
)
from storage.audit_rows import read_head, to_checkpoint, to_event
from storage.audit_sql import (
    HEAD_ID,
    SELECT_CHECKPOINTS,
    SELECT_EVENTS,
    WriterStatements,
    audit_checkpoints,
    audit_events,
    audit_head,
    rows_as_read,
    time_parser,
)
from storage.errors import (
    BackendUnavailableError,
    IntegrityError,
    InvalidRecordError,
    StorageError,
)
from storage.sql_metadata import connect
from storage.sqlite_text import bindable, text_as_read

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


QUERY_BATCH: Final = 500  # rows per round trip when streaming a query


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


def _filtered(query: sa.Select[Any], flt: AuditFilter) -> sa.Select[Any]:
    """``query`` narrowed by every field of ``flt`` that is set."""
    c = audit_events.c
    conditions: list[sa.ColumnElement[bool]] = []
    if flt.since is not None:
        conditions.append(c.time >= flt.since.astimezone(UTC))
    if flt.until is not None:
        conditions.append(c.time < flt.until.astimezone(UTC))
    if flt.principal is not None:
        conditions.append(c.principal == flt.principal)
    if flt.patient_index is not None:
        conditions.append(c.patient_index == flt.patient_index)
    if flt.action is not None:
        conditions.append(c.action == flt.action)
    if flt.outcome is not None:
        conditions.append(c.outcome == flt.outcome)
    return query.where(*conditions) if conditions else query


def _compared(flt: AuditFilter) -> tuple[str, ...]:
    """The columns ``_filtered`` compares with a value of their type, for ``flt``."""
    fields = (("time", flt.since is not None or flt.until is not None),
              ("principal", flt.principal is not None),
              ("patient_index", flt.patient_index is not None),
              ("action", flt.action is not None), ("outcome", flt.outcome is not None))  # fmt: skip
    return tuple(name for name, used in fields if used)


class SqlAuditLog:
    """Append-only audit events, their chain head and checkpoints, in SQL."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        # Events are read with the time column raw and parsed per row (audit_rows), so
        # a stored value that does not parse marks its row instead of failing the fetch
        # (on PostgreSQL psycopg parses it, leniently: audit_sql.rows_as_read).
        self._parse_time = time_parser(engine.dialect)
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
        except _DuplicateError as e:
            # Only rows written around the head lock collide: fail closed, loudly.
            raise BackendUnavailableError(
                "audit sequence taken by a row written outside the audit writer; "
                "run `medvault audit verify`"
            ) from e

    def run_change(self, change: Change[T]) -> T:
        """Run ``change`` in a transaction of its own (only when auditing is disabled)."""
        return self._run(change, write=True)

    def head(self) -> tuple[int, bytes]:
        """The sequence and hash of the last committed event (0 and zeros when empty).

        ``AuditHeadMalformedError`` if the row holds a value the writer never stores.
        """
        query = sa.select(audit_head.c.sequence, audit_head.c.hash).where(
            audit_head.c.id == HEAD_ID
        )

        def select(c: Connection) -> Any:
            with text_as_read(c):
                return c.execute(query).one()

        row = self._run(select)
        return read_head(row.sequence, row.hash)

    def events(self, after_sequence: int = 0, limit: int = QUERY_BATCH) -> list[ChainedEvent]:
        """Up to ``limit`` events with sequence > ``after_sequence``, in sequence order."""
        query = (
            SELECT_EVENTS.where(audit_events.c.sequence > after_sequence)
            .order_by(audit_events.c.sequence)
            .limit(limit)
        )
        return [to_event(m, self._parse_time) for m in self._select_rows(query)]

    def query(self, flt: AuditFilter) -> Iterator[ChainedEvent]:
        """Events matching ``flt``, oldest first unless ``newest_first``; fetched in pages.

        A malformed row (``storage.audit_rows``) is yielded as a placeholder whose
        ``malformed`` names its fields, as ``events`` does: the caller leaves it out of
        what it shows and reports it (``service.audit.listing``); ``verify`` names it
        as altered. It counts against ``flt.limit``. Rows at sequence 0 or below are
        outside the chain and are not listed.
        """
        remaining = flt.limit
        cursor: Any = None
        seq = audit_events.c.sequence
        while remaining is None or remaining > 0:
            page = QUERY_BATCH if remaining is None else min(remaining, QUERY_BATCH)
            # The chain's positions only, as ``events`` (what verification walks): a row
            # a database writer put at 0 or below is in no chain and never shown.
            query = _filtered(SELECT_EVENTS, flt).where(seq > 0)
            if cursor is not None:
                query = query.where(seq < cursor if flt.newest_first else seq > cursor)
            query = query.order_by(seq.desc() if flt.newest_first else seq).limit(page)
            rows = self._select_rows(query, _compared(flt))
            for m in rows:
                yield to_event(m, self._parse_time)
            if len(rows) < page:
                return
            # As stored: the next page starts past it (text that is not UTF-8 included).
            cursor = bindable(rows[-1]["sequence"])
            if remaining is not None:
                remaining -= len(rows)

    def _select_rows(self, query: sa.Select[Any], compared: tuple[str, ...] = ()) -> list[Any]:
        """The rows' mappings, the time column unparsed (see ``__init__``), text that is
        not UTF-8 as ``Undecodable`` (``sqlite_text.text_as_read``) and, on PostgreSQL, a
        value psycopg cannot load as ``UNLOADABLE`` (``audit_sql.rows_as_read``).
        ``compared``: the columns the query's filter compares (``AuditColumnAlteredError``)."""

        def select(c: Connection) -> list[Any]:
            with rows_as_read(c):
                return [r._mapping for r in c.execute(query).all()]

        return self._run(select, compared=compared)

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
        except _DuplicateError:
            return False

    def checkpoints(self, after_sequence: int = 0) -> list[Checkpoint]:
        """Checkpoints past ``after_sequence``, oldest first (one per N events: few).

        A malformed row is a placeholder naming its fields (``storage.audit_rows``).
        """
        query = SELECT_CHECKPOINTS.where(audit_checkpoints.c.sequence > after_sequence).order_by(
            audit_checkpoints.c.sequence
        )
        return [to_checkpoint(m, self._parse_time) for m in self._select_rows(query)]

    def last_checkpoint(self) -> Checkpoint | None:
        """The checkpoint with the highest sequence, or None (a placeholder if malformed)."""
        query = SELECT_CHECKPOINTS.order_by(audit_checkpoints.c.sequence.desc()).limit(1)
        rows = self._select_rows(query)
        return to_checkpoint(rows[0], self._parse_time) if rows else None

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

    def _run(
        self, fn: Callable[[Connection], T], *, write: bool = False, compared: tuple[str, ...] = ()
    ) -> T:
        """Run ``fn`` in one transaction (committed if ``write``), translating errors."""
        # Connected apart: a failure to connect is DatabaseUnreachableError (nothing
        # sent, so a put's object can go at once), unlike a connection lost later.
        with (
            _translated(self._engine, compared),
            connect(self._engine, "audit database") as connection,
        ):
            if write:
                with connection.begin():
                    return fn(connection)
            return fn(connection)


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


class AuditEventRejectedError(StorageError):
    """The database refused an event or a batch for its content, not for an outage
    (e.g. a value it cannot store): retrying the events one by one isolates it."""


class AuditColumnAlteredError(IntegrityError):
    """A filtered listing's column no longer has the type the audit writer created:
    PostgreSQL cannot compare it with the filter's value (a database writer retyped it).
    Names the columns, never a value; an integrity failure, not an outage."""

    def __init__(self, columns: tuple[str, ...]) -> None:
        self.columns = columns
        named = " or ".join(f"audit_events.{c}" for c in columns)
        super().__init__(
            f"{named} altered: its type is not the one the audit writer created; "
            "run `medvault audit verify`"
        )


# PostgreSQL's undefined_function (no operator for the column's type and the value's)
# and datatype_mismatch: on a filter's column, the column's type was changed.
_TYPE_ALTERED: Final = frozenset({"42883", "42804"})


class _DuplicateError(StorageError):
    """A row with that key exists already (internal: add_checkpoint turns it into False)."""


# InternalError covers PostgreSQL's read-only transactions (hot standby, or
# default_transaction_read_only); ProgrammingError a missing table (not migrated);
# TimeoutError is the connection pool's.
_OUTAGES = (
    exc.OperationalError,
    exc.InterfaceError,
    exc.InternalError,
    exc.ProgrammingError,
    exc.TimeoutError,
)


@contextmanager
def _translated(engine: Engine, compared: tuple[str, ...] = ()) -> Iterator[None]:
    """Driver errors become storage errors; the message names no row data.

    ``compared``: the columns the statement compares with values of their own type; a
    comparison PostgreSQL no longer has an operator for is ``AuditColumnAlteredError``.
    """
    try:
        yield
    except exc.IntegrityError as e:
        raise _DuplicateError("audit row exists already") from e
    except exc.ProgrammingError as e:
        if compared and getattr(e.orig, "sqlstate", None) in _TYPE_ALTERED:
            raise AuditColumnAlteredError(compared) from None  # its text may quote a value
        raise _unavailable(engine, e) from e
    except _OUTAGES as e:
        raise _unavailable(engine, e) from e
    except (exc.DBAPIError, exc.StatementError, ValueError) as e:
        # Refused for what was sent (a value the column or driver cannot take).
        raise AuditEventRejectedError(f"audit database refused a value ({type(e).__name__})") from e
    except exc.NoResultFound as e:
        raise BackendUnavailableError("audit head row missing; run the migrations") from e
    except exc.SQLAlchemyError as e:
        raise StorageError(f"audit database error ({type(e).__name__})") from e


def _unavailable(engine: Engine, e: Exception) -> BackendUnavailableError:
    """The database cannot be written now (unreachable, locked, read-only): every
    caller fails closed, and retrying event by event would only wait longer."""
    url = engine.url
    where = (
        "local SQLite file"
        if engine.dialect.name == "sqlite"
        else f"{url.host or 'localhost'}:{url.port or 'default port'}"
    )
    name = type(e.orig).__name__ if isinstance(e, exc.DBAPIError) else type(e).__name__
    return BackendUnavailableError(f"audit database unavailable at {where} ({name}); retry later")
