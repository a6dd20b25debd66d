"""Attack tests of PruneBackups through the service (cold review), on SQLite and
PostgreSQL with the real SeaweedFS and SoftHSM2: what a caller's grace can destroy, and
what a hostile number does.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import backup_pb2 as bpb
from service._gen.medvault.v1 import backup_pb2_grpc as bpb_grpc
from storage.backup.manifest import OBJECTS_PREFIX, RUNS_PREFIX, new_backup_id
from tests.fixtures.databases import new_database
from tests.fixtures.service import RunningService, TlsFiles
from tests.integration.access.helpers import (
    TIMEOUT,
    Client,
    client,
    engine_for,
    issue_client,
    new_patient,
    put_record,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
OPERATOR = "op-prune-abuse"


@dataclass
class Deployment:
    server: RunningService
    url: str
    bucket: str
    operator: Client
    backups: Any


@pytest.fixture(scope="module")
def d(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory,
    service_factory: Any, tls_files: TlsFiles,
) -> Iterator[Deployment]:  # fmt: skip
    bucket = f"mvp-{secrets.token_hex(6)}"
    certs = tmp_path_factory.mktemp("certs")
    for url in new_database(request, database_url, tmp_path_factory):
        server = service_factory(url, extra_sections={"backup": {"bucket": bucket}})
        clerk = client(server, issue_client(tls_files, certs, "clerk-prune", "records_clerk"))
        put_record(clerk, new_patient(), secrets.token_bytes(1000))
        clerk.close()
        operator = client(server, issue_client(tls_files, certs, OPERATOR, "backup_operator"))
        yield Deployment(server, url, bucket, operator, bpb_grpc.BackupServiceStub(
            operator.channel))  # fmt: skip
        operator.close()
        server.stop()


def _run_backup(dep: Deployment) -> None:
    for reply in dep.backups.RunBackup(bpb.RunBackupRequest(), timeout=TIMEOUT):
        if reply.HasField("result"):
            return
    raise AssertionError("the backup stream ended without a result")


def _put(s3_server: Any, bucket: str, key: str, data: bytes) -> None:
    s3_server.client().put_object(bucket, key, io.BytesIO(data), len(data))


def _exists(s3_server: Any, bucket: str, key: str) -> bool:
    return any(o.object_name == key for o in s3_server.client().list_objects(bucket, key))


def _reasons(dep: Deployment) -> list[str]:
    engine = engine_for(dep.url)
    try:
        with engine.connect() as c:
            rows = c.execute(sa.text(
                "SELECT reason FROM audit_events WHERE principal = :p ORDER BY sequence"
            ), {"p": OPERATOR}).all()  # fmt: skip
    finally:
        engine.dispose()
    return [r.reason for r in rows]


def test_a_zero_grace_prune_keeps_the_objects_of_a_backup_run_in_progress(
    d: Deployment, s3_server: Any
) -> None:
    """A run in progress has copied objects no manifest references yet, under a fresh
    run marker. A PruneBackups call with grace_hours 0 (or a few seconds) must not take
    the marker for a stale one and delete the run's objects: the run would then write
    a signed, 'complete' manifest of objects that are gone, found only by a verify or
    in a restore."""
    _run_backup(d)
    run_id = new_backup_id(datetime.now(UTC))  # started now (a start ahead is not honoured)
    _put(s3_server, d.bucket, f"{RUNS_PREFIX}{run_id}.json",
         json.dumps({"id": run_id, "host": "replica-b"}).encode())  # fmt: skip
    data = secrets.token_bytes(512)
    copied = OBJECTS_PREFIX + hashlib.sha256(data).hexdigest()
    _put(s3_server, d.bucket, copied, data)

    reply = d.backups.PruneBackups(
        bpb.PruneBackupsRequest(keep_daily=1, keep_weekly=0, keep_monthly=0, grace_hours=0),
        timeout=TIMEOUT,
    )
    assert _exists(s3_server, d.bucket, copied), (
        f"a running backup's object was deleted (deferred={reply.objects_deferred})")
    assert _exists(s3_server, d.bucket, f"{RUNS_PREFIX}{run_id}.json"), (
        "a running backup's marker was deleted")


@pytest.mark.parametrize("hours", [math.nan, math.inf, 1e300, -1.0])
def test_a_grace_that_is_not_a_number_of_hours_is_invalid_naming_the_field(
    d: Deployment, hours: float
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        d.backups.PruneBackups(bpb.PruneBackupsRequest(
            keep_daily=1, grace_hours=hours, dry_run=True), timeout=TIMEOUT)  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.code().name
    assert "grace_hours" in (refused.value.details() or ""), "the error names the field"
    assert any("grace_hours" in r for r in _reasons(d)), "the refusal is audited"
