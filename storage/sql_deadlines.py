"""SQL statements bounded by the deadline of the call they run for (``storage.deadlines``).

PostgreSQL: before each statement of a call with a deadline, ``SET LOCAL
statement_timeout`` to the time the call has left, so the server cancels a statement
(a lock wait included) that would outlive the call. LOCAL ends with the transaction:
a connection back in the pool carries nothing to its next user (the audit writer, the
sweeper, which have no deadline). SQLite: the busy timeout (the wait for another
writer's lock) is cut to the time left, and set back after the statement. Once no time
is left, no statement is sent. Work with no deadline runs exactly as before.

A statement stopped for the deadline raises ``DeadlineExceededError``, not an outage.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from storage.deadlines import check_deadline, time_left
from storage.errors import DeadlineExceededError

SQLITE_BUSY_MS = 5000  # storage.sql_engine's PRAGMA busy_timeout, restored after a cut
_QUERY_CANCELED = "57014"  # PostgreSQL's SQLSTATE for a statement timeout or cancel
_CUT = "medvault_busy_cut"
_MAX_MS = 2**31 - 1  # PostgreSQL's largest statement_timeout (a client may ask for days)


def install_statement_deadlines(engine: Engine) -> None:
    """Bound ``engine``'s statements by the current call's deadline."""
    if engine.dialect.name == "postgresql":
        event.listen(engine, "before_cursor_execute", _postgres_before)
    elif engine.dialect.name == "sqlite":
        event.listen(engine, "before_cursor_execute", _sqlite_before)
        event.listen(engine, "after_cursor_execute", _sqlite_after)
    event.listen(engine, "handle_error", _deadline_error)


def _millis() -> int | None:
    """The time left in whole milliseconds (at least 1), None without a deadline."""
    left = time_left()
    if left is None:
        return None
    check_deadline("a database statement")
    return min(max(1, math.ceil(left * 1000)), _MAX_MS)


def _postgres_before(_conn: Any, cursor: Any, *_args: Any) -> None:
    ms = _millis()
    if ms is not None:
        with cursor.connection.cursor() as setter:  # the statement's cursor may be named
            setter.execute(f"SET LOCAL statement_timeout = {ms}")  # an int: nothing to quote


def _sqlite_before(conn: Any, cursor: Any, *_args: Any) -> None:
    ms = _millis()
    if ms is not None and ms < SQLITE_BUSY_MS:
        cursor.connection.execute(f"PRAGMA busy_timeout = {ms}")
        conn.info[_CUT] = True


def _sqlite_after(conn: Any, cursor: Any, *_args: Any) -> None:
    if conn.info.pop(_CUT, False):
        cursor.connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")


def _deadline_error(context: Any) -> BaseException | None:
    """A statement cut short by the call's deadline is the deadline's error."""
    connection = context.connection
    if connection is not None and connection.info.pop(_CUT, False):
        raw = connection.connection.dbapi_connection
        if raw is not None:
            raw.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
    left = time_left()
    if left is None or isinstance(context.original_exception, DeadlineExceededError):
        return None
    sqlstate = getattr(context.original_exception, "sqlstate", None)
    if left == 0.0 or sqlstate == _QUERY_CANCELED:
        return DeadlineExceededError(
            "the call's deadline passed during a database statement; it was stopped"
        )
    return None
