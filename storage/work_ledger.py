"""When periodic work last ran, cluster-wide: one run per interval, not one per replica.

Each replica wakes on its own timer; the election lock (``storage.backup.runs.elected``)
only keeps two runs from overlapping. The winner of a round also asks this ledger
whether another replica ran the work within the interval, and skips if so, so the work
runs about once per interval however many replicas there are. The check and the update
happen under the election lock, so two replicas never both claim one round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage.row_values import RowValues
from storage.sql_metadata import metadata, run_in_transaction, to_utc
from storage.sqlite_text import StoredTime

# The schema as queries see it; storage/migrations/versions/0012_replicas.py made it.
scheduled_work = sa.Table(
    "scheduled_work",
    metadata,
    sa.Column("name", sa.String(32), nullable=False),
    sa.Column("last_run_at", StoredTime(), nullable=False),
    sa.Column("replica", sa.String(255), nullable=False),
    sa.PrimaryKeyConstraint("name", name="pk_scheduled_work"),
)
log = logging.getLogger(__name__)


def claim_round(
    engine: Engine, name: str, min_gap: timedelta, now: datetime, replica: str
) -> bool:
    """Record a run of ``name`` at ``now`` unless one ran less than ``min_gap`` before.

    Call it holding the election lock for ``name``; True means this replica runs now.
    A last run dated more than ``min_gap`` ahead of ``now`` is ignored (claimed over).
    """
    at = to_utc(now, "now")

    def claim(connection: sa.Connection) -> bool:
        query = sa.select(scheduled_work.c.last_run_at).where(scheduled_work.c.name == name)
        row = connection.execute(query).first()
        last = None if row is None else _last_run_at(row._mapping, name)
        # A last run more than one gap ahead is no replica's clock drift but a forged
        # date (a database writer's): honouring it would stop the work for ever.
        if last is not None and -min_gap < at - last < min_gap:
            return False
        values = {"last_run_at": at, "replica": replica[:255]}
        if row is None:
            connection.execute(scheduled_work.insert().values(name=name, **values))
        else:
            connection.execute(
                scheduled_work.update().where(scheduled_work.c.name == name).values(**values)
            )
        return True

    return run_in_transaction(engine, claim, write=True)


def last_run(engine: Engine, name: str) -> tuple[datetime, str] | None:
    """When ``name`` last ran and on which replica; None if never."""
    query = sa.select(scheduled_work.c.last_run_at, scheduled_work.c.replica).where(
        scheduled_work.c.name == name
    )
    row = run_in_transaction(engine, lambda c: c.execute(query).first())
    if row is None:
        return None
    v = RowValues(row._mapping)
    at, by = v.time("last_run_at"), v.text("replica")
    if v.malformed:
        _log_malformed(name, v.malformed)
        return None  # as claim_round reads it: no run on record, the round is claimable
    return at, by


def _last_run_at(row: Mapping[Any, Any], name: str) -> datetime | None:
    """The row's last run, or None if it is of another type than a time: a database
    writer's value must not stop the work (the round is claimed over, as for a date
    ahead) nor raise with the value in its message."""
    v = RowValues(row)
    at = v.time("last_run_at")
    if v.malformed:
        _log_malformed(name, v.malformed)
        return None
    return at


def _log_malformed(name: str, columns: list[str]) -> None:
    log.warning(
        "scheduled_work row of %s read as no run: a value of another type than its "
        "column's (%s)", name, ", ".join(columns),
    )  # fmt: skip
