"""A database writer (no token) against the scheduled-run ledger, on SQLite and PostgreSQL.

``backup_runs`` rows carry a MAC under a key derived in the token
(``storage.backup.run_seal``), over every column, slot and kind included. Before it, a
well-typed row for a slot to come made the scheduler take that slot as done (``fire``
answered "taken": the backup or drill never ran), a forged ``ok`` drill row made
``medvault_drill_last_result`` read 1, and a genuine row copied to another slot or kind
counted there. Now a row that does not authenticate is claimed over (reported, unless
it has no MAC at all: a legacy row) and is no result on the gauges.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool
from service.backup.scheduler import IntervalSchedule, JobResult, ScheduledJob, Scheduler
from storage.backup.run_model import RunKind
from storage.backup.run_seal import RunSealer
from storage.backup.runs import SqlRunLedger, _lock_key, backup_runs, elected, run_resource
from storage.errors import BackendUnavailableError, StorageError
from storage.sql_metadata import make_engine, upgrade
from tests.fixtures.databases import new_database
from tests.integration.backup.test_run_metrics import scrape

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 1, 2, tzinfo=UTC)
DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)
BAD_MAC = secrets.token_bytes(32)


@pytest.fixture
def engine(metadata_engine: Engine) -> Engine:
    """The store tests' database, with an empty ledger."""
    with metadata_engine.begin() as c:
        c.execute(backup_runs.delete())
    return metadata_engine


@pytest.fixture
def sealer(keystore_pool: Pkcs11SessionPool) -> RunSealer:
    return RunSealer(Pkcs11BlindIndexer(keystore_pool))


@pytest.fixture
def forged() -> list[str]:
    """Ledger rows reported as forged (the service raises a ``run-tampered`` incident)."""
    return []


@pytest.fixture
def ledger(engine: Engine, sealer: RunSealer, forged: list[str]) -> SqlRunLedger:
    return SqlRunLedger(engine, sealer, forged.append)


def _write(engine: Engine, slot: datetime, kind: str, outcome: str, **columns: Any) -> None:
    """What a database writer does: a well-typed row, written without the token."""
    row = {
        "slot": slot, "kind": kind, "replica": "r-forged", "started_at": slot,
        "finished_at": slot + MINUTE, "backup_id": "b-forged", "outcome": outcome,
        "detail": "", "mac": BAD_MAC,
    }  # fmt: skip
    with engine.begin() as c:
        c.execute(backup_runs.insert().values(**{**row, **columns}))


def _scheduler(
    engine: Engine, ledger: SqlRunLedger, kind: RunKind, ran: list[datetime]
) -> tuple[Scheduler, ScheduledJob]:
    def run(slot: datetime) -> JobResult:
        ran.append(slot)
        return JobResult("b-real", ok=True, detail="ran")

    job = ScheduledJob(kind, IntervalSchedule(86_400), run)
    scheduler = Scheduler(
        [job], ledger, partial(elected, engine), lambda _entry: None, replica="r-real",
        clock=lambda: T0 + DAY, grace=timedelta(0),  # no other replica to wait for
    )  # fmt: skip
    return scheduler, job


@pytest.mark.parametrize("mac", [BAD_MAC, None], ids=["bad-mac", "no-mac"])
@pytest.mark.parametrize("kind", ["backup", "drill"])
def test_a_forged_row_for_a_slot_to_come_does_not_stop_its_run(
    engine: Engine, ledger: SqlRunLedger, forged: list[str], kind: RunKind, mac: bytes | None
) -> None:
    slot = T0 + DAY
    _write(engine, slot, kind, "ok", mac=mac)
    ran: list[datetime] = []
    scheduler, job = _scheduler(engine, ledger, kind, ran)
    assert scheduler.fire(job, slot) == "ran", "the forged row stopped the run"  # was "taken"
    assert ran == [slot]
    [run] = ledger.list(kind)
    assert (run.replica, run.outcome, run.backup_id, run.auth) == (
        "r-real",
        "ok",
        "b-real",
        "authentic",
    )
    # A bad MAC is reported; a row without one may be an earlier release's claim.
    assert forged == ([run_resource(slot, kind)] if mac else [])


