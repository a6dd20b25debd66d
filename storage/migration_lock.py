"""One migration at a time per database, whichever process or replica starts it.

Replicas started together on an empty database would each run the migrations, and the
second would fail on a table the first just made (or worse, interleave). ``upgrade``
holds this lock for its whole run; whoever waits migrates after the first finished and
finds the schema at head (a no-op).

* PostgreSQL: ``pg_advisory_lock`` on a fixed key, on a connection of its own held for
  the block (session-level: it dies with the connection, so a crashed migrator never
  leaves it behind), waited for up to ``lock_timeout`` so a stuck migrator is reported
  rather than waited on forever.
* SQLite: a blocking ``fcntl.flock`` on ``<database file>.migrate.lock`` (released by
  the kernel when the process dies). Only processes on one machine share a SQLite file.
  An in-memory database is private to its process: nothing to lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Engine

from storage.errors import BackendUnavailableError

# A fixed signed 64-bit key; differs from the scheduler's keys (storage.backup.runs).
MIGRATION_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"medvault.migrations").digest()[:8], "big", signed=True
)
WAIT_SECONDS = 300.0  # a migration of a large database may take minutes
_POLL_SECONDS = 0.05


@contextmanager
def migration_lock(engine: Engine, wait_seconds: float = WAIT_SECONDS) -> Iterator[None]:
    """Hold the database's migration lock for the block (waiting for another holder)."""
    if engine.url.get_backend_name() == "postgresql":
        with _advisory_lock(engine, wait_seconds):
            yield
        return
    database = engine.url.database or ""
    if not database or database == ":memory:":
        yield
        return
    with _file_lock(f"{database}.migrate.lock", wait_seconds):
        yield


def _timed_out(wait_seconds: float) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"another process has been migrating the metadata database for over "
        f"{wait_seconds:.0f} s; retry once it has finished"
    )


@contextmanager
def _advisory_lock(engine: Engine, wait_seconds: float) -> Iterator[None]:
    # Polled with pg_try_advisory_lock rather than a blocking pg_advisory_lock, so the
    # wait is bounded without a server-side lock_timeout on this session.
    with engine.connect() as connection:
        deadline = time.monotonic() + wait_seconds
        try_lock = sa.select(sa.func.pg_try_advisory_lock(MIGRATION_LOCK_KEY))
        while not connection.scalar(try_lock):
            connection.commit()
            if time.monotonic() > deadline:
                raise _timed_out(wait_seconds)
            time.sleep(_POLL_SECONDS)
        connection.commit()  # end the implicit transaction; the session lock stays
        try:
            yield
        finally:
            try:
                connection.scalar(sa.select(sa.func.pg_advisory_unlock(MIGRATION_LOCK_KEY)))
                connection.commit()
            except exc.SQLAlchemyError:
                connection.invalidate()  # a broken connection released the lock already


@contextmanager
def _file_lock(path: str, wait_seconds: float) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _timed_out(wait_seconds) from None
                time.sleep(_POLL_SECONDS)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
