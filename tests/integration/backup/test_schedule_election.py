"""Election and the slot ledger: replicas racing for the same slots run each one once.

Four scheduler processes share one database (PostgreSQL, or one SQLite file on this
machine) and a one-second interval schedule. Each job appends its slot to a shared
file (O_APPEND: one write per line), so a slot run twice shows up twice. The service
level test (``test_schedule_replicas``) does the same with real backups.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11Config, Pkcs11SessionPool
from service.backup.scheduler import IntervalSchedule, JobResult, ScheduledJob, Scheduler
from storage.audit_model import AuditEntry
from storage.backup.run_seal import RunSealer
from storage.backup.runs import SqlRunLedger, backup_runs, elected
from storage.sql_metadata import make_engine, upgrade
from tests.fixtures.databases import new_database
from tests.fixtures.softhsm import SoftHsmToken

pytestmark = pytest.mark.integration
REPLICAS = 4
# Counted, not timed (process start-up and each slot take longer on a slow host): the
# replicas run until SLOTS slots ran with all of them up, at most CAP_SECONDS.
SLOTS = 5
CAP_SECONDS = 90.0


@pytest.fixture
def shared_database(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    for url in new_database(request, database_url, tmp_path_factory, migrated=True):
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url


def _replica(
    url: str, token: Pkcs11Config, log_path: str, name: str, ready: Any, stop: Any
) -> None:
    """One replica: a scheduler whose job records its slot; counts itself in ``ready``
    once started, and runs until ``stop`` is set (at most CAP_SECONDS)."""
    engine = make_engine(url)
    pool = Pkcs11SessionPool(token)  # the ledger's rows are MACed in the token
    audited: list[AuditEntry] = []

    def job(slot: datetime) -> JobResult:
        line = f"{slot.isoformat()} {name}\n".encode()
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        time.sleep(0.3)  # long enough that the others look while the lock is held
        return JobResult(backup_id="", ok=True, detail=name)

    scheduler = Scheduler(
        [ScheduledJob("backup", IntervalSchedule(1), job)],
        SqlRunLedger(engine, RunSealer(Pkcs11BlindIndexer(pool))),
        partial(elected, engine),
        audited.append,
        replica=name,
    )
    scheduler.start()
    with ready.get_lock():
        ready.value += 1
    stop.wait(CAP_SECONDS)
    scheduler.stop()
    pool.close()
    engine.dispose()


def _rows(engine: Engine) -> list[sa.Row[tuple[datetime, str, str]]]:
    with engine.connect() as connection:
        query = sa.select(backup_runs.c.slot, backup_runs.c.replica, backup_runs.c.outcome)
        return list(connection.execute(query).all())


def test_each_slot_runs_once_across_replicas(
    shared_database: str, softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    log_path = tmp_path / "runs.log"
    spawn = multiprocessing.get_context("spawn")
    ready, stop = spawn.Value("i", 0), spawn.Event()
    args = (shared_database, softhsm_token.config, str(log_path))
    processes = [
        spawn.Process(target=_replica, args=(*args, f"r{i}", ready, stop)) for i in range(REPLICAS)
    ]

    def runs() -> int:
        return len(log_path.read_text().splitlines()) if log_path.exists() else 0

    for process in processes:
        process.start()
    try:
        began = time.monotonic()
        while ready.value < REPLICAS and time.monotonic() - began < CAP_SECONDS:
            time.sleep(0.1)
        all_up = runs()
        while runs() < all_up + SLOTS and time.monotonic() - began < CAP_SECONDS:
            time.sleep(0.1)
    finally:
        stop.set()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert ready.value == REPLICAS, f"only {ready.value} replicas started"

    lines = log_path.read_text().splitlines()
    slots = Counter(line.split()[0] for line in lines)
    twice = [slot for slot, n in slots.items() if n > 1]
    assert not twice, f"slots run more than once: {twice}"
    engine = make_engine(shared_database)
    try:
        rows = _rows(engine)
    finally:
        engine.dispose()
    assert len(rows) == len(lines), "every run has its ledger row and every row its run"
    assert all(row.outcome == "ok" for row in rows)
    assert len(rows) >= all_up + SLOTS, f"only {len(rows) - all_up} slots ran with all replicas up"


def test_ledger_refuses_a_second_claim(
    shared_database: str, keystore_pool: Pkcs11SessionPool
) -> None:
    engine = make_engine(shared_database)
    try:
        ledger = SqlRunLedger(engine, RunSealer(Pkcs11BlindIndexer(keystore_pool)))
        slot, now = datetime(2026, 1, 1, 2, tzinfo=UTC), datetime.now(UTC)
        assert ledger.claim(slot, "backup", "a", now)
        assert not ledger.claim(slot, "backup", "b", now)
        assert ledger.claim(slot, "drill", "b", now), "kinds have separate slots"
        ledger.finish(slot, "backup", now, outcome="failed", backup_id=None, detail="boom")
        runs = {run.kind: run for run in ledger.list()}
        assert runs["backup"].outcome == "failed"
        assert runs["backup"].replica == "a"
        assert runs["backup"].slot == slot
        assert runs["drill"].outcome == "running"
    finally:
        engine.dispose()


def test_election_is_exclusive_while_held(shared_database: str) -> None:
    first, second = make_engine(shared_database), make_engine(shared_database)
    try:
        with elected(first, "backup") as won:
            assert won
            with elected(second, "backup") as also:
                assert not also, "a second holder while the first runs"
            with elected(second, "drill") as drill:
                assert drill, "a drill does not wait for a backup"
        with elected(second, "backup") as again:
            assert again, "released at the end of the block"
    finally:
        first.dispose()
        second.dispose()