def test_a_report_that_fails_does_not_stop_the_run(engine: Engine, sealer: RunSealer) -> None:
    """The claim is committed before the incident is raised: the run must go ahead."""

    def trail_down(_resource: str) -> None:
        raise RuntimeError("the audit trail refused the incident")

    _write(engine, T0 + DAY, "backup", "ok")
    assert SqlRunLedger(engine, sealer, trail_down).claim(T0 + DAY, "backup", "r1", T0 + DAY)


def test_two_replicas_claiming_over_one_forged_row_take_it_once(
    engine: Engine, sealer: RunSealer, forged: list[str]
) -> None:
    """Without the election lock (the ledger alone): each slot is taken by one replica."""
    slots = [T0 + i * DAY for i in range(6)]
    for slot in slots:
        _write(engine, slot, "backup", "running", finished_at=None)
    other = make_engine(engine.url.render_as_string(hide_password=False))
    ledgers = [SqlRunLedger(e, sealer, forged.append) for e in (engine, other)]
    won: dict[datetime, list[bool]] = {slot: [] for slot in slots}
    barrier = threading.Barrier(2)

    def replica(index: int) -> None:
        for slot in slots:
            barrier.wait(timeout=30)
            won[slot].append(ledgers[index].claim(slot, "backup", f"r{index}", slot))

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        other.dispose()
    assert all(sorted(claims) == [False, True] for claims in won.values()), won
    assert sorted(forged) == sorted(run_resource(slot, "backup") for slot in slots)
    assert all(run.auth == "authentic" for run in ledgers[0].list())


@pytest.mark.parametrize("mac", [BAD_MAC, None], ids=["bad-mac", "no-mac"])
def test_a_forged_ok_row_does_not_make_the_gauges_read_success(
    engine: Engine, ledger: SqlRunLedger, mac: bytes | None
) -> None:
    assert ledger.claim(T0, "drill", "r1", T0)
    ledger.finish(T0, "drill", T0 + 9 * MINUTE, outcome="failed", backup_id="b1")
    assert ledger.claim(T0, "backup", "r1", T0)
    ledger.finish(T0, "backup", T0 + 5 * MINUTE, outcome="ok", backup_id="b1")
    _write(engine, T0 + DAY, "drill", "ok", mac=mac)
    _write(engine, T0 + DAY, "backup", "ok", mac=mac)
    gauges = scrape(ledger)
    assert gauges["medvault_drill_last_result"] == 0.0, "a forged drill read as passed"
    assert gauges["medvault_drill_last_timestamp_seconds"] == (T0 + 9 * MINUTE).timestamp()
    assert (
        gauges["medvault_backup_last_success_timestamp_seconds"] == (T0 + 5 * MINUTE).timestamp()
    ), "a forged backup counted as the last success"
    assert gauges["medvault_run_ledger_forged_rows"] == (2.0 if mac else 0.0)


def test_a_genuine_row_still_counts(
    engine: Engine, ledger: SqlRunLedger, forged: list[str]
) -> None:
    assert ledger.claim(T0 + DAY, "drill", "r1", T0 + DAY)
    ran: list[datetime] = []
    scheduler, job = _scheduler(engine, ledger, "drill", ran)
    assert scheduler.fire(job, T0 + DAY) == "taken", "an authentic claim stops a second run"
    assert ran == []
    ledger.finish(T0 + DAY, "drill", T0 + DAY + MINUTE, outcome="ok", backup_id="b1")
    [run] = ledger.list("drill")
    assert (run.replica, run.outcome, run.auth) == ("r1", "ok", "authentic")
    gauges = scrape(ledger)
    assert gauges["medvault_drill_last_result"] == 1.0
    assert gauges["medvault_run_ledger_forged_rows"] == 0.0
    assert forged == []


