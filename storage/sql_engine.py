"""Engines and transactions of the metadata database (SQLite or PostgreSQL).

Engines are tuned per dialect here (SQLite pragmas and file modes, PostgreSQL's pinned
session settings, durable commits, pre-ping). Database errors are translated here:
unreachable or read-only (PostgreSQL standby, ``default_transaction_read_only``; an
unwritable SQLite file) -> ``BackendUnavailableError`` naming the host (never a row's
data), duplicate version -> ``RecordConflictError``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine

from storage import sqlite_guard, sqlite_text
from storage.errors import (
    BackendUnavailableError,
    DatabaseUnreachableError,
    RecordConflictError,
    StorageError,
)
from storage.pg_loads import lenient_loads

# SQLSTATE read_only_sql_transaction: a standby or default_transaction_read_only=on.
READ_ONLY_SQLSTATE = "25006"

T = TypeVar("T")


def make_engine(url: str) -> Engine:
    """An engine for ``url``, tuned per dialect (SQLite pragmas, PostgreSQL pre-ping)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            private_sqlite_files(parsed.database)
        engine = sa.create_engine(parsed, hide_parameters=True)
        sqlite_guard.install(engine)  # a read-only file: UNAVAILABLE, never SIGBUS
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre-ping drops connections a database restart has killed; a short connect
    # timeout reports an outage in seconds.
    connect_args: dict[str, Any] = {"connect_timeout": 5}
    if parsed.get_backend_name() == "postgresql":
        connect_args["options"] = pinned_session_options(parsed.query.get("options"))
    engine = sa.create_engine(
        parsed, hide_parameters=True, pool_pre_ping=True, connect_args=connect_args
    )
    if parsed.get_backend_name() == "postgresql":
        event.listen(engine, "connect", _durable_commits)
    return engine


# The session settings the service's reads depend on, sent in the startup packet so that
# they hold from the first query (SQLAlchemy's dialect set-up runs before any "connect"
# listener) and override defaults a database writer may set with ALTER DATABASE or ALTER
# ROLE: psycopg refuses to load a timestamp under any DateStyle but ISO (its error,
# logged with a traceback, quotes the stored time), returns text as bytes under
# client_encoding SQL_ASCII (every row would read as altered), and renders times and
# intervals by these. Values are those of a stock PostgreSQL.
PINNED_SESSION = ("DateStyle=ISO", "IntervalStyle=postgres", "client_encoding=UTF8",
                  "TimeZone=UTC")  # fmt: skip


def pinned_session_options(operator: object = None) -> str:
    """libpq ``options`` pinning ``PINNED_SESSION``, followed by the operator's own
    ``options`` from the database URL (later ``-c`` settings win: the URL is config, a
    database default is not)."""
    pinned = " ".join(f"-c {setting}" for setting in PINNED_SESSION)
    if isinstance(operator, tuple):  # a URL may repeat a query key
        operator = " ".join(str(o) for o in operator)
    return f"{pinned} {operator}" if operator else pinned


def _durable_commits(dbapi_connection: Any, _record: Any) -> None:
    """Never ``synchronous_commit=off`` in the service's sessions.

    ``off`` (a database's or role's default, often set for speed) acknowledges a COMMIT
    before its WAL is flushed: a crash then loses commits already answered, i.e. audit
    events of reads whose data has left and rows of puts reported stored. A session
    setting overrides those defaults; ``local`` and the synchronous-replication levels
    flush before answering and are kept.
    """
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True  # a SET in a transaction would roll back with it
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            row = cursor.fetchone()
            if row is not None and row[0] == "off":
                cursor.execute("SET synchronous_commit = on")
    finally:
        dbapi_connection.autocommit = autocommit


