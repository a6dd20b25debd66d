"""Scheduled runs: that a slot runs once (ledger), and by whom first (election).

* **Ledger** -- ``backup_runs`` (migration ``0006``) has one row per ``(slot, kind)``.
  A replica inserts the row before it runs the slot; one that comes later hits the
  primary key, reads the row and skips if it authenticates (below). This alone keeps a
  slot to one run among honest replicas, with or without the lock: concurrent inserts
  of one key are serialised by the database (PostgreSQL: the second waits for the
  first's commit; SQLite: the write lock), and the loser reads the winner's row.
* **Election** -- an optimisation: while a run is in progress, the replicas that lose
  the lock do not run that kind. PostgreSQL: ``pg_try_advisory_lock`` on a dedicated
  connection held for the whole run (the lock dies with the connection, so a crashed
  replica never leaves it behind). SQLite: ``fcntl.flock`` on a file beside the
  database file (released by the kernel when the process dies). The key and the path
  are public: any session (a database writer's, on PostgreSQL) may hold the lock for
  ever. So a loser does not skip the slot on the lock alone: after a grace period it
  claims the slot itself (``service.backup.scheduler``), and the claim decides.

The database may be written by someone without the token, so a row is evidence only if
its MAC verifies (``storage.backup.run_seal``; column ``mac``, migration ``0015``):

* **A row that does not authenticate does not stop a run.** A claim that hits the
  primary key reads the row under a lock (PostgreSQL: the row's; SQLite: the write lock)
  and, unless it authenticates, replaces it with its own claim in the same transaction
  (:meth:`SqlRunLedger.claim`). A replica that claims the slot next waits for that lock
  and then reads an authentic row: two honest replicas still never both take a slot
  from one row. A row with a MAC that fails, or a value medvault never writes, is
  reported (``on_forged``: the service raises a ``run-tampered`` incident); a row with
  no MAC (written before migration 0015, or by a replica of an earlier release during a
  rolling upgrade) is claimed over with a log line only.
* **A deleted row** lets a replica that looks later claim the slot again: the slot runs
  once more, at most once per replica (each replica fires each slot once). A second
  backup or drill of one slot adds a backup or a drill report; it loses nothing.
  A row put back to its genuine ``running`` claim hides how the run ended, as a
  deletion does; the gauges then show the run before it, with its older time
  (docs/operations.md says which alerts catch that).
* **Legacy rows** (no MAC) are listed as history, never counted as a result
  (``ScheduledRun.auth``): migration 0015 adopts none, since it cannot tell a genuine
  one from a forged one.
* **Only an authentic row read is evidence**, not the database's answer: a row read
  must be the one asked for (its slot and kind, as a view can hand back another), a
  duplicate-key error counts as a claim taken only once the slot's authentic row is
  read (a writer's trigger or constraint raises one on any insert), and a value psycopg
  cannot load (PostgreSQL keeps ``infinity``, years past 9999) reads as a forged value
  (``storage.audit_sql.rows_as_read``) rather than failing the claim or the scrape.
  A lock a writer holds is waited for ``LOCK_WAIT_MS`` at most (PostgreSQL; SQLite's
  ``busy_timeout``): the claim then fails as an outage, logged, and the next slot tries.

Times are stored in UTC, as in ``storage.sql_metadata``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection, Engine

from storage.audit_sql import rows_as_read
from storage.backup.run_model import MAX_DETAIL, RunKind, RunOutcome, ScheduledRun
from storage.backup.run_seal import RunSealer
from storage.errors import BackendUnavailableError, StorageError
from storage.row_values import RowValues
from storage.sql_metadata import metadata, to_utc
from storage.sqlite_text import UNREADABLE_TIME, StoredTime

log = logging.getLogger(__name__)
Forged = Callable[[str], None]  # called with the row's resource, "backup-run/<kind>/<slot>"
# What a claim found in the slot's row: none, an authentic one, or one it replaced.
_Found = Literal["absent", "taken", "legacy", "forged"]
# How long a claim or a finish waits for a row lock on PostgreSQL (a writer may hold one
# for ever); every honest holder's transaction lasts milliseconds.
LOCK_WAIT_MS = 10_000


def _lock_key(kind: RunKind) -> int:
    """A fixed signed 64-bit advisory-lock key per kind ("medvault.backup.<kind>")."""
    digest = hashlib.sha256(f"medvault.backup.{kind}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# The schema as queries see it; migrations 0006 (the table) and 0015 (mac) made it.
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
    sa.Column("mac", sa.LargeBinary(32), nullable=True),
    sa.PrimaryKeyConstraint("slot", "kind", name="pk_backup_runs"),
    sa.CheckConstraint("kind IN ('backup', 'drill')", name="ck_backup_runs_kind"),
    sa.CheckConstraint("outcome IN ('running', 'ok', 'failed')", name="ck_backup_runs_outcome"),
)


def run_resource(slot: datetime, kind: RunKind) -> str:
    """How an incident names a ledger row: ``backup-run/<kind>/<slot, ISO 8601 UTC>``."""
    return f"backup-run/{kind}/{to_utc(slot, 'slot').isoformat()}"


class SqlRunLedger:
    """``backup_runs``: claim a slot once, record how its run ended; every row MACed."""

    def __init__(self, engine: Engine, sealer: RunSealer, on_forged: Forged | None = None) -> None:
        self._engine = engine
        self._sealer = sealer
        self._on_forged = on_forged
        # This ledger's claims not yet finished: finish writes the whole row again
        # (the MAC covers it), from what was claimed rather than from the database.
        self._claims: dict[tuple[datetime, RunKind], ScheduledRun] = {}
        self._lock = threading.Lock()

    def claim(self, slot: datetime, kind: RunKind, replica: str, now: datetime) -> bool:
        """Insert the slot's row; False if another replica claimed it already.

        The primary key is the election. A row already there counts only if it
        authenticates; any other is replaced by this claim (see the module's docstring).
        """
        run = ScheduledRun(
            slot=to_utc(slot, "slot"), kind=kind, replica=replica[:255],
            started_at=to_utc(now, "started_at"), finished_at=None, backup_id=None,
            outcome="running", detail="", auth="authentic",
        )  # fmt: skip
        values = self._values(run)
        try:
            with self._engine.begin() as connection:
                _bound_lock_waits(connection)
                connection.execute(backup_runs.insert().values(**values))
        except exc.IntegrityError:
            found = self._claim_over(run, values)
            if found == "taken":
                return False
        except exc.SQLAlchemyError as e:
            raise _translate(e) from e
        else:
            found = "absent"
        with self._lock:
            self._claims[run.slot, kind] = run
        self._claimed_over(found, run)
        return True

    def _claim_over(self, run: ScheduledRun, values: dict[str, Any]) -> _Found:
        """The slot has a row: "taken" if it authenticates (or another replica's claim
        came in meanwhile); else replace it with ``run`` and say what it replaced."""
        key = (backup_runs.c.slot == run.slot, backup_runs.c.kind == run.kind)
        try:
            with self._engine.begin() as connection:
                _bound_lock_waits(connection)
                # A write first: it locks the row on PostgreSQL (a replica doing the same
                # waits, then reads what this one wrote) and takes SQLite's write lock,
                # so the read and the replacement below are one step.
                connection.execute(
                    backup_runs.update().where(*key).values(replica=backup_runs.c.replica)
                )
                found = self._row(connection, key, run)
                if found is None:  # deleted meanwhile
                    connection.execute(backup_runs.insert().values(**values))
                    return "absent"
                if found.auth == "authentic":
                    return "taken"
                connection.execute(backup_runs.update().where(*key).values(**values))
                return found.auth
        except exc.IntegrityError:
            pass  # inserted meanwhile (another replica's claim), or refused by a writer
        except exc.SQLAlchemyError as e:
            raise _translate(e) from e
        return self._taken(run, key)

    def _taken(self, run: ScheduledRun, key: tuple[Any, ...]) -> _Found:
        """After a duplicate-key error: "taken" if the slot's row now authenticates (an
        honest replica's claim came in first); else a ``StorageError`` (a trigger or
        constraint written outside medvault refuses the claim), never a slot skipped."""
        try:
            with self._engine.connect() as connection:
                found = self._row(connection, key, run)
        except exc.SQLAlchemyError as e:
            raise _translate(e) from e
        if found is not None and found.auth == "authentic":
            return "taken"
        # from None: the driver's message is the trigger's, i.e. the writer's, text.
        raise StorageError(
            f"the metadata database refused the claim of {run_resource(run.slot, run.kind)} "
            "as a duplicate, yet holds no authentic row of it (a trigger or constraint "
            "added outside medvault?); the slot did not run"
        ) from None

    def _row(
        self, connection: Connection, key: tuple[Any, ...], run: ScheduledRun
    ) -> ScheduledRun | None:
        """The slot's row of ``run``'s kind, if any, read leniently and strictly."""
        with rows_as_read(connection):
            row = connection.execute(sa.select(backup_runs).where(*key)).first()
        return None if row is None else self._read(row._mapping, run.kind, run.slot)

    def _claimed_over(self, found: _Found, run: ScheduledRun) -> None:
        """Report the row a claim replaced: forged (an incident), or legacy (logged).
        Never raises: the claim is committed, and its run must go ahead."""
        if found in ("absent", "taken"):
            return
        name = run_resource(run.slot, run.kind)
        if found == "legacy":
            log.warning("backup_runs row without a MAC claimed over: %s", name)
            return
        log.warning("backup_runs row failing authentication claimed over: %s", name)
        if self._on_forged is None:
            return
        try:
            self._on_forged(name)
        except Exception:  # the run matters more than the report; the log line stays
            log.exception("could not report a forged backup_runs row: %s", name)

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
        """Record the end of this ledger's run of ``(slot, kind)``; the row is written
        again if it was deleted or replaced meanwhile."""
        with self._lock:
            claimed = self._claims.pop((to_utc(slot, "slot"), kind), None)
        if claimed is None:
            raise StorageError(f"no {kind} run of slot {slot.isoformat()} claimed here")
        run = replace(
            claimed, finished_at=to_utc(now, "finished_at"), outcome=outcome,
            backup_id=backup_id, detail=detail[:MAX_DETAIL],
        )  # fmt: skip
        values = self._values(run)
        key = (backup_runs.c.slot == run.slot, backup_runs.c.kind == kind)
        try:
            with self._engine.begin() as connection:
                _bound_lock_waits(connection)
                if connection.execute(backup_runs.update().where(*key).values(**values)).rowcount:
                    return
                log.warning("backup_runs row of a run in progress was gone; written again: %s",
                            run_resource(run.slot, kind))  # fmt: skip
                connection.execute(backup_runs.insert().values(**values))
        except exc.SQLAlchemyError as e:
            raise _translate(e) from e

    def list(self, kind: RunKind | None = None, limit: int = 1000) -> list[ScheduledRun]:
        """The newest ``limit`` runs (of ``kind``), newest first, each with its ``auth``."""
        query = sa.select(backup_runs).order_by(backup_runs.c.slot.desc()).limit(limit)
        if kind is not None:
            query = query.where(backup_runs.c.kind == kind)
        try:
            with self._engine.connect() as connection, rows_as_read(connection):
                rows = connection.execute(query).all()
        except exc.SQLAlchemyError as e:
            raise _translate(e) from e
        return [self._read(row._mapping, kind) for row in rows]

    def _values(self, run: ScheduledRun) -> dict[str, Any]:
        """The columns of ``run``'s row, its MAC included."""
        return {
            "slot": run.slot, "kind": run.kind, "replica": run.replica,
            "started_at": run.started_at, "finished_at": run.finished_at,
            "backup_id": run.backup_id, "outcome": run.outcome, "detail": run.detail,
            "mac": self._sealer.mac(run),
        }  # fmt: skip

    def _read(
        self, m: Mapping[Any, Any], asked: RunKind | None, slot: datetime | None = None
    ) -> ScheduledRun:
        """A row read strictly, with whether it authenticates. One that is not the row
        asked for (another kind, or slot) is forged whatever its MAC: a writer's view
        can hand back another genuine row than the one its ``WHERE`` saw."""
        run, mac = _to_run(m, asked)
        if run.unreadable:
            return run  # forged: a value medvault never writes
        if (asked is not None and run.kind != asked) or (slot is not None and run.slot != slot):
            log.warning("backup_runs row read is not the one asked for: %s",
                        run_resource(run.slot, run.kind))  # fmt: skip
            return replace(run, auth="forged")
        if mac is None:
            return replace(run, auth="legacy")
        return replace(run, auth="authentic" if self._sealer.authentic(run, mac) else "forged")


