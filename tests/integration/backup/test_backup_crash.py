"""SIGKILL the service midway through a backup: never complete; the next run finishes the work.

The backup runs inside the server (``medvault backup run`` is a BackupService call), so
the process killed is the server's; the next run, verify and list are the operator's
commands against a restarted server.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from service._gen.medvault.v1 import backup_pb2 as bpb
from service._gen.medvault.v1 import backup_pb2_grpc as bpb_grpc
from storage.backup.manifest import MANIFESTS_PREFIX, OBJECTS_PREFIX, SNAPSHOTS_PREFIX
from storage.backup.retention import list_backups
from storage.backup.targets import S3Target
from tests.fixtures.service import TlsFiles
from tests.integration.access.helpers import issue_client
from tests.integration.backup.helpers import medvault_as

# Ten times the 20 copied objects the kill waits for: the run cannot finish in between.
RECORDS = 200


def test_killed_run_is_never_complete(
    make_source: Any, service_factory: Any, tls_files: TlsFiles, s3_target: S3Target,
    tmp_path: Path,
) -> None:  # fmt: skip
    source = make_source("sqlite")
    source.add_records(RECORDS, size=20_000)
    url = source.engine.url.render_as_string(hide_password=False)
    sections = {"backup": {"bucket": s3_target.describe().removeprefix("s3://"), "schedule": ""}}
    cert, key = issue_client(tls_files, tmp_path, "op-crash", "backup_operator")

    server = service_factory(url, bucket=source.blobs.bucket, extra_sections=sections)
    channel = server.channel(cert, key)
    stream = bpb_grpc.BackupServiceStub(channel).RunBackup(bpb.RunBackupRequest(), timeout=120)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and server.process.poll() is None:
            if len(list(s3_target.list(OBJECTS_PREFIX))) >= 20:
                break
            time.sleep(0.01)
        assert not list(s3_target.list(MANIFESTS_PREFIX)), "the run finished before the kill"
        os.kill(server.process.pid, signal.SIGKILL)
    finally:
        server.process.wait(timeout=30)
        stream.cancel()
        channel.close()
    assert server.process.returncode == -signal.SIGKILL
    copied_before = len(list(s3_target.list(OBJECTS_PREFIX)))
    assert 20 <= copied_before < RECORDS
    assert list(s3_target.list(MANIFESTS_PREFIX)) == []  # never complete
    assert list_backups(s3_target) == []
    assert len(list(s3_target.list(SNAPSHOTS_PREFIX))) == 1  # the snapshot went first

    again = service_factory(url, bucket=source.blobs.bucket, extra_sections=sections)

    def medvault(*args: str) -> Any:
        return medvault_as(again.endpoint, tls_files.ca, cert, key, *args, cwd=tmp_path)

    done = medvault("backup", "run")
    assert done.returncode == 0, done.stderr
    [backup] = list_backups(s3_target)
    assert backup.records == RECORDS
    # The resumed run keeps what the killed run copied and copies the rest (verify
    # --read-data below proves every object is there). The count taken after the kill
    # can be off by an object the kill caught mid-copy (seen once under load: 171 copied
    # after 28 counted), so it is compared within two.
    assert abs(backup.copied_objects - (RECORDS - copied_before)) <= 2, backup.copied_objects
    verify = medvault("backup", "verify", backup.id, "--read-data")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "OK" in verify.stdout
    listing = medvault("backup", "list")
    assert backup.id in listing.stdout

    s3_target.delete(next(iter(s3_target.list(OBJECTS_PREFIX))))
    failed = medvault("backup", "verify", backup.id)
    assert failed.returncode == 1
    assert "missing" in failed.stdout