def private_sqlite_files(path: str) -> None:
    """Create the SQLite file 0600 (and tighten it, and its -wal/-shm, if looser).

    SQLite creates ``-wal`` and ``-shm`` with the main file's permissions, so a main
    file made 0600 here keeps them owner-only too. The rows hold no plaintext patient
    data, but the file is still nobody else's to read or copy.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:
        return  # a missing directory: SQLite reports it on connect, with its own message
    for name in (path, f"{path}-wal", f"{path}-shm", f"{path}-journal"):
        with contextlib.suppress(OSError):  # absent, or not ours: leave it to the operator
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Refuse a file that is not UTF-8, decode text that is not UTF-8 with replacement
    (``storage.sqlite_text``); WAL lets readers run beside the writer; busy_timeout waits
    out a short lock."""
    sqlite_text.check_encoding(dbapi_connection)
    dbapi_connection.text_factory = sqlite_text.decode_text
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()


def _where_label(engine: Engine) -> str:
    """Where the database is, for messages: host and port, or 'local SQLite file'."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return "local SQLite file"
    return f"{url.host or 'localhost'}:{url.port or 'default port'}"


@contextmanager
def translated(engine: Engine) -> Iterator[None]:
    """Translate driver errors; the original stays chained, the message carries no data."""
    try:
        yield
    except exc.IntegrityError as e:
        raise RecordConflictError("that record version (or its object key) exists already") from e
    except (exc.OperationalError, exc.InterfaceError) as e:
        unwritable = isinstance(e.orig, sqlite_guard.UnwritableDatabaseError)
        raise BackendUnavailableError(
            f"metadata database unavailable at {_where_label(engine)} "
            f"({e.orig if unwritable else type(e.orig).__name__}); retry later"
        ) from e
    except exc.InternalError as e:
        # PostgreSQL reports a read-only transaction (a hot standby, or
        # default_transaction_read_only) and a broken transaction state as InternalError:
        # the database cannot take this now, which is an outage, not a bug.
        read_only = getattr(e.orig, "sqlstate", None) == READ_ONLY_SQLSTATE
        what = "is read-only" if read_only else "refused the transaction"
        raise BackendUnavailableError(
            f"metadata database at {_where_label(engine)} {what} "
            f"({type(e.orig).__name__}); retry later"
        ) from e
    except exc.TimeoutError as e:  # the pool's: every connection busy past its timeout
        raise BackendUnavailableError(
            f"metadata database at {_where_label(engine)} busy (no free connection); retry later"
        ) from e
    except exc.SQLAlchemyError as e:
        raise StorageError(f"metadata database error ({type(e).__name__})") from e


def connect(engine: Engine, what: str = "metadata database") -> Connection:
    """A connection from ``engine``; ``DatabaseUnreachableError`` if none can be made.

    Kept apart from the statements so that callers can tell "nothing was sent" (the
    write surely did not commit: its object can go at once) from a connection lost
    mid-transaction (the COMMIT may have taken effect).
    """
    try:
        return engine.connect()
    except (exc.OperationalError, exc.InterfaceError) as e:
        raise DatabaseUnreachableError(
            f"{what} unavailable at {_where_label(engine)} ({type(e.orig).__name__}); retry later"
        ) from e


def run_in_transaction(engine: Engine, fn: Callable[[Connection], T], *, write: bool = False) -> T:
    """Run ``fn`` in one transaction (committed if ``write``), translating driver errors.

    Its rows are read under ``lenient_loads``: on PostgreSQL a value psycopg cannot load
    (a time of ``infinity`` or past 9999) reads as ``UNLOADABLE``, which the stores' strict
    reads (``storage.row_values``) take for a forged row, rather than failing the fetch.
    """
    with translated(engine), connect(engine) as connection, lenient_loads(connection):
        if write:
            with connection.begin():
                return fn(connection)
        return fn(connection)


def translated_change(fn: Callable[[Connection], T]) -> Callable[[Connection], T]:
    """``fn`` reporting driver errors as ``run_in_transaction`` does, for a change that
    runs in another component's transaction (the audit trail's, with its event); what it
    reads, it reads under ``lenient_loads`` as ``run_in_transaction`` does."""

    def change(connection: Connection) -> T:
        with translated(connection.engine), lenient_loads(connection):
            return fn(connection)

    return change
