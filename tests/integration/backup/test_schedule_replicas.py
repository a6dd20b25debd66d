"""Two service replicas, one database, one backup target: each slot is backed up once.

Two real server processes (``service_factory``) share the metadata database
(PostgreSQL, or one SQLite file on this machine), the record bucket and the backup
bucket, with the test-only ``schedule_seconds`` key standing in for a cron schedule of
"every minute" (docs/operations.md): every 2 seconds instead of every 60, so the test
sees several slots in seconds (it waits for SLOTS slots with both replicas up, as many
as a slow host takes). Retention is off so that every backup stays countable.
Afterwards: one ``backup_runs`` row per slot (the primary key), every run "ok", one
complete manifest per row and no other, one ``backup.run`` audit event by "scheduler"
per run.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from storage.backup.manifest import MANIFESTS_PREFIX, backup_id_of
from storage.backup.runs import backup_runs
from tests.fixtures.databases import new_database
from tests.fixtures.service import TlsFiles
from tests.integration.access.helpers import (
    client,
    engine_for,
    issue_client,
    new_patient,
    put_record,
)

pytestmark = pytest.mark.integration
INTERVAL = 2
SLOTS = 3  # slots with both replicas running
CAP_SECONDS = 120.0


@pytest.fixture
def replica_database(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    yield from new_database(request, database_url, tmp_path_factory)


def _manifest_ids(s3_server: Any, bucket: str) -> list[str]:
    client = s3_server.client()
    keys = [o.object_name for o in client.list_objects(bucket, MANIFESTS_PREFIX, recursive=True)]
    return sorted(i for k in keys if (i := backup_id_of(k)))


def _run_count(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(sa.select(sa.func.count()).select_from(backup_runs)) or 0)


def _scheduled_events(engine: sa.Engine) -> list[Any]:
    query = sa.text(
        "SELECT resource, outcome, source FROM audit_events "
        "WHERE action = 'backup.run' AND principal = 'scheduler'"
    )
    with engine.connect() as connection:
        return list(connection.execute(query).all())


def test_two_replicas_back_up_each_slot_once(
    service_factory: Any,
    replica_database: str,
    s3_server: Any,
    tls_files: TlsFiles,
    tmp_path: Path,
) -> None:
    records_bucket = f"mv-{secrets.token_hex(6)}"
    backup_bucket = f"mvb-{secrets.token_hex(6)}"
    section = {
        "bucket": backup_bucket, "schedule": "* * * * *", "schedule_seconds": INTERVAL,
        "prune_after_backup": False,
    }  # fmt: skip
    first = service_factory(
        replica_database, bucket=records_bucket, extra_sections={"backup": section}
    )
    clerk = client(first, issue_client(tls_files, tmp_path, "clerk", "records_clerk"))
    for _ in range(3):
        put_record(clerk, new_patient(), secrets.token_bytes(4096))
    clerk.close()
    engine = engine_for(replica_database)
    try:
        second = service_factory(
            replica_database, bucket=records_bucket, extra_sections={"backup": section}
        )
        alone = _run_count(engine)  # slots run before the second replica served
        # Counted, not timed (a slow host runs fewer slots a second): both replicas run
        # side by side until SLOTS more slots have their row, at most CAP_SECONDS.
        began = time.monotonic()
        while _run_count(engine) < alone + SLOTS and time.monotonic() - began < CAP_SECONDS:
            time.sleep(0.2)
    finally:
        engine.dispose()
    second.stop()
    first.stop()  # SIGTERM: a run in progress finishes before the process exits

    engine = engine_for(replica_database)
    try:
        with engine.connect() as connection:
            rows = list(connection.execute(sa.select(backup_runs)).all())
        events = _scheduled_events(engine)
    finally:
        engine.dispose()
    slots = [row.slot for row in rows]
    assert len(slots) == len(set(slots)), "a slot has two rows"
    assert len(rows) >= alone + SLOTS, f"only {len(rows) - alone} scheduled backups side by side"
    assert all(row.outcome == "ok" for row in rows), [row.detail for row in rows]
    ran = sorted(row.backup_id for row in rows)
    assert _manifest_ids(s3_server, backup_bucket) == ran, "one manifest per slot run, no other"
    assert len(events) == len(rows), "one audit event per scheduled run"
    assert {e.resource for e in events} == {f"backup/{i}" for i in ran}
    assert all(e.outcome == "allowed" for e in events)