@pytest.mark.parametrize(
    ("slot", "kind"), [(T0 + DAY, "backup"), (T0, "drill")], ids=["another-slot", "another-kind"]
)
def test_a_genuine_row_replayed_into_another_slot_or_kind_is_refused(
    engine: Engine, ledger: SqlRunLedger, forged: list[str], slot: datetime, kind: RunKind
) -> None:
    assert ledger.claim(T0, "backup", "r1", T0)
    ledger.finish(T0, "backup", T0 + 5 * MINUTE, outcome="ok", backup_id="b1")
    genuine = sa.select(backup_runs).where(backup_runs.c.kind == "backup")
    with engine.begin() as c:  # the whole row, its MAC included, under another key
        row = dict(c.execute(genuine).one()._mapping)
        c.execute(backup_runs.insert().values(**{**row, "slot": slot, "kind": kind}))
    replayed = {(r.slot, r.kind): r for r in ledger.list()}[slot, kind]
    assert replayed.auth == "forged"
    assert scrape(ledger).get("medvault_drill_last_result") != 1.0, "a backup read as a drill"
    ran: list[datetime] = []
    scheduler, job = _scheduler(engine, ledger, kind, ran)
    assert scheduler.fire(job, slot) == "ran"  # was "taken"
    assert ran == [slot]
    assert forged == [run_resource(slot, kind)]


def test_a_row_deleted_during_its_run_is_written_again_at_its_end(
    engine: Engine, ledger: SqlRunLedger, sealer: RunSealer
) -> None:
    assert ledger.claim(T0, "backup", "r1", T0)
    with engine.begin() as c:
        c.execute(backup_runs.delete())
    ledger.finish(T0, "backup", T0 + MINUTE, outcome="ok", backup_id="b1")
    [run] = ledger.list()
    assert (run.replica, run.outcome, run.auth) == ("r1", "ok", "authentic")
    later = SqlRunLedger(engine, sealer)
    assert not later.claim(T0, "backup", "r2", T0 + DAY), "the slot ran; a late replica skips"


# --- cold review 9h -------------------------------------------------------------------
# Each test below failed on the merge of `ledger` (f0dd6a5). Schema changes (a trigger,
# a view) go to a database of the test's own, so that no other test meets them.


