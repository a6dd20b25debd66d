"""The audit trail's tables, and the three statements its writer runs in every transaction.

Those three (the head lock, an ``UPDATE ... RETURNING``; the events ``INSERT``, one
executemany; the head ``UPDATE``) are compiled once per dialect into the driver's own SQL
(SQLite's qmark, psycopg's pyformat with its casts) and run with
``Connection.exec_driver_sql``, each value converted by the bind processor SQLAlchemy
would apply (its column type's, for that dialect). Through ``Connection.execute`` every
execution paid for a compile-cache lookup and the construction and bind processing of
its parameters (per row of the executemany): skipping them cut the CPU of a one-event
append by ~20-25 % on SQLite, of a 64-event one by ~35 %; on PostgreSQL by ~9 % and
0-15 %, psycopg's own work dominating there (issue 12, bench/sql_paths.py). The bytes
stored are those of the Core statements, which stay defined here as the source of the
compiled SQL (tests/integration/storage/test_audit_driver_sql.py compares both). The
connection, its transaction, its listeners (``before_cursor_execute``:
``storage.sql_deadlines``) and the wrapping of driver errors are SQLAlchemy's as before.

Reading: the audit's reads run under ``storage.sqlite_text.text_as_read``, so that text
that is not UTF-8 reads as a marker (a malformed field, named by ``storage.audit_rows``),
not as the replaced text every connection reads, which the audit could not tell from
genuine.
``rows_as_read`` adds, on PostgreSQL, a value psycopg cannot load (a time past year
9999, a json number of 5000 digits, ...) read as a marker (``pg_loads.UNLOADABLE``)
instead of failing the whole fetch (``storage.pg_loads``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, cast

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection, CursorResult, Dialect
from sqlalchemy.sql.compiler import SQLCompiler

from storage.audit_rows import TimeParser
from storage.pg_loads import lenient_loads
from storage.sql_metadata import metadata
from storage.sqlite_text import exact_time_parser, text_as_read

HEAD_ID: Final = 1

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("sequence", sa.BigInteger, autoincrement=False, nullable=False),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("principal", sa.String(255), nullable=False),
    sa.Column("application", sa.String(255), nullable=False),
    sa.Column("role", sa.String(64), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("resource", sa.String(255), nullable=False),
    sa.Column("patient_index", sa.LargeBinary(32), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("source", sa.String(255), nullable=False),
    sa.Column("prev_hash", sa.LargeBinary(32), nullable=False),
    sa.Column("hash", sa.LargeBinary(32), nullable=False),
    # Named as migration 0002 names them (the backup's errors name a constraint).
    sa.PrimaryKeyConstraint("sequence", name="pk_audit_events"),
)

audit_head = sa.Table(
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, autoincrement=False, nullable=False),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.LargeBinary(32), nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_audit_head"),
    # Migration 0002's; declared here too, for the backup checks its rows against the
    # constraints of these tables (storage/backup/constraints.py).
    sa.CheckConstraint(f"id = {HEAD_ID}", name="ck_audit_head_single_row"),
)

audit_checkpoints = sa.Table(
    "audit_checkpoints",
    metadata,
    sa.Column("sequence", sa.BigInteger, autoincrement=False, nullable=False),
    sa.Column("hash", sa.LargeBinary(32), nullable=False),
    sa.Column("signature", sa.LargeBinary, nullable=False),
    sa.Column("key_label", sa.String(255), nullable=False),
    sa.Column("public_key_der", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # Version 2 checkpoints also sign their predecessor (migration 0008); v1 rows: 1, NULLs.
    sa.Column("version", sa.SmallInteger, nullable=False, server_default="1"),
    sa.Column("prev_sequence", sa.BigInteger, nullable=True),
    sa.Column("prev_digest", sa.LargeBinary(32), nullable=True),
    sa.PrimaryKeyConstraint("sequence", name="pk_audit_checkpoints"),
)

# The writer's lock: a no-op UPDATE of the head row, reading it under the lock it takes.
LOCK_HEAD: Final = (
    audit_head.update()
    .where(audit_head.c.id == HEAD_ID)
    .values(sequence=audit_head.c.sequence)
    .returning(audit_head.c.sequence, audit_head.c.hash)
)
INSERT_EVENTS: Final = audit_events.insert()
UPDATE_HEAD: Final = audit_head.update().where(audit_head.c.id == HEAD_ID)  # sequence, hash

_PER_CALL: Final = object()  # a slot whose value each execution supplies
DriverParams = tuple[Any, ...] | dict[str, Any]


class DriverStatement:
    """A Core statement compiled once for one dialect, executed as the driver's SQL."""

    __slots__ = ("_names", "_positional", "_slots", "sql")

    def __init__(
        self, statement: sa.ClauseElement, dialect: Dialect, column_keys: Sequence[str] = ()
    ) -> None:
        compiled = cast(
            SQLCompiler, statement.compile(dialect=dialect, column_keys=list(column_keys) or None)
        )
        if (
            compiled.escaped_bind_names
            or compiled.literal_execute_params
            or compiled.post_compile_params
        ):
            raise ValueError("a statement whose parameters SQLAlchemy rewrites per execution")
        self.sql: Final = str(compiled)
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        self._positional: Final = dialect.positional
        self._names: Final = tuple(compiled.positiontup or ()) if self._positional else tuple(binds)
        slots = []
        for name in self._names:
            process = binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            fixed: Any = _PER_CALL
            if not binds[name].required:  # a value given in the statement, e.g. HEAD_ID
                value = binds[name].effective_value
                fixed = value if process is None else process(value)
            slots.append((name, process, fixed))
        self._slots: Final = tuple(slots)

    def bind(self, values: Mapping[str, Any]) -> DriverParams:
        """``values`` by parameter name, converted and laid out as the driver takes them.

        A value its processor refuses raises ``StatementError`` (no value in its
        message), as the same value would through ``Connection.execute``.
        """
        try:
            converted = [
                fixed if fixed is not _PER_CALL else (process(values[n]) if process else values[n])
                for n, process, fixed in self._slots
            ]
        except Exception as e:  # whatever a processor raises, as SQLAlchemy wraps it
            raise exc.StatementError("a value could not be bound", self.sql, None, e) from e
        return (
            tuple(converted) if self._positional else dict(zip(self._names, converted, strict=True))
        )

    def execute(
        self, connection: Connection, values: Mapping[str, Any]
    ) -> CursorResult[*tuple[Any, ...]]:
        """Run the statement once, on ``connection`` and in its transaction."""
        return connection.exec_driver_sql(self.sql, self.bind(values))

    def execute_many(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run the statement for each of ``rows`` (one executemany)."""
        connection.exec_driver_sql(self.sql, [self.bind(row) for row in rows])


@dataclass(frozen=True, slots=True)
class WriterStatements:
    """The writer's three statements, compiled for one dialect."""

    lock_head: DriverStatement
    insert_events: DriverStatement
    update_head: DriverStatement

    @classmethod
    def compile(cls, dialect: Dialect) -> WriterStatements:
        """Compile them for ``dialect`` (a connected engine's: initialised)."""
        return cls(
            DriverStatement(LOCK_HEAD, dialect),
            DriverStatement(INSERT_EVENTS, dialect),
            DriverStatement(UPDATE_HEAD, dialect, ("sequence", "hash")),
        )


@contextmanager
def rows_as_read(connection: Connection) -> Iterator[None]:
    """``text_as_read`` (SQLite) and ``lenient_loads`` (PostgreSQL): text that is not
    UTF-8 reads as ``Undecodable``, a value psycopg cannot load as ``UNLOADABLE``, in
    this block's queries.

    A database writer may give any audit column such a value (or type); the driver
    would fail the whole fetch on the first, often with the value in its message,
    making every listing, ``audit verify``, the break-the-glass queue and the backup an
    outage instead of naming the row. A genuine row reads exactly as before (the chain
    hashes the event as read).

    Around reads of whole audit rows and the backup snapshot; the head row and the
    last checkpoint's sequence hold no time and are read under ``text_as_read`` (the
    writer's head lock runs with every append: it pays for nothing it does not read).
    """
    with text_as_read(connection), lenient_loads(connection):
        yield


def _time_untyped(table: sa.Table, time_column: str) -> sa.Select[Any]:
    """All of ``table``'s columns, the time one untyped: no parsing by SQLAlchemy that
    would raise during the fetch (each row's time is parsed in ``storage.audit_rows``;
    psycopg's own loading is made lenient by ``rows_as_read``)."""
    return sa.select(
        *(
            sa.type_coerce(c, sa.types.NullType()).label(c.name) if c.name == time_column else c
            for c in table.c
        )
    )


SELECT_EVENTS = _time_untyped(audit_events, "time")
SELECT_CHECKPOINTS = _time_untyped(audit_checkpoints, "created_at")


def time_parser(dialect: Dialect) -> TimeParser:
    """The dialect's parser of a stored audit time (SQLite keeps text; ``audit_rows``),
    accepting only the exact text the column's type writes (``exact_time_parser``: SQL
    compares that text in a since/until window, the chain's hash covers the instant)."""
    return exact_time_parser(audit_events.c.time.type, dialect)
