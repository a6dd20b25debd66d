"""Scheduled runs: which replica runs a slot (election) and that it runs once (ledger).

Two mechanisms, because each covers what the other cannot:

* **Election** -- while a run is in progress, only the replica holding the lock runs.
  PostgreSQL: ``pg_try_advisory_lock`` on a dedicated connection held for the whole run
  (the lock dies with the connection, so a crashed replica never leaves it behind).
  SQLite: ``fcntl.flock`` on a file beside the database file (released by the kernel
  when the process dies). Only replicas on one machine can share a SQLite file, so a
  local file lock is enough.
* **Ledger** -- ``backup_runs`` (migration ``0006``) has one row per ``(slot, kind)``.
  The winner inserts the row before it starts; a replica that gets the lock later
  (after the first finished) hits the primary key and skips. Without the ledger a slow
  replica would run the slot a second time.

Times are stored in UTC, as in ``storage.sql_metadata``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Engine

from storage.errors import BackendUnavailableError, StorageError
from storage.row_values import RowValues
from storage.sql_metadata import metadata, to_utc
from storage.sqlite_text import UNREADABLE_TIME, StoredTime

RunKind = Literal["backup", "drill", "sweep"]  # sweep: the orphan sweeper (lock only)
RunOutcome = Literal["running", "ok", "failed"]
MAX_DETAIL = 1000
log = logging.getLogger(__name__)


def _lock_key(kind: RunKind) -> int:
    """A fixed signed 64-bit advisory-lock key per kind ("medvault.backup.<kind>")."""
    digest = hashlib.sha256(f"medvault.backup.{kind}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# The schema as queries see it; storage/migrations/versions/0006_backup_runs.py made it.
backup_runs = sa.Table(
    "backup_runs",
    metadata,
    sa.Column("slot", StoredTime(), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("replica", sa.String(255), nullable=False),
    sa.Column("started_at", StoredTime(), nullable=False),
    sa.Column("finished_at", StoredTime(), nullable=True),
    sa.Column("backup_id", sa.String(64), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("detail", sa.String(MAX_DETAIL), nullable=False, server_default=""),
    sa.PrimaryKeyConstraint("slot", "kind", name="pk_backup_runs"),
    sa.CheckConstraint("kind IN ('backup', 'drill')", name="ck_backup_runs_kind"),
    sa.CheckConstraint("outcome IN ('running', 'ok', 'failed')", name="ck_backup_runs_outcome"),
)


@dataclass(frozen=True, slots=True)
class ScheduledRun:
    """One row of ``backup_runs``."""

    slot: datetime
    kind: RunKind
    replica: str
    started_at: datetime
    finished_at: datetime | None
    backup_id: str | None
    outcome: RunOutcome
    detail: str
    # Columns of the row holding a value medvault never writes (another type, or a kind
    # or outcome outside the constraint's): the run is then listed as failed.
    unreadable: tuple[str, ...] = ()


class SqlRunLedger:
    """``backup_runs``: claim a slot once, record how its run ended."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def claim(self, slot: datetime, kind: RunKind, replica: str, now: datetime) -> bool:
        """Insert the slot's row; False if another replica claimed it already."""
        values = {
            "slot": to_utc(slot, "slot"), "kind": kind, "replica": replica[:255],
            "started_at": to_utc(now, "started_at"), "outcome": "running", "detail": "",
        }  # fmt: skip
        try:
            with self._engine.begin() as connection:
                connection.execute(backup_runs.insert().values(**values))
        except exc.IntegrityError:
            return False
        except exc.SQLAlchemyError as e:
            raise _translate(e) from e
        return True

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
        query = (
            backup_runs.update()
            .where(backup_runs.c.slot == to_utc(slot, "slot"), backup_runs.c.kind == kind)
            .values(
                finished_at=to_utc(now, "finished_at"), outcome=outcome,
                backup_id=backup_id, detail=detail[:MAX_DETAIL],
            )
        )  # fmt: skip
        try:
            with self._engine.begin() as connection:
                connection.execute(query)
        except exc.SQLAlchemyError as e:
            raise _translate(e) from e

    def list(self, kind: RunKind | None = None, limit: int = 1000) -> list[ScheduledRun]:
        """The newest ``limit`` runs (of ``kind``), newest first."""
        query = sa.select(backup_runs).order_by(backup_runs.c.slot.desc()).limit(limit)
        if kind is not None:
            query = query.where(backup_runs.c.kind == kind)
        try:
            with self._engine.connect() as connection:
                rows = connection.execute(query).all()
        except exc.SQLAlchemyError as e:
            raise _translate(e) from e
        return [_to_run(row._mapping, kind) for row in rows]