@pytest.fixture
def own_engine(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """A migrated database of this test only (a writer's DDL stays in it)."""
    for url in new_database(request, database_url, tmp_path_factory):
        own = make_engine(url)
        upgrade(own)
        yield own
        own.dispose()


def _ddl(engine: Engine, *statements: str) -> None:
    with engine.begin() as c:
        for statement in statements:
            c.exec_driver_sql(statement)


def _refuse_writes(engine: Engine, event: str) -> None:
    """A writer's trigger that fails every ``event`` on the ledger as a duplicate key."""
    if engine.dialect.name == "sqlite":
        _ddl(engine, f"CREATE TRIGGER refuse BEFORE {event} ON backup_runs BEGIN "
                     "SELECT RAISE(ABORT, 'UNIQUE constraint failed'); END")  # fmt: skip
        return
    _ddl(
        engine,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION 'duplicate' USING ERRCODE = 'unique_violation'; END $$",
        f"CREATE TRIGGER refuse BEFORE {event} ON backup_runs FOR EACH ROW "
        "EXECUTE FUNCTION refuse()",
    )


@pytest.mark.parametrize(
    ("row", "event"), [(None, "INSERT"), ("forged", "UPDATE")], ids=["no-row", "forged-row"]
)
def test_a_claim_refused_by_a_trigger_is_not_a_slot_taken(
    own_engine: Engine, sealer: RunSealer, forged: list[str], row: str | None, event: str
) -> None:
    """A duplicate-key error is evidence of nothing: a writer's trigger (or constraint)
    raises one on every insert, or on the update that replaces a forged row. The slot
    counts as taken only when an authentic row of it is read; else the claim fails
    loudly, as for any refused write, where it was skipped as "taken" at info level."""
    if row:
        _write(own_engine, T0 + DAY, "backup", "ok")
    _refuse_writes(own_engine, event)
    ledger = SqlRunLedger(own_engine, sealer, forged.append)
    ran: list[datetime] = []
    scheduler, job = _scheduler(own_engine, ledger, "backup", ran)
    assert scheduler.fire(job, T0 + DAY) == "error", "a refused claim read as a slot taken"
    with pytest.raises(StorageError, match="backup-run/backup/") as refused:
        ledger.claim(T0 + DAY, "backup", "r-real", T0 + DAY)
    assert refused.value.__cause__ is None, "the driver's error (a writer's text) is chained"


def test_a_genuine_row_of_the_slot_before_is_no_claim_of_this_one(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    sealer: RunSealer,
    forged: list[str],
) -> None:
    """A view whose ``slot`` calls ``random()`` (SQLite evaluates it once for ``WHERE``
    and again for the row returned) hands the claimer of a slot the genuine row of the
    slot before (MAC valid), the insert refused by an ``INSTEAD OF`` trigger. The row
    read must be the row asked for; PostgreSQL evaluates such a column once."""
    for url in new_database(request, "sqlite", tmp_path_factory):
        own = make_engine(url)
        upgrade(own)
        ledger = SqlRunLedger(own, sealer, forged.append)
        for day in range(3):
            assert ledger.claim(T0 + day * DAY, "backup", "r1", T0 + day * DAY)
            ledger.finish(T0 + day * DAY, "backup", T0 + day * DAY + MINUTE, outcome="ok",
                          backup_id="b1")  # fmt: skip
        _view(own, slot="CASE WHEN abs(random()) % 2 = 0 THEN strftime('%Y-%m-%d %H:%M:%S', "
                        "slot, '+1 day') || '.000000' ELSE slot END", kind="kind")  # fmt: skip
        for _ in range(TRIES):
            try:
                claimed = ledger.claim(T0 + 3 * DAY, "backup", "r-real", T0 + 3 * DAY)
            except StorageError:
                continue  # refused loudly: no authentic row of the slot was read
            assert claimed, "the slot before's genuine row taken as this slot's claim"
        own.dispose()


def test_a_genuine_backup_read_as_a_drill_is_no_drill_result(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sealer: RunSealer
) -> None:
    """The same view on ``kind``: the drill listing got the newer genuine ``ok`` backup,
    and ``medvault_drill_last_result`` read 1 while the newest drill had failed."""
    for url in new_database(request, "sqlite", tmp_path_factory):
        own = make_engine(url)
        upgrade(own)
        ledger = SqlRunLedger(own, sealer)
        assert ledger.claim(T0, "drill", "r1", T0)
        ledger.finish(T0, "drill", T0 + 9 * MINUTE, outcome="failed", backup_id="b1")
        assert ledger.claim(T0 + DAY, "backup", "r1", T0 + DAY)
        ledger.finish(T0 + DAY, "backup", T0 + DAY + MINUTE, outcome="ok", backup_id="b2")
        _view(own, slot="slot",
              kind="CASE WHEN abs(random()) % 2 = 0 THEN 'drill' ELSE kind END")  # fmt: skip
        for _ in range(TRIES):
            assert scrape(ledger).get("medvault_drill_last_result") != 1.0, (
                "a backup read as a drill"
            )
        own.dispose()


TRIES = 40  # a view's coin lets the genuine row through about one try in four


def _view(engine: Engine, *, slot: str, kind: str) -> None:
    """``backup_runs`` replaced by a view over the real rows; writes to it are refused
    as duplicates (inserts) or dropped (updates), as a writer's ``INSTEAD OF`` does."""
    _ddl(
        engine,
        "ALTER TABLE backup_runs RENAME TO runs_real",
        f"CREATE VIEW backup_runs AS SELECT {slot} AS slot, {kind} AS kind, replica, "
        "started_at, finished_at, backup_id, outcome, detail, mac FROM runs_real",
        "CREATE TRIGGER refuse INSTEAD OF INSERT ON backup_runs BEGIN "
        "SELECT RAISE(ABORT, 'UNIQUE constraint failed'); END",
        "CREATE TRIGGER drop_updates INSTEAD OF UPDATE ON backup_runs BEGIN SELECT 1; END",
    )


@pytest.mark.backend("postgresql")
@pytest.mark.parametrize("value", ["infinity", "20000-01-01 00:00:00+00", "0001-01-01 BC"])
def test_a_time_python_cannot_hold_does_not_stop_the_run(
    engine: Engine,
    ledger: SqlRunLedger,
    forged: list[str],
    value: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL keeps times psycopg cannot load; one in a forged row of the slot failed
    the claim's read (no run, no incident: "scheduled run not started", the value quoted
    by psycopg's error in the logged traceback) and every scrape (ledger up 0)."""
    slot = T0 + DAY
    _write(engine, slot, "backup", "ok")
    with engine.begin() as c:
        c.execute(
            sa.text("UPDATE backup_runs SET started_at = CAST(:v AS timestamptz)"), {"v": value}
        )
    gauges = scrape(ledger)
    assert gauges.get("medvault_run_ledger_up") == 1.0, "one row made every scrape fail"
    assert gauges.get("medvault_run_ledger_forged_rows") == 1.0
    ran: list[datetime] = []
    scheduler, job = _scheduler(engine, ledger, "backup", ran)
    assert scheduler.fire(job, slot) == "ran"
    assert ran == [slot]
    assert forged == [run_resource(slot, "backup")]
    assert "DataError" not in caplog.text
    assert value not in caplog.text


def test_a_row_lock_held_for_ever_fails_the_claim_in_bounded_time(
    engine: Engine, sealer: RunSealer, forged: list[str]
) -> None:
    """A writer locks the slot's forged row (PostgreSQL: SELECT ... FOR UPDATE; SQLite:
    the write lock) and never lets go. The claim's wait is bounded and ends as an outage
    (logged, the next slot tries again); on PostgreSQL it waited for ever, so the
    scheduler thread ran no later slot of any kind and logged nothing."""
    _write(engine, T0 + DAY, "backup", "ok")
    ledger = SqlRunLedger(engine, sealer, forged.append)
    outcome: list[object] = []

    def claim() -> None:
        try:
            outcome.append(ledger.claim(T0 + DAY, "backup", "r-real", T0 + DAY))
        except StorageError as e:
            outcome.append(e)

    holder = engine.connect()
    try:
        if engine.dialect.name == "sqlite":
            holder.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            holder.execute(sa.select(backup_runs).with_for_update())
        thread = threading.Thread(target=claim)
        thread.start()
        thread.join(30)  # SQLite's busy_timeout is 5 s; the ledger's lock wait 10 s
        assert not thread.is_alive(), "the claim still waits for the writer's lock"
    finally:
        holder.rollback()
        holder.close()
        thread.join(30)
    assert len(outcome) == 1
    assert isinstance(outcome[0], BackendUnavailableError)


@pytest.mark.backend("postgresql")
def test_the_election_lock_held_by_a_writer_does_not_stop_every_run(
    engine: Engine, ledger: SqlRunLedger, caplog: pytest.LogCaptureFixture
) -> None:
    """The advisory-lock key is public (``_lock_key``); any session may take it. Each
    replica answered "lost" ("slot run by another replica", info) for every slot of that
    kind, and no row, incident or forged-row gauge showed it: only the backup's age.
    Now the slot, still unclaimed after the grace, is claimed and run without the lock,
    with a warning naming it (both backends, two replicas:
    ``test_schedule_lock_held.py``)."""
    ran: list[datetime] = []
    scheduler, job = _scheduler(engine, ledger, "backup", ran)
    holder = engine.connect()
    try:
        holder.execute(sa.select(sa.func.pg_advisory_lock(_lock_key("backup"))))
        assert scheduler.fire(job, T0 + DAY) == "ran"
    finally:
        holder.invalidate()  # ends the session: a pooled one would keep the lock
        holder.close()
    assert ran == [T0 + DAY]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(run_resource(T0 + DAY, "backup") in line for line in warned), warned
