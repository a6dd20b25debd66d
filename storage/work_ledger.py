"""When periodic work last ran, cluster-wide: one run per interval, not one per replica.

Each replica wakes on its own timer; the election lock (``storage.backup.runs.elected``)
only keeps two runs from overlapping. The winner of a round also asks this ledger
whether another replica ran the work within the interval, and skips if so, so the work
runs about once per interval however many replicas there are. The claim is atomic by
itself (:meth:`WorkLedger.claim`), so two replicas never both claim one round, with or
without the lock: a replica that finds the lock held for a whole grace claims without it.

The database may be written by someone without the token, so a ``scheduled_work`` row
is evidence only if its MAC verifies (``storage.work_seal``; column ``mac``, migration
``0016``). Before it, a writer who dated the ``sweep`` row to now before each round made
every replica skip every sweep, silently for ever (cold review 11c):

* **A row that does not authenticate is no run on record.** A claim reads the row under
  its lock and, unless it authenticates, replaces it with its own claim in the same
  transaction; a replica claiming next waits for that lock and reads an authentic row,
  so a forged row never lets two replicas run one round. A row whose MAC fails, or with
  a value medvault never writes, is reported (``on_forged``: the service raises a
  ``run-tampered`` incident naming ``scheduled-work/<name>``), by a claim and by a read
  (:meth:`WorkLedger.last_run`); a row with no MAC (written before migration 0016, or
  by a replica of an earlier release during a rolling upgrade) is logged only, and
  after the upgrade claimed over once.
* **A deleted row** (or one without a MAC) makes the work due: it runs once more. For
  ``<name>:done`` it reads as a run still going (:meth:`WorkLedger.unfinished`): a
  stranger's election lock is taken for that run's, the round runs beside it with a
  warning but no ``run-missed`` incident, one round per deletion.
* **A genuine row put back** to an earlier state of itself is an older time: the work
  is due sooner, never later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from storage.row_values import RowValues
from storage.sql_metadata import metadata, run_in_transaction, to_utc
from storage.sqlite_text import StoredTime
from storage.work_seal import WorkSealer

# The schema as queries see it; migrations 0012 (the table) and 0016 (mac) made it.
scheduled_work = sa.Table(
    "scheduled_work",
    metadata,
    sa.Column("name", sa.String(32), nullable=False),
    sa.Column("last_run_at", StoredTime(), nullable=False),
    sa.Column("replica", sa.String(255), nullable=False),
    sa.Column("mac", sa.LargeBinary(32), nullable=True),
    sa.PrimaryKeyConstraint("name", name="pk_scheduled_work"),
)
log = logging.getLogger(__name__)
# How long a claim waits for a row lock on PostgreSQL (a writer may hold one for ever).
LOCK_WAIT_MS = 10_000
Forged = Callable[[str], None]  # called with the row's resource, "scheduled-work/<name>"
_Auth = Literal["authentic", "legacy", "forged"]


@dataclass(frozen=True, slots=True)
class _Row:
    """A ``scheduled_work`` row as read, and whether it authenticates."""

    at: datetime
    replica: str
    auth: _Auth

    def within(self, now: datetime, gap: timedelta) -> bool:
        """Whether this is an authentic run less than ``gap`` before (or after) ``now``.
        One more than a gap ahead is no replica's clock drift: honouring it would stop
        the work until then."""
        return self.auth == "authentic" and -gap < now - self.at < gap


def work_resource(name: str) -> str:
    """How an incident names a ledger row: ``scheduled-work/<name>``."""
    return f"scheduled-work/{name}"


class WorkLedger:
    """``scheduled_work``: claim a round of periodic work once; every row MACed."""

    def __init__(self, engine: Engine, sealer: WorkSealer, on_forged: Forged | None = None) -> None:
        self._engine = engine
        self._sealer = sealer
        self._on_forged = on_forged

    @property
    def engine(self) -> Engine:
        """The database the ledger is in (the work's election lock is taken there too)."""
        return self._engine

    def claim(self, name: str, min_gap: timedelta, now: datetime, replica: str) -> bool:
        """Record a run of ``name`` at ``now`` unless one ran less than ``min_gap`` before.

        True means this replica runs now. An atomic claim, with or without the election
        lock (a stranger may hold that for ever: ``storage.sweeper``): the row is written
        (locked) before it is read, so a replica claiming the same round waits for this
        claim's commit and then reads it; a first claim inserts with ``ON CONFLICT DO
        NOTHING``, so of two first claims one inserts and the other claims nothing.
        Only an authentic row can turn a claim away (the module's docstring); one dated
        more than ``min_gap`` ahead of ``now`` is ignored (claimed over).
        """
        at, by = to_utc(now, "now"), replica[:255]
        values = {"last_run_at": at, "replica": by, "mac": self._sealer.mac(name, at, by)}
        key = scheduled_work.c.name == name

        def claim(connection: sa.Connection) -> tuple[bool, _Row | None]:
            if connection.dialect.name == "postgresql":  # a writer's row lock: 10 s at most
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = {LOCK_WAIT_MS}")
            # A write first: it locks the row on PostgreSQL and takes SQLite's write lock,
            # so the read and the update below are one step for every claimer.
            connection.execute(
                scheduled_work.update().where(key).values(name=scheduled_work.c.name)
            )
            found = self._read(connection, name)
            if found is not None and found.within(at, min_gap):
                return False, found
            if found is not None:
                connection.execute(scheduled_work.update().where(key).values(**values))
                return True, found
            insert = (pg_insert if connection.dialect.name == "postgresql" else sqlite_insert)(
                scheduled_work
            ).values(name=name, **values)
            # RETURNING, not rowcount: psycopg's rowcount of this statement reads -1 here.
            done = insert.on_conflict_do_nothing().returning(scheduled_work.c.name)
            return connection.execute(done).first() is not None, None

        won, found = run_in_transaction(self._engine, claim, write=True)
        if won and found is not None and found.auth != "authentic":
            self._unauthentic(name, found, "claimed over")
        return won

    def record_done(self, name: str, now: datetime, replica: str) -> None:
        """Record that a run of ``name`` claimed by ``replica`` ended at ``now`` (the row
        ``<name>:done``): a later claimant can tell a run still going from a stranger."""
        self.claim(f"{name}:done", timedelta(0), now, replica)

    def unfinished(self, name: str) -> tuple[datetime, str] | None:
        """The last claim of ``name`` (time, replica) if no run ended since (``record_done``):
        a run still going, or one killed before its end (the next run that ends clears it).
        Two runs overlapping may end out of order and leave the earlier's end on record: the
        next round then takes a stranger's lock for a run's, once (its own end clears it)."""
        claimed, done = self.last_run(name), self.last_run(f"{name}:done")
        if claimed is None or (done is not None and done[0] >= claimed[0]):
            return None
        return claimed

    def last_run(self, name: str) -> tuple[datetime, str] | None:
        """When ``name`` last ran and on which replica; None if never, or if its row does
        not authenticate (reported, as by a claim)."""
        found = run_in_transaction(self._engine, lambda c: self._read(c, name))
        if found is None:
            return None
        if found.auth != "authentic":
            self._unauthentic(name, found, "read as no run")
            return None
        return found.at, found.replica

    def _read(self, connection: sa.Connection, name: str) -> _Row | None:
        """The row of ``name``, if any, read strictly, with whether it authenticates. The
        MAC is checked over the name asked for: a row a writer's view hands back for
        another name does not verify."""
        query = sa.select(scheduled_work).where(scheduled_work.c.name == name)
        row = connection.execute(query).first()
        return None if row is None else self._row(row._mapping, name)

    def _row(self, m: Mapping[Any, Any], name: str) -> _Row:
        v = RowValues(m)
        at, by, mac = v.time("last_run_at"), v.text("replica"), v.optional_binary("mac")
        if v.malformed:
            _log_malformed(name, v.malformed)
            return _Row(at, by, "forged")  # a value medvault never writes
        if mac is None:
            return _Row(at, by, "legacy")
        return _Row(at, by, "authentic" if self._sealer.authentic(name, at, by, mac) else "forged")

    def _unauthentic(self, name: str, found: _Row, what: str) -> None:
        """Log a row that is no evidence and report a forged one. Never raises: a claim
        is committed by then, and its work must go ahead."""
        resource = work_resource(name)
        if found.auth == "legacy":
            log.warning("scheduled_work row without a MAC %s: %s", what, resource)
            return
        log.warning("scheduled_work row failing authentication %s: %s", what, resource)
        if self._on_forged is None:
            return
        try:
            self._on_forged(resource)
        except Exception:  # the work matters more than the report; the log line stays
            log.exception("could not report a forged scheduled_work row: %s", resource)


def _log_malformed(name: str, columns: list[str]) -> None:
    log.warning(
        "scheduled_work row of %s read as no run: a value of another type than its "
        "column's (%s)", name, ", ".join(columns),
    )  # fmt: skip
