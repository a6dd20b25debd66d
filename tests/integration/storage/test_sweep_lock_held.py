"""The orphan sweep's election lock held by a stranger (cold review, as cold review 9h
found for the backup scheduler): a session without the token holding the lock's
public key stopped every sweep for ever, silently. A replica that finds the lock held
for a whole grace now claims the round through the ledger's atomic claim and sweeps
without it, with a warning: the round is swept once, by one of two replicas.

Real SeaweedFS and database (SQLite and PostgreSQL). The sweep's clock is injected
(``now``) instead of waiting out the orphan grace; the lock's grace is shortened.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage import sweeper
from storage.backup.runs import _lock_key, sqlite_lock_path
from storage.record_types import OBJECT_PREFIX
from storage.sql_metadata import SqlMetadataStore, make_engine
from storage.sweeper import SweepResult, sweep_if_due
from storage.work_ledger import WorkLedger, scheduled_work
from storage.work_seal import WorkSealer
from tests.fixtures.seaweed import S3Bucket

pytestmark = pytest.mark.integration
HOUR = timedelta(hours=1)


@pytest.fixture
def engine(metadata_engine: Engine) -> Engine:
    """The store tests' database, with no sweep on record."""
    with metadata_engine.begin() as c:
        c.execute(scheduled_work.delete())
    return metadata_engine


