"""Refuse a SQLite database that cannot be written, before SQLite touches it.

In WAL mode SQLite maps the ``-shm`` file (the WAL index) into memory, shared by every
connection of the process. If that file becomes immutable (``chattr +i``) or otherwise
unwritable while mapped, the next write to the mapping, which any read or write
transaction makes, kills the process with SIGBUS: no exception, no status code, no
audit event. SQLite offers no way to map it privately without giving up sharing the
database with other processes (``locking_mode=EXCLUSIVE``), so medvault checks first:
every time a connection is taken from the pool, the database file, its ``-wal`` and
``-shm`` files and their directory must be writable (``os.access``, which also sees
the immutable flag and read-only mounts, even for root). If one is not, the
connection goes back to the pool unused and the call fails with
``UnwritableDatabaseError`` (an ``OperationalError``, so UNAVAILABLE); it works again
as soon as the files are writable. The check costs four ``access`` calls per
transaction (an ``lstat`` more only for a file ``access`` refuses, to tell a missing
file from an unwritable one), on path strings built once per engine: it runs before
every audit batch, and building ``Path`` objects per call cost more than the calls.

What it cannot cover: a file made unwritable in the middle of a transaction that has
already passed the check. That window is one transaction long; closing it would need
SQLite's shared memory to live outside the file system.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)
_SUFFIXES = ("", "-wal", "-shm")


class UnwritableDatabaseError(sqlite3.OperationalError):
    """The SQLite database file, a companion file or its directory is not writable."""


def unwritable(database: Path) -> str | None:
    """What makes ``database`` unusable for writing, or None if nothing does."""
    return _Files(database).problem()


class _Files:
    """A database's directory and files as strings, made once, checked many times."""

    __slots__ = ("_directory", "_files", "_name")

    def __init__(self, database: Path) -> None:
        self._name = database.name
        self._directory = str(database.parent)
        self._files = tuple(
            (database.name + suffix, str(database.with_name(database.name + suffix)))
            for suffix in _SUFFIXES
        )

    def problem(self) -> str | None:
        """What makes the database unusable for writing, or None if nothing does."""
        if not os.access(self._directory, os.W_OK | os.X_OK):
            return f"directory of {self._name} is read-only"
        for name, path in self._files:
            # access() is False for a missing file too: only then ask whether it exists
            # (a missing -wal or -shm is fine, SQLite creates it in the writable directory).
            if not os.access(path, os.W_OK) and os.path.lexists(path):
                return f"{name} is read-only or immutable"
        return None


def install(engine: Engine) -> None:
    """Check writability each time ``engine`` hands out a connection (file databases).

    Install before any other ``connect`` listener: a new connection is checked too.
    """
    name = engine.url.database
    if not name or name == ":memory:" or name.startswith("file:"):
        return
    files = _Files(Path(name).absolute())
    last: list[str | None] = [None]  # the problem seen by the previous check
    lock = threading.Lock()

    def check(connection: Connection) -> None:
        problem = files.problem()
        with lock:
            changed, last[0] = problem != last[0], problem
        if changed:
            # Once per change, not per call: a refused database is refused thousands of
            # times a second under load.
            if problem:
                log.error("database not writable; calls fail", extra={"problem": problem})
            else:
                log.warning("database writable again")
        if problem is not None:
            connection.close()  # back to the pool without a statement: nothing mapped is touched
            raise sa.exc.OperationalError(
                "check database files", None, UnwritableDatabaseError(problem)
            )

    def check_new(_dbapi_connection: object, _record: object) -> None:
        # Before the connection's pragmas (WAL), so that start-up names the problem.
        problem = files.problem()
        if problem is not None:
            raise UnwritableDatabaseError(problem)

    event.listen(engine, "connect", check_new)
    event.listen(engine, "engine_connect", check)
