"""A database writer (no token) against the orphan sweep's ledger rows, SQLite and PostgreSQL.

``scheduled_work`` rows carry a MAC under a key derived in the token
(``storage.work_seal``) over the row's name, time and replica. Before it, a writer could
hide a stranger holding the sweep's election lock by writing a ``sweep:done`` row that
made the last sweep look still running (no ``run-missed`` incident, ever), and a genuine
row copied to another name or re-dated counted there (another work's fresh row copied
onto ``sweep`` skipped the round; the ``sweep`` row copied onto ``sweep:done`` made a
sweep still running look ended). Now such a row is no run on record, and is reported.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage import WorkLedger, sweeper
from storage.sql_metadata import SqlMetadataStore
from storage.sweeper import LockHeld, SweepResult, sweep_if_due
from storage.work_ledger import scheduled_work
from tests.fixtures.seaweed import S3Bucket
from tests.integration.storage.test_sweep_lock_held import stranger_holds

pytestmark = pytest.mark.integration
HOUR = timedelta(hours=1)


@pytest.fixture
def engine(metadata_engine: Engine) -> Engine:
    """The store tests' database, with no scheduled work on record."""
    with metadata_engine.begin() as c:
        c.execute(scheduled_work.delete())
    return metadata_engine


def _sweep(
    ledger: WorkLedger, bucket: S3Bucket, now: datetime, on_lock_held: LockHeld | None = None
) -> SweepResult | None:
    """Replica r1's sweep round at ``now`` (the interval and the orphans' grace: an hour)."""
    return sweep_if_due(
        ledger, bucket.store, SqlMetadataStore(ledger.engine), grace=HOUR, interval=HOUR,
        replica="r1", now=now, on_lock_held=on_lock_held,
    )  # fmt: skip


def _copy(engine: Engine, source: str, target: str, **changed: object) -> None:
    """What a database writer does with a genuine row: its columns, MAC included, written
    as the row of ``target`` (replacing it), with ``changed`` columns."""
    with engine.begin() as c:
        row = c.execute(sa.select(scheduled_work).where(scheduled_work.c.name == source)).one()
        values = {**row._mapping, **changed, "name": target}
        c.execute(scheduled_work.delete().where(scheduled_work.c.name == target))
        c.execute(scheduled_work.insert().values(**values))


def test_a_forged_done_row_hides_no_stranger_holding_the_lock(
    engine: Engine, work_ledger: WorkLedger, forged_work: list[str], s3_bucket: S3Bucket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The last round was swept and ended; a stranger holds the lock. The writer dates
    ``sweep:done`` before that round's claim, so the sweep looks still running: the
    round was swept beside it with a warning, and nothing reported the stranger."""
    monkeypatch.setattr(sweeper, "LOCK_GRACE", timedelta(seconds=0.1))
    now = datetime.now(UTC)
    assert _sweep(work_ledger, s3_bucket, now - HOUR) is not None
    with engine.begin() as c:
        c.execute(scheduled_work.update().where(scheduled_work.c.name == "sweep:done").values(
            last_run_at=now - 2 * HOUR, mac=secrets.token_bytes(32),
        ))  # fmt: skip
    missed: list[str] = []
    with stranger_holds(engine):
        swept = _sweep(work_ledger, s3_bucket, now, on_lock_held=missed.append)
    assert swept is not None
    assert "scheduled-work/sweep:done" in forged_work, (forged_work, missed)
    assert work_ledger.last_run("sweep:done") == (now, "r1")  # the sweep's end replaced it


def test_another_works_fresh_row_copied_onto_the_sweep_skips_no_round(
    engine: Engine, work_ledger: WorkLedger, forged_work: list[str], s3_bucket: S3Bucket
) -> None:
    """Replay: a genuine row of other periodic work, claimed now, copied (MAC and all)
    onto ``sweep``: the MAC binds the name, so it is no sweep on record."""
    now = datetime.now(UTC)
    assert work_ledger.claim("other-work", HOUR * 0.9, now, "r7")
    _copy(engine, "other-work", "sweep")
    assert _sweep(work_ledger, s3_bucket, now) is not None, "the round was skipped"
    assert forged_work == ["scheduled-work/sweep"]


def test_an_earlier_rounds_row_dated_anew_skips_no_round(
    engine: Engine, work_ledger: WorkLedger, forged_work: list[str], s3_bucket: S3Bucket
) -> None:
    """Replay: the sweep's genuine row of an earlier round, its time set to now (its MAC
    kept): the MAC binds the time, so the round is swept."""
    now = datetime.now(UTC)
    assert _sweep(work_ledger, s3_bucket, now - HOUR) is not None
    _copy(engine, "sweep", "sweep", last_run_at=now)
    assert _sweep(work_ledger, s3_bucket, now) is not None, "the round was skipped"
    assert forged_work == ["scheduled-work/sweep"]


def test_the_claim_copied_onto_its_end_leaves_the_sweep_running(
    engine: Engine, work_ledger: WorkLedger, forged_work: list[str]
) -> None:
    """Replay: a sweep claimed and still running; the writer copies its ``sweep`` row
    onto ``sweep:done``, so the sweep looked ended (and the next round, finding the lock
    held, reported a stranger). The MAC binds the name: the sweep is still running."""
    now = datetime.now(UTC)
    work_ledger.record_done("sweep", now - HOUR, "r0")
    assert work_ledger.claim("sweep", HOUR * 0.9, now, "r0")
    _copy(engine, "sweep", "sweep:done")
    assert work_ledger.unfinished("sweep") == (now, "r0")
    assert forged_work == ["scheduled-work/sweep:done"]