_KINDS: tuple[RunKind, ...] = ("backup", "drill")  # ck_backup_runs_kind
_OUTCOMES: tuple[RunOutcome, ...] = ("running", "ok", "failed")


def _to_run(m: Any, asked: RunKind | None) -> ScheduledRun:
    """A row read strictly (``storage.row_values``). One holding a value medvault never
    writes is listed, never dropped (a run is not lost) and never as a success: failed,
    finished at its own time if that reads, else at the placeholder time, of the kind
    asked for (else ``backup``), with its columns in ``unreadable`` and a log line."""
    v = RowValues(m)
    slot, started = v.time("slot"), v.time("started_at")
    finished, backup_id = v.optional_time("finished_at"), v.optional_text("backup_id")
    replica, detail = v.text("replica"), v.text("detail")
    kind_text, outcome_text = v.text("kind"), v.text("outcome")
    kind = next((k for k in _KINDS if k == kind_text), None)
    outcome = next((o for o in _OUTCOMES if o == outcome_text), None)
    bad = list(v.malformed)
    bad += [n for n, ok in (("kind", kind), ("outcome", outcome)) if ok is None and n not in bad]
    if not bad and kind is not None and outcome is not None:
        return ScheduledRun(slot, kind, replica, started, finished, backup_id, outcome, detail)
    log.warning("backup_runs row listed as failed: a value medvault never writes (%s)",
                ", ".join(bad))  # fmt: skip
    return ScheduledRun(
        slot=slot, kind=kind or asked or "backup", replica=replica, started_at=started,
        finished_at=finished or UNREADABLE_TIME, backup_id=backup_id, outcome="failed",
        detail="row unreadable: " + ", ".join(bad), unreadable=tuple(bad),
    )  # fmt: skip


def _translate(e: exc.SQLAlchemyError) -> StorageError:
    # InternalError: PostgreSQL read-only (standby, default_transaction_read_only).
    if isinstance(e, exc.OperationalError | exc.InterfaceError | exc.InternalError):
        return BackendUnavailableError(
            f"metadata database unavailable ({type(e.orig).__name__}); retry later"
        )
    return StorageError(f"metadata database error ({type(e).__name__})")


@contextmanager
def elected(engine: Engine, kind: RunKind) -> Iterator[bool]:
    """Hold the replica lock for ``kind`` for the block; yields False if another has it."""
    if engine.url.get_backend_name() == "postgresql":
        with _advisory_lock(engine, _lock_key(kind)) as won:
            yield won
        return
    with _file_lock(sqlite_lock_path(engine, kind)) as won:
        yield won


@contextmanager
def _advisory_lock(engine: Engine, key: int) -> Iterator[bool]:
    """A session-level advisory lock on a connection of its own, held for the block."""
    try:
        connection = engine.connect()
    except exc.SQLAlchemyError as e:
        raise _translate(e) from e
    with connection:
        try:
            won = bool(connection.scalar(sa.select(sa.func.pg_try_advisory_lock(key))))
            connection.commit()  # end the implicit transaction; the session lock stays
        except exc.SQLAlchemyError as e:
            raise _translate(e) from e
        try:
            yield won
        finally:
            if won:
                _release(connection, key)


def _release(connection: sa.Connection, key: int) -> None:
    try:
        connection.scalar(sa.select(sa.func.pg_advisory_unlock(key)))
        connection.commit()
    except exc.SQLAlchemyError:
        # A broken connection released the lock already; drop it rather than reuse it.
        connection.invalidate()


def sqlite_lock_path(engine: Engine, kind: RunKind) -> Path:
    """``<database file>.<kind>.lock``; an in-memory database gets a per-process file."""
    database = engine.url.database or ""
    if not database or database == ":memory:":
        return Path(f"/tmp/medvault-{os.getpid()}.{kind}.lock")  # noqa: S108  (private db)
    return Path(f"{database}.{kind}.lock")


@contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """A non-blocking exclusive ``flock`` on ``path`` (created 0600), held for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
