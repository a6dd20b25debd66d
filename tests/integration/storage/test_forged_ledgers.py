"""Scheduler state of another type than its column's: read strictly, never a success.

``scheduled_work`` (when periodic work last ran) and ``backup_runs`` (the scheduled
backups and drills) are read through ``storage.row_values``. A row a database writer
gave a value of another type (SQLite: any type in any column; PostgreSQL: a column
altered to another type) used to be passed on as it was (``str()`` of bytes as the
replica, a text ``finished_at`` ending in an internal error). Now a ``scheduled_work``
row of another type is no run on record (the round is claimed, nothing stops the work)
and a ``backup_runs`` row is listed as a failed run naming its columns, so no success
is reported on its strength (``medvault_drill_last_result`` is 0). Each is logged by
table and column, never by value.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool
from storage.backup.run_seal import RunSealer
from storage.backup.runs import SqlRunLedger
from storage.work_ledger import WorkLedger
from storage.work_seal import WorkSealer
from tests.integration.backup.test_run_metrics import scrape
from tests.integration.storage.test_forged_types import own_engine  # noqa: F401 - fixture

pytestmark = pytest.mark.integration
# ruff: noqa: F811  (the fixture imported above is the parameter)

GAP = timedelta(minutes=10)
T0 = datetime(2026, 11, 1, 2, tzinfo=UTC)
FORGED = "SYNTHETIC-FORGED"


def _logged_without_value(caplog: pytest.LogCaptureFixture, table: str, column: str) -> None:
    lines = [r.getMessage() for r in caplog.records if table in r.getMessage()]
    assert any(f"({column})" in line for line in lines), lines
    assert not any(FORGED in line for line in lines)


@pytest.mark.backend("sqlite")
def test_a_scheduled_work_replica_of_another_type_is_no_run(
    own_engine: Engine, work_sealer: WorkSealer, caplog: pytest.LogCaptureFixture
) -> None:
    name, ledger = f"t-{uuid.uuid4().hex[:8]}", WorkLedger(own_engine, work_sealer)
    assert ledger.claim(name, GAP, T0, "a")
    with own_engine.begin() as c:
        c.exec_driver_sql(f"UPDATE scheduled_work SET replica = CAST('{FORGED}' AS BLOB)")
    assert ledger.last_run(name) is None  # was (T0, "b'SYNTHETIC-FORGED'")
    _logged_without_value(caplog, "scheduled_work", "replica")


@pytest.mark.backend("postgresql")
def test_a_scheduled_work_time_of_another_type_is_claimed_over(
    own_engine: Engine, work_sealer: WorkSealer, caplog: pytest.LogCaptureFixture
) -> None:
    """A text ``last_run_at`` ended every claim in an internal error: the work stopped."""
    name, ledger = f"t-{uuid.uuid4().hex[:8]}", WorkLedger(own_engine, work_sealer)
    assert ledger.claim(name, GAP, T0, "a")
    with own_engine.begin() as c:
        c.exec_driver_sql("ALTER TABLE scheduled_work ALTER COLUMN last_run_at TYPE text")
    assert ledger.claim(name, GAP, T0 + GAP / 2, "b"), "the work stopped"
    _logged_without_value(caplog, "scheduled_work", "last_run_at")


def _ok_runs(ledger: SqlRunLedger) -> None:
    ledger.claim(T0, "backup", "r1", T0)
    ledger.finish(T0, "backup", T0 + timedelta(minutes=5), outcome="ok", backup_id="b1")
    ledger.claim(T0, "drill", "r1", T0)
    ledger.finish(T0, "drill", T0 + timedelta(minutes=9), outcome="ok", backup_id="b1")


@pytest.mark.backend("sqlite")
def test_a_backup_run_of_another_type_is_listed_as_failed(
    own_engine: Engine, keystore_pool: Pkcs11SessionPool, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = SqlRunLedger(own_engine, RunSealer(Pkcs11BlindIndexer(keystore_pool)))
    _ok_runs(ledger)
    with own_engine.begin() as c:
        c.exec_driver_sql(f"UPDATE backup_runs SET backup_id = CAST('{FORGED}' AS BLOB)")
    runs = ledger.list()
    assert sorted((r.kind, r.outcome, r.unreadable) for r in runs) == [
        ("backup", "failed", ("backup_id",)), ("drill", "failed", ("backup_id",)),
    ]  # fmt: skip
    assert all(FORGED not in r.detail and r.backup_id == "" for r in runs)
    gauges = scrape(ledger)
    assert "medvault_backup_last_success_timestamp_seconds" not in gauges
    assert gauges["medvault_drill_last_result"] == 0.0
    _logged_without_value(caplog, "backup_runs", "backup_id")


@pytest.mark.backend("postgresql")
def test_a_postgresql_backup_run_column_of_another_type_claims_no_success(
    own_engine: Engine, keystore_pool: Pkcs11SessionPool, caplog: pytest.LogCaptureFixture
) -> None:
    """A text ``finished_at``: the ledger read failed (``medvault_run_ledger_up 0``);
    now the runs are listed, as failed."""
    ledger = SqlRunLedger(own_engine, RunSealer(Pkcs11BlindIndexer(keystore_pool)))
    _ok_runs(ledger)
    with own_engine.begin() as c:
        c.execute(sa.text("ALTER TABLE backup_runs ALTER COLUMN finished_at TYPE text"))
    runs = ledger.list()
    assert sorted((r.kind, r.outcome, r.unreadable) for r in runs) == [
        ("backup", "failed", ("finished_at",)), ("drill", "failed", ("finished_at",)),
    ]  # fmt: skip
    gauges = scrape(ledger)
    assert gauges["medvault_run_ledger_up"] == 1.0
    assert "medvault_backup_last_success_timestamp_seconds" not in gauges
    assert gauges["medvault_drill_last_result"] == 0.0
    _logged_without_value(caplog, "backup_runs", "finished_at")
