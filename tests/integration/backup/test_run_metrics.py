"""Backup age and drill result as Prometheus gauges, read from the run ledger at each
scrape (service.metrics.ScheduledRunsCollector), on SQLite and PostgreSQL. Rows a
database writer forged: tests/integration/backup/test_run_ledger_forged.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool
from service.metrics import ScheduledRunsCollector
from storage import RunLedger, RunSealer, SqlRunLedger
from storage.backup.runs import backup_runs


def scrape(ledger: RunLedger) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(ScheduledRunsCollector(ledger))
    text = generate_latest(registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_backup_age_and_drill_result_follow_the_ledger(
    metadata_engine: Engine, keystore_pool: Pkcs11SessionPool
) -> None:
    with metadata_engine.begin() as c:
        c.execute(backup_runs.delete())
    ledger = SqlRunLedger(metadata_engine, RunSealer(Pkcs11BlindIndexer(keystore_pool)))
    assert scrape(ledger) == {
        "medvault_run_ledger_up": 1.0, "medvault_run_ledger_forged_rows": 0.0,
    }, "no run yet: no gauge"  # fmt: skip

    base = datetime(2026, 11, 1, 2, tzinfo=UTC)
    ledger.claim(base, "backup", "r1", base)
    ledger.finish(base, "backup", base + timedelta(minutes=5), outcome="ok", backup_id="b1")
    later = base + timedelta(days=1)
    ledger.claim(later, "backup", "r1", later)  # failed: the last success stays b1's
    ledger.finish(later, "backup", later + timedelta(minutes=1), outcome="failed",
                  backup_id=None)  # fmt: skip
    ledger.claim(later, "drill", "r1", later)
    ledger.finish(later, "drill", later + timedelta(minutes=9), outcome="failed",
                  backup_id="b1")  # fmt: skip
    gauges = scrape(ledger)
    assert (
        gauges["medvault_backup_last_success_timestamp_seconds"]
        == (base + timedelta(minutes=5)).timestamp()
    )
    assert gauges["medvault_drill_last_result"] == 0.0
    assert (
        gauges["medvault_drill_last_timestamp_seconds"]
        == (later + timedelta(minutes=9)).timestamp()
    )

    again = later + timedelta(days=1)
    ledger.claim(again, "drill", "r1", again)
    assert scrape(ledger)["medvault_drill_last_result"] == 0.0, "a running drill is no result"
    ledger.finish(again, "drill", again + timedelta(minutes=8), outcome="ok", backup_id="b1")
    assert scrape(ledger)["medvault_drill_last_result"] == 1.0


def test_an_unreadable_ledger_is_reported_not_raised(keystore_pool: Pkcs11SessionPool) -> None:
    broken = sa.create_engine("sqlite:////nonexistent/dir/metadata.db")
    gauges = scrape(SqlRunLedger(broken, RunSealer(Pkcs11BlindIndexer(keystore_pool))))
    assert gauges == {"medvault_run_ledger_up": 0.0}