@contextmanager
def stranger_holds(engine: Engine) -> Iterator[None]:
    """A session without the token holds the sweep's election lock for the block."""
    if engine.dialect.name == "sqlite":
        fd = os.open(sqlite_lock_path(engine, "sweep"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield
        finally:
            os.close(fd)
        return
    stranger = make_engine(engine.url.render_as_string(hide_password=False))
    try:
        with stranger.connect() as holder:
            holder.execute(sa.select(sa.func.pg_advisory_lock(_lock_key("sweep"))))
            holder.commit()
            yield
    finally:
        stranger.dispose()


def test_a_lock_held_for_ever_stops_no_sweep_and_two_replicas_sweep_once(
    engine: Engine, work_sealer: WorkSealer, s3_bucket: S3Bucket,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.setattr(sweeper, "LOCK_GRACE", timedelta(seconds=0.3), raising=False)
    orphan = f"{OBJECT_PREFIX}{secrets.token_hex(16)}"
    s3_bucket.client.put_object(s3_bucket.name, orphan, io.BytesIO(b"x" * 64), 64)
    later = datetime.now(UTC) + 2 * HOUR
    url = engine.url.render_as_string(hide_password=False)
    engines = [make_engine(url) for _ in range(2)]
    results: dict[str, SweepResult | Exception | None] = {}
    start = threading.Barrier(2)

    def replica(name: str, own: Engine) -> None:
        start.wait()
        try:
            results[name] = sweep_if_due(
                WorkLedger(own, work_sealer), s3_bucket.store, SqlMetadataStore(own),
                grace=HOUR, interval=HOUR, replica=name, now=later,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001  (reported below)
            results[name] = e

    try:
        with stranger_holds(engine), caplog.at_level(logging.WARNING, logger="storage.sweeper"):
            threads = [threading.Thread(target=replica, args=(f"r{i}", e))
                       for i, e in enumerate(engines)]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        for e in engines:
            e.dispose()
    swept = [r for r in results.values() if isinstance(r, SweepResult)]
    assert len(results) == 2, results
    assert not [r for r in results.values() if isinstance(r, Exception)], results
    assert len(swept) == 1, f"the round was swept {len(swept)} times: {results}"
    assert swept[0].removed == 1
    assert orphan not in {b.key for b in s3_bucket.store.list()}
    assert any("without the lock" in r.getMessage() for r in caplog.records)


def test_a_round_is_claimed_once_by_concurrent_replicas(
    engine: Engine, work_sealer: WorkSealer
) -> None:
    """Without the lock, the claim alone keeps a round to one replica: eight claims of
    one round at once, ten rounds, one winner each (on the row's first insert and on
    its update)."""
    url = engine.url.render_as_string(hide_password=False)
    engines = [make_engine(url) for _ in range(8)]
    at = datetime.now(UTC)
    try:
        for n in range(10):
            if n % 2 == 0:  # the row's first insert; else its update
                with engine.begin() as c:
                    c.execute(scheduled_work.delete())
            won = _claim_together([WorkLedger(e, work_sealer) for e in engines], at + n * HOUR)
            assert len(won) == 1, f"round {n} claimed by {won}"
    finally:
        for e in engines:
            e.dispose()


def _claim_together(ledgers: list[WorkLedger], when: datetime) -> list[str]:
    """Each ledger claims the round at ``when`` at once; the replicas that won it."""
    won: list[str] = []
    start = threading.Barrier(len(ledgers))

    def claim(i: int, own: WorkLedger) -> None:
        start.wait()
        if own.claim("sweep", HOUR * 0.9, when, f"r{i}"):
            won.append(f"r{i}")

    threads = [threading.Thread(target=claim, args=(i, e)) for i, e in enumerate(ledgers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won


@pytest.mark.parametrize("finished", [False, True])
def test_a_sweep_longer_than_the_interval_is_no_incident_a_stranger_still_is(
    engine: Engine, work_ledger: WorkLedger, s3_bucket: S3Bucket,
    monkeypatch: pytest.MonkeyPatch, finished: bool,
) -> None:  # fmt: skip
    """Cold review 11c: a replica's sweep of a large bucket (its first checks every
    object's tag) runs past the interval, holding the lock; the next round is swept
    without it, beside it. That is no database writer's doing: no ``run-missed``
    incident (every round of a long sweep raised one). Once the sweep that held the
    lock has finished, a lock still held is a stranger's: the incident stays."""
    monkeypatch.setattr(sweeper, "LOCK_GRACE", timedelta(seconds=0.1), raising=False)
    now = datetime.now(UTC)
    # r0 claimed the last round an interval ago and, holding the lock, is still sweeping
    # it (or, ``finished``, swept it and let go; a stranger took the lock).
    first = sweep_if_due(work_ledger, s3_bucket.store, SqlMetadataStore(engine), grace=HOUR,
                         interval=HOUR, replica="r0", now=now - HOUR)  # fmt: skip
    assert first is not None
    if not finished:
        with engine.begin() as c:  # as r0's claim leaves the ledger until its sweep ends
            c.execute(scheduled_work.delete().where(scheduled_work.c.name != "sweep"))
    reported: list[str] = []
    with stranger_holds(engine):
        swept = sweep_if_due(
            work_ledger, s3_bucket.store, SqlMetadataStore(engine), grace=HOUR, interval=HOUR,
            replica="r1", now=now, on_lock_held=reported.append,
        )  # fmt: skip
    assert swept is not None, "the round was not swept"
    assert reported == (["sweep"] if finished else []), reported


@pytest.mark.parametrize("mac", [None, secrets.token_bytes(32)], ids=["no-mac", "bad-mac"])
def test_a_database_writer_refreshing_the_ledger_row_starves_no_sweep(
    engine: Engine, work_ledger: WorkLedger, forged_work: list[str], s3_bucket: S3Bucket,
    mac: bytes | None,
) -> None:  # fmt: skip
    """Cold review 11c: the writer dated the ``sweep`` row to now before each round and
    every replica skipped every sweep, silently. Now the row carries a MAC: one that
    fails is no run on record (the round is swept) and is reported; one with none (a
    legacy row: before migration 0016) is claimed over with a log line only."""
    now = datetime.now(UTC)
    with engine.begin() as c:  # the writer, just before the round
        c.execute(scheduled_work.insert().values(name="sweep", last_run_at=now, replica="r9",
                                                 mac=mac))  # fmt: skip
    swept = sweep_if_due(work_ledger, s3_bucket.store, SqlMetadataStore(engine), grace=HOUR,
                         interval=HOUR, replica="r1", now=now)  # fmt: skip
    assert swept is not None, "the round was skipped for a row nobody's sweep wrote"
    assert forged_work == ([] if mac is None else ["scheduled-work/sweep"])
    assert work_ledger.last_run("sweep") == (now, "r1")  # the claim replaced the row
