"""A call's deadline bounds its SQL statements (``storage.sql_deadlines``), on both backends.

A statement that waits (for a lock another transaction holds, or sleeps on PostgreSQL)
ends with ``DeadlineExceededError`` once the call's time is gone, instead of waiting out
the busy timeout (SQLite, 5 s) or for ever (PostgreSQL); no statement starts after the
deadline; and the connection goes back to the pool with nothing of the deadline left
(the next user, without a deadline, waits as before).
"""

from __future__ import annotations

from collections.abc import Iterator
from threading import Event, Thread

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage import (
    CallDeadline,
    DeadlineExceededError,
    bounded,
    install_statement_deadlines,
    make_engine,
)

pytestmark = pytest.mark.integration

TABLE = "deadline_probe"


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    install_statement_deadlines(engine)
    with engine.begin() as c:
        c.execute(sa.text(f"CREATE TABLE IF NOT EXISTS {TABLE} (n INTEGER)"))
    yield engine
    with engine.begin() as c:
        c.execute(sa.text(f"DROP TABLE {TABLE}"))
    engine.dispose()


def _locked(engine: Engine, held: Event, release: Event) -> None:
    """Hold a write lock on the table until ``release``."""
    with engine.begin() as c:
        c.execute(sa.text(f"INSERT INTO {TABLE} (n) VALUES (1)"))
        if engine.dialect.name == "postgresql":
            c.execute(sa.text(f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE"))
        held.set()
        release.wait(30)


def test_a_statement_waiting_for_a_lock_ends_with_the_deadline(engine: Engine) -> None:
    held, release = Event(), Event()
    holder = Thread(target=_locked, args=(engine, held, release))
    holder.start()
    try:
        assert held.wait(10), "the lock holder did not start"
        with (
            bounded(CallDeadline.within(0.5)),
            pytest.raises(DeadlineExceededError),
            engine.begin() as c,
        ):
            c.execute(sa.text(f"INSERT INTO {TABLE} (n) VALUES (2)"))
    finally:
        release.set()
        holder.join(30)
    # The same pool, no deadline: statements run, and nothing of the cut remains.
    with engine.begin() as c:
        c.execute(sa.text(f"INSERT INTO {TABLE} (n) VALUES (3)"))
        if engine.dialect.name == "postgresql":
            assert c.execute(sa.text("SHOW statement_timeout")).scalar() == "0"
        else:
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_no_statement_starts_after_the_deadline(engine: Engine) -> None:
    deadline = CallDeadline.within(30)
    deadline.stop()  # the call ended
    with bounded(deadline), pytest.raises(DeadlineExceededError), engine.connect() as c:
        c.execute(sa.text(f"SELECT count(*) FROM {TABLE}"))
    with bounded(CallDeadline.within(30)), engine.connect() as c:  # time left: it runs
        assert c.execute(sa.text(f"SELECT count(*) FROM {TABLE}")).scalar() is not None
