"""The state folder's disk full: the SQLite database on a small tmpfs, filled up.

Needs root to mount the tmpfs (``mount -t tmpfs``), as the CI machine runs; where that
is refused the test fails and says why (a skipped check would pass unseen).

Checked: with the disk full, puts fail with a clear status (never INTERNAL, never a
half-stored record); reads either succeed byte-identical or are refused UNAVAILABLE
because their audit event cannot be committed (reads are audited, fail closed); the
server keeps running; once space returns, without a restart, puts and reads work, every
acknowledged record reads back identical, no failed put is visible, the SQLite file
passes ``PRAGMA integrity_check``, the audit chain verifies, and a sweep leaves exactly
the referenced objects.

PYTEST_DONT_REWRITE: failures name counts and codes, never content.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import records_pb2_grpc as pb_grpc
from tests.faults.common import Sent, put_one, referenced_keys, sweep
from tests.fixtures.seaweed import S3Server
from tests.fixtures.service import RunningService, TlsFiles
from tests.fixtures.softhsm import SoftHsmToken
from tests.integration.access.helpers import client, issue_client, verify
from tests.integration.service.calls import expect_same_content, fetch, get, list_all, server_bucket
from tests.integration.service.streams import new_patient

pytestmark = pytest.mark.integration

Factory = Callable[..., RunningService]
TMPFS_SIZE = "16m"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of this test only, unmounted afterwards."""
    mount_point = tmp_path / "state"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()[:200]}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(directory: Path) -> Path:
    """Write a file until the file system is full; the file, to delete later."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 64 << 10, 4 << 10, 512):  # smaller and smaller to the brim
            while _write(fd, b"\0" * size):
                pass
    finally:
        os.close(fd)
    return filler


def _write(fd: int, block: bytes) -> bool:
    """Write ``block``; False once the disk is full."""
    try:
        return os.write(fd, block) == len(block)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            return False
        raise


@pytest.mark.timeout(240)
def test_state_disk_full(
    service_factory: Factory, small_disk: Path, s3_server: S3Server,
    softhsm_token: SoftHsmToken, tls_files: TlsFiles, tmp_path: Path,
) -> None:
    url = f"sqlite:///{small_disk / 'metadata.db'}"
    service = service_factory(url)
    bucket = server_bucket(service.config_path)
    patient = new_patient()
    acknowledged: dict[tuple[str, int], Sent] = {}
    seed = 70_000
    with service.channel() as channel:
        stub = pb_grpc.RecordServiceStub(channel)
        for _ in range(10):
            seed += 1
            sent = Sent(patient, 20_000, seed)
            record = put_one(stub, sent)
            acknowledged[(record.id, record.version)] = sent

        filler = _fill(small_disk)
        put_codes: dict[str, int] = {}
        put_details: set[str] = set()
        failed_seeds: set[int] = set()
        for _ in range(20):
            seed += 1
            sent = Sent(patient, 20_000, seed)
            try:
                record = put_one(stub, sent)
            except grpc.RpcError as e:
                put_codes[e.code().name] = put_codes.get(e.code().name, 0) + 1
                put_details.add(e.details() or "")
                failed_seeds.add(seed)
            else:  # a put may fit in space SQLite still holds (WAL, free pages)
                acknowledged[(record.id, record.version)] = sent
        read_codes: dict[str, int] = {}
        for (record_id, version), sent in acknowledged.items():
            got = fetch(stub, record_id, version)
            code = got.code()
            name = code.name if code else "OK"
            read_codes[name] = read_codes.get(name, 0) + 1
            if code is None:
                expect_same_content(got.content, sent.content())
        assert service.process.poll() is None, "the server died with the disk full"
        assert failed_seeds, "no put failed with the disk full"
        assert set(put_codes) <= {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}, f"put codes {put_codes}"
        assert set(read_codes) <= {"OK", "UNAVAILABLE"}, f"read codes {read_codes}"

        filler.unlink()  # space returns; the same server carries on
        for _ in range(5):
            seed += 1
            sent = Sent(patient, 20_000, seed)
            record = put_one(stub, sent)
            acknowledged[(record.id, record.version)] = sent
        listed = list_all(stub, patient, all_versions=True)
        assert {(r.id, r.version) for r in listed} == set(acknowledged), (
            f"{len(listed)} listed, {len(acknowledged)} acknowledged"
        )
        for (record_id, version), sent in acknowledged.items():
            expect_same_content(get(stub, record_id, version)[1], sent.content())

    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            integrity = c.execute(sa.text("PRAGMA integrity_check")).scalar()
    finally:
        engine.dispose()
    assert integrity == "ok", f"integrity_check: {integrity}"
    officer = client(
        service, issue_client(tls_files, tmp_path, "fault-officer", "security_officer")
    )
    try:
        chain = verify(officer)
    finally:
        officer.close()
    assert chain.ok, f"audit chain: {chain.reason} at {chain.first_bad_sequence}"
    sweep(service, str(softhsm_token.conf_path))
    keys = {o.object_name for o in s3_server.client().list_objects(bucket, recursive=True)}
    assert keys == referenced_keys(url), "objects and rows differ after the sweep"
    print(json.dumps({
        "puts_before": 10, "puts_while_full": 20, "put_codes_while_full": put_codes,
        "put_details": sorted(put_details), "reads_while_full": read_codes,
        "acknowledged": len(acknowledged), "integrity_check": integrity,
    }))