_KINDS: tuple[RunKind, ...] = ("backup", "drill")  # ck_backup_runs_kind
_OUTCOMES: tuple[RunOutcome, ...] = ("running", "ok", "failed")


def _to_run(m: Mapping[Any, Any], asked: RunKind | None) -> tuple[ScheduledRun, bytes | None]:
    """A row read strictly (``storage.row_values``), and its MAC. One holding a value
    medvault never writes is listed, never dropped (a run is not lost) and never as a
    success: failed and forged, finished at its own time if that reads, else at the
    placeholder time, of the kind asked for (else ``backup``), with its columns in
    ``unreadable`` and a log line."""
    v = RowValues(m)
    slot, started = v.time("slot"), v.time("started_at")
    finished, backup_id = v.optional_time("finished_at"), v.optional_text("backup_id")
    replica, detail = v.text("replica"), v.text("detail")
    kind_text, outcome_text = v.text("kind"), v.text("outcome")
    mac = v.optional_binary("mac")
    kind = next((k for k in _KINDS if k == kind_text), None)
    outcome = next((o for o in _OUTCOMES if o == outcome_text), None)
    bad = list(v.malformed)
    bad += [n for n, ok in (("kind", kind), ("outcome", outcome)) if ok is None and n not in bad]
    if not bad and kind is not None and outcome is not None:
        run = ScheduledRun(slot, kind, replica, started, finished, backup_id, outcome, detail)
        return run, mac
    log.warning("backup_runs row listed as failed: a value medvault never writes (%s)",
                ", ".join(bad))  # fmt: skip
    return ScheduledRun(
        slot=slot, kind=kind or asked or "backup", replica=replica, started_at=started,
        finished_at=finished or UNREADABLE_TIME, backup_id=backup_id, outcome="failed",
        detail="row unreadable: " + ", ".join(bad), unreadable=tuple(bad), auth="forged",
    ), None  # fmt: skip


def _bound_lock_waits(connection: Connection) -> None:
    """On PostgreSQL, wait ``LOCK_WAIT_MS`` at most for a lock in this transaction
    (then LockNotAvailable: an outage). SQLite bounds its waits by ``busy_timeout``."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = {LOCK_WAIT_MS}")  # an int


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
