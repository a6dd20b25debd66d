"""BackupService over gRPC and mutual TLS, as the ``backup_operator`` role.

RunBackup streams progress then the summary; ListBackups shows it; VerifyBackup with
``read_data`` passes, then names an object flipped in the target; RunRestoreDrill
restores into scratch and reports every record verified. Other roles are refused and
every call leaves its audit events.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import backup_pb2 as bpb
from service._gen.medvault.v1 import backup_pb2_grpc as bpb_grpc
from tests.fixtures.databases import new_database
from tests.fixtures.service import RunningService, TlsFiles
from tests.integration.access.helpers import (
    client,
    engine_for,
    issue_client,
    new_patient,
    put_record,
)

pytestmark = pytest.mark.integration
TIMEOUT = 300


@pytest.fixture(scope="module")
def backup_server(
    request: pytest.FixtureRequest,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    service_factory: Any,
    tls_files: TlsFiles,
) -> Iterator[tuple[RunningService, str, str]]:
    bucket = f"mvb-{secrets.token_hex(6)}"
    for url in new_database(request, database_url, tmp_path_factory):
        server = service_factory(url, extra_sections={"backup": {"bucket": bucket}})
        clerk = client(
            server, issue_client(tls_files, tmp_path_factory.mktemp("c"), "clerk", "records_clerk")
        )
        for size in (10, 70_000, 900_000):  # one message each (1 MiB chunks)
            put_record(clerk, new_patient(), secrets.token_bytes(size))
        clerk.close()
        yield server, url, bucket
        server.stop()


def _stub(
    server: RunningService, tls: TlsFiles, tmp: Path, role: str
) -> bpb_grpc.BackupServiceStub:
    cert, key = issue_client(tls, tmp, f"u-{secrets.token_hex(3)}", role)
    return bpb_grpc.BackupServiceStub(server.channel(cert, key))


def _run(stub: bpb_grpc.BackupServiceStub) -> tuple[list[bpb.Progress], bpb.BackupSummary]:
    progress, result = [], None
    for message in stub.RunBackup(bpb.RunBackupRequest(), timeout=TIMEOUT):
        if message.WhichOneof("message") == "progress":
            progress.append(message.progress)
        else:
            result = message.result
    assert result is not None
    return progress, result


def test_run_list_verify_drill(
    backup_server: tuple[RunningService, str, str], tls_files: TlsFiles, tmp_path: Path,
    s3_server: Any,
) -> None:  # fmt: skip
    server, url, bucket = backup_server
    stub = _stub(server, tls_files, tmp_path, "backup_operator")
    progress, summary = _run(stub)
    assert {p.phase for p in progress} >= {"snapshot", "objects", "manifest"}
    assert summary.records == 3
    assert summary.objects == 3
    assert summary.objects_copied == 3
    assert summary.trigger == "manual"
    _, again = _run(stub)
    assert again.objects_copied == 0, "incremental: nothing new to copy"

    listed = stub.ListBackups(bpb.ListBackupsRequest(), timeout=TIMEOUT).backups
    assert [b.id for b in listed][:2] == [again.id, summary.id]

    report = _verify(stub, summary.id)
    assert report.ok, list(report.failures)
    assert report.manifest_signature_valid
    assert report.objects_checked == 3

    drill = _drill(stub, summary.id)
    assert drill.ok, list(drill.failures)
    assert drill.records_verified == 3
    assert drill.audit_chain_ok
    assert drill.recovery_seconds > 0
    assert b'"ok":true' in drill.report_json

    # Flip one byte of the largest object in the target: verify names it.
    s3 = s3_server.client()
    biggest = max(s3.list_objects(bucket, "objects/", recursive=True), key=lambda o: o.size or 0)
    data = bytearray(s3.get_object(bucket, biggest.object_name).read())
    data[len(data) // 2] ^= 0x01
    s3.put_object(bucket, biggest.object_name, io.BytesIO(data), len(data))
    bad = _verify(stub, summary.id)
    assert not bad.ok
    assert any(biggest.object_name in line for line in bad.failures), list(bad.failures)

    engine = engine_for(url)
    try:
        with engine.connect() as connection:
            actions = connection.execute(sa.text(
                "SELECT action, outcome, count(*) FROM audit_events "
                "WHERE principal LIKE 'u-%' GROUP BY action, outcome"
            )).all()  # fmt: skip
    finally:
        engine.dispose()
    counted = {(a, o): n for a, o, n in actions}
    # Start and end event per run (2 runs) and per drill.
    assert counted[("backup.run", "allowed")] >= 6
    assert counted[("backup.read", "allowed")] >= 4  # list; verify start+end; bad verify start
    assert counted[("backup.read", "failed")] >= 1, "the failed verify is audited as failed"


def _verify(stub: bpb_grpc.BackupServiceStub, backup_id: str) -> bpb.VerifyReport:
    request = bpb.VerifyBackupRequest(id=backup_id, read_data=True)
    messages = list(stub.VerifyBackup(request, timeout=TIMEOUT))
    assert messages[-1].WhichOneof("message") == "report"
    return messages[-1].report


def _drill(stub: bpb_grpc.BackupServiceStub, backup_id: str) -> bpb.DrillReport:
    messages = list(stub.RunRestoreDrill(bpb.RunRestoreDrillRequest(id=backup_id), timeout=TIMEOUT))
    assert messages[-1].WhichOneof("message") == "report"
    assert any(m.WhichOneof("message") == "progress" for m in messages)
    return messages[-1].report


@pytest.mark.parametrize("role", ["records_clerk", "security_officer", "physician"])
def test_other_roles_are_refused(
    backup_server: tuple[RunningService, str, str], tls_files: TlsFiles, tmp_path: Path,
    role: str,
) -> None:  # fmt: skip
    stub = _stub(backup_server[0], tls_files, tmp_path, role)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.RunBackup(bpb.RunBackupRequest(), timeout=TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as listed:
        stub.ListBackups(bpb.ListBackupsRequest(), timeout=TIMEOUT)
    assert listed.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_malformed_id_is_invalid_argument(
    backup_server: tuple[RunningService, str, str], tls_files: TlsFiles, tmp_path: Path
) -> None:
    stub = _stub(backup_server[0], tls_files, tmp_path, "backup_operator")
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.VerifyBackup(bpb.VerifyBackupRequest(id="../etc"), timeout=TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
