"""A restore into another record bucket carries the grant revocation markers over.

The markers (``storage.grant_revocations``) are keyed by the record bucket's name. A
grant revoked after the backup was taken is active in the backup's rows; restored under
another bucket's name, its marker stayed under the old name and the grant was live
again (review 11b). ``medvault restore`` now copies every marker of the backed-up
deployment under the new name before it loads the rows: on the service started on the
restored deployment the grant is refused (PERMISSION_DENIED, audited) and its row is a
``grant-tampered`` incident. Real SeaweedFS, token and both databases.
"""

from __future__ import annotations

import io
import secrets
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from service._gen.medvault.v1 import access_pb2 as apb
from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import backup_pb2 as bpb
from service._gen.medvault.v1 import backup_pb2_grpc as bpb_grpc
from service.config import AuditConfig
from service.guard import NO_GRANT
from storage.backup.restore import table_counts
from storage.sql_metadata import make_engine
from tests.fixtures.service import RunningService, TlsFiles
from tests.integration.access.helpers import (
    TIMEOUT,
    client,
    events,
    fetch,
    grant,
    issue_client,
    new_patient,
    put_record,
)
from tests.integration.backup.helpers import ROOT
from tests.integration.backup.restore_fixtures import config_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@dataclass
class Revoked:
    """A deployment backed up while a grant was active, the grant revoked afterwards."""

    server: RunningService
    backup_id: str
    grant_id: str
    record_id: str
    reader_cert: tuple[Path, Path]
    reader: str
    clerk_cert: tuple[Path, Path]
    operator_cert: tuple[Path, Path]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip


def _backup(server: RunningService, cert: tuple[Path, Path]) -> str:
    stub = bpb_grpc.BackupServiceStub(server.channel(*cert))
    messages = list(stub.RunBackup(bpb.RunBackupRequest(), timeout=120))
    assert messages[-1].WhichOneof("message") == "result"
    return str(messages[-1].result.id)


@pytest.fixture
def revoked_after_backup(
    service_factory: Any, fresh_url: Any, backend: str, tls_files: TlsFiles, tmp_path: Path
) -> Iterator[Revoked]:
    bucket = f"mvr-{secrets.token_hex(6)}"
    server = service_factory(fresh_url(backend), extra_sections={"backup": {"bucket": bucket}})
    tag = secrets.token_hex(3)
    clerk_cert = issue_client(tls_files, tmp_path, f"clerk-{tag}", "records_clerk")
    clerk = client(server, clerk_cert)
    operator = issue_client(tls_files, tmp_path, f"op-{tag}", "backup_operator")
    name = f"phys-{tag}"
    reader_cert = issue_client(tls_files, tmp_path, name, "physician")
    patient = new_patient()
    record = put_record(clerk, patient)
    granted = grant(clerk, patient, name)
    reader = client(server, reader_cert, name)
    assert fetch(reader, record.id).code == grpc.StatusCode.OK
    backup_id = _backup(server, operator)  # the grant is active in the backup's rows
    clerk.access.RevokeAccess(apb.RevokeAccessRequest(grant_id=granted.id), timeout=TIMEOUT)
    assert fetch(reader, record.id).code == grpc.StatusCode.PERMISSION_DENIED
    reader.close()
    clerk.close()
    yield Revoked(server, backup_id, granted.id, record.id, reader_cert, name, clerk_cert, operator)
    server.stop()


def _markers(s3_server: Any, bucket: str) -> list[str]:
    listed = s3_server.client().list_objects(
        AuditConfig().witness_bucket, prefix=f"grant-revocations/{bucket}/", recursive=True
    )
    return [o.object_name or "" for o in listed]


def test_a_grant_revoked_after_the_backup_stays_revoked_in_another_bucket(
    revoked_after_backup: Revoked, service_factory: Any, fresh_url: Any, backend: str,
    s3_server: Any, softhsm_token: Any, tls_files: TlsFiles, tmp_path: Path,
) -> None:  # fmt: skip
    case = revoked_after_backup
    bucket = f"mvn-{secrets.token_hex(6)}"
    url = fresh_url(backend)
    into = config_file(tmp_path / "into", s3_server=s3_server, token=softhsm_token,
                       bucket=bucket, database_url=url)  # fmt: skip
    restored = _cli("restore", case.backup_id, "--into", str(into),
                    "--config", str(case.server.config_path))  # fmt: skip
    assert restored.returncode == 0, restored.stderr[-2000:]
    assert "1 revocation marker" in restored.stdout, restored.stdout
    assert [k.endswith(f"-{case.grant_id}") for k in _markers(s3_server, bucket)] == [True]

    server = service_factory(url, bucket=bucket)
    reader = client(server, case.reader_cert, case.reader)
    officer = client(server, issue_client(tls_files, tmp_path, "officer-r", "security_officer"))
    assert fetch(reader, case.record_id).code == grpc.StatusCode.PERMISSION_DENIED, "un-revoked"
    denied = events(officer, principal=case.reader, outcome=aupb.OUTCOME_DENIED)
    assert [e.reason for e in denied if e.resource.startswith(f"record/{case.record_id}/")] == [
        NO_GRANT
    ], "refusal not audited"
    incidents = events(officer, action="incident")
    assert any(e.resource == f"grant/{case.grant_id}" for e in incidents), "not reported"
    for c in (reader, officer):
        c.close()
    server.stop()


def test_a_restore_whose_markers_cannot_be_read_writes_nothing(
    revoked_after_backup: Revoked, fresh_url: Any, backend: str, s3_server: Any,
    softhsm_token: Any, tmp_path: Path,
) -> None:  # fmt: skip
    """The old deployment's witness bucket is not where ``--markers-from`` says: the
    restore is refused before anything is written, naming what to do."""
    case = revoked_after_backup
    elsewhere = config_file(tmp_path / "from", s3_server=s3_server, token=softhsm_token,
                            bucket="unused", database_url="sqlite:///unused.db")  # fmt: skip
    with elsewhere.open("a") as f:
        f.write(f'\n[audit]\nwitness_bucket = "gone-{secrets.token_hex(6)}"\n')
    bucket = f"mvn-{secrets.token_hex(6)}"
    into = config_file(tmp_path / "into", s3_server=s3_server, token=softhsm_token,
                       bucket=bucket, database_url=fresh_url(backend))  # fmt: skip
    refused = _cli("restore", case.backup_id, "--into", str(into), "--config",
                   str(case.server.config_path), "--markers-from", str(elsewhere))  # fmt: skip
    assert refused.returncode == 1, refused.stdout
    assert "revocation markers" in refused.stderr, refused.stderr
    assert "--without-revocation-markers" in refused.stderr, refused.stderr
    assert not s3_server.client().bucket_exists(bucket) or not list(
        s3_server.client().list_objects(bucket, recursive=True)
    ), "objects were restored"
    assert not _markers(s3_server, bucket)


def test_a_restore_carries_only_markers_of_the_backups_grants(
    revoked_after_backup: Revoked, fresh_url: Any, backend: str, s3_server: Any,
    softhsm_token: Any, tmp_path: Path,
) -> None:  # fmt: skip
    """Cold review 11d: someone who may write the old witness (or record) bucket adds
    markers under the old name; the restore copied every one of them into the new
    deployment's witness bucket (locked there for years, where the old ones may have been
    unlocked in a record bucket), one PUT each on the recovery's path. A marker naming
    no grant of the backup's rows revokes nothing there: it is left behind."""
    case = revoked_after_backup
    old = tomllib.loads(case.server.config_path.read_text())["s3"]["bucket"]
    junk = [f"grant-revocations/{old}/20240301T120000000000Z-{secrets.token_hex(16)}"
            for _ in range(3)]  # fmt: skip
    for key in junk:
        s3_server.client().put_object(AuditConfig().witness_bucket, key, io.BytesIO(b"{}\n"), 3)
    bucket = f"mvn-{secrets.token_hex(6)}"
    into = config_file(tmp_path / "into", s3_server=s3_server, token=softhsm_token,
                       bucket=bucket, database_url=fresh_url(backend))  # fmt: skip
    restored = _cli("restore", case.backup_id, "--into", str(into),
                    "--config", str(case.server.config_path))  # fmt: skip
    assert restored.returncode == 0, restored.stderr[-2000:]
    carried = _markers(s3_server, bucket)
    assert [k.rsplit("-", 1)[1] for k in carried] == [case.grant_id], "junk carried over"
    assert "3 naming no grant of the backup" in restored.stdout, restored.stdout


def test_markers_from_and_without_markers_together_are_refused(tmp_path: Path) -> None:
    """Cold review 11d: an operator who named where the old markers are and also passed
    --without-revocation-markers had them silently not carried (the flag won). The
    restore is refused before it reads anything, naming both flags."""
    missing = str(tmp_path / "absent.toml")
    refused = _cli("restore", "20240301T120000Z-0000", "--into", missing,
                   "--markers-from", missing, "--without-revocation-markers")  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "--without-revocation-markers" in refused.stderr, refused.stderr
    assert "--markers-from" in refused.stderr, refused.stderr


def test_without_markers_is_refused_while_the_old_markers_can_be_read(
    revoked_after_backup: Revoked, fresh_url: Any, backend: str, s3_server: Any,
    softhsm_token: Any, tmp_path: Path,
) -> None:  # fmt: skip
    """Cold review 11d: --without-revocation-markers (for markers lost with the old
    deployment) passed while they could be read restored without them: the grant revoked
    after the backup was active again. Refused, writing nothing, naming the flag."""
    case = revoked_after_backup
    bucket = f"mvn-{secrets.token_hex(6)}"
    into = config_file(tmp_path / "into", s3_server=s3_server, token=softhsm_token,
                       bucket=bucket, database_url=fresh_url(backend))  # fmt: skip
    refused = _cli("restore", case.backup_id, "--into", str(into), "--config",
                   str(case.server.config_path), "--without-revocation-markers")  # fmt: skip
    assert refused.returncode == 1, refused.stdout
    assert "--without-revocation-markers" in refused.stderr, refused.stderr
    assert "can be read" in refused.stderr, refused.stderr
    assert not s3_server.client().bucket_exists(bucket) or not list(
        s3_server.client().list_objects(bucket, recursive=True)
    ), "objects were restored"


def _witness(s3_server: Any, keys: list[str]) -> str:
    """A new bucket holding a copy of each of the markers ``keys`` (real witness bucket)."""
    s3 = s3_server.client()
    name = f"wit-{secrets.token_hex(6)}"
    s3.make_bucket(name)
    for key in keys:
        s3.put_object(name, key, io.BytesIO(b"{}\n"), 3)
    return name


def _markers_from(directory: Path, s3_server: Any, token: Any, witness: str) -> Path:
    path = config_file(directory, s3_server=s3_server, token=token, bucket="unused",
                       database_url="sqlite:///unused.db")  # fmt: skip
    with path.open("a") as f:
        f.write(f'\n[audit]\nwitness_bucket = "{witness}"\n')
    return path


def test_a_backup_with_revoked_grants_is_refused_where_none_has_a_marker(
    revoked_after_backup: Revoked, fresh_url: Any, backend: str, s3_server: Any,
    softhsm_token: Any, tmp_path: Path,
) -> None:  # fmt: skip
    """A backup holding revoked grants, restored with ``--markers-from`` naming a witness
    bucket that holds no marker of any of them (another deployment's), said "0
    revocation marker(s) ... carried over" and succeeded: every grant the old deployment
    revoked after the backup was active again, unnoticed. Each revocation writes its
    marker first, so that is the wrong place: refused before anything is written, naming
    it. Named where some of them are (the right place), the restore goes on, and the
    missing one is written from its row before any row loads."""
    case = revoked_after_backup
    clerk = client(case.server, case.clerk_cert)
    second = grant(clerk, new_patient(), case.reader)
    clerk.access.RevokeAccess(apb.RevokeAccessRequest(grant_id=second.id), timeout=TIMEOUT)
    clerk.close()
    backup_id = _backup(case.server, case.operator_cert)  # both grants revoked in its rows
    old = tomllib.loads(case.server.config_path.read_text())["s3"]["bucket"]
    own = sorted(_markers(s3_server, old))
    assert len(own) == 2, own
    other = f"grant-revocations/other-{secrets.token_hex(4)}/" + own[0].rsplit("/", 1)[1]
    wrong = _witness(s3_server, [other])  # another deployment's markers: none under `old`
    bucket = f"mvn-{secrets.token_hex(6)}"
    url = fresh_url(backend)
    into = config_file(tmp_path / "into", s3_server=s3_server, token=softhsm_token,
                       bucket=bucket, database_url=url)  # fmt: skip
    source = str(case.server.config_path)

    def restore_with_markers_in(name: str, witness: str) -> Any:
        markers = _markers_from(tmp_path / name, s3_server, softhsm_token, witness)
        return _cli("restore", backup_id, "--into", str(into), "--config", source,
                    "--markers-from", str(markers))  # fmt: skip

    refused = restore_with_markers_in("wrong", wrong)
    assert refused.returncode == 1, refused.stdout[-2000:]
    message = " ".join(refused.stderr.split())
    assert "2 revoked grant(s)" in message, message
    assert f"s3://{wrong}/grant-revocations/{old}/" in message, message
    assert "--markers-from" in message, message
    assert "--without-revocation-markers" in message, message
    engine = make_engine(url)
    try:
        counts = table_counts(engine, ["access_grants", "records", "audit_events"])
    finally:
        engine.dispose()
    assert counts == dict.fromkeys(counts, 0), f"rows were loaded: {counts}"
    assert not s3_server.client().bucket_exists(bucket) or not list(
        s3_server.client().list_objects(bucket, recursive=True)
    ), "objects were restored"
    assert not _markers(s3_server, bucket)

    # Where one of the two is (the first grant's), the other's is written from its row.
    first = [k for k in own if k.endswith(f"-{case.grant_id}")]
    right = _witness(s3_server, first)
    restored = restore_with_markers_in("right", right)
    assert restored.returncode == 0, restored.stderr[-2000:]
    out = " ".join(restored.stdout.split())
    assert "1 revocation marker(s)" in out, out
    assert "1 revoked grant(s) of the backup had no marker there" in out, out
    carried = {k.rsplit("-", 1)[1] for k in _markers(s3_server, bucket)}
    assert carried == {case.grant_id, second.id}


def test_a_marker_only_of_a_grant_revoked_after_the_backup_shows_the_right_place(
    revoked_after_backup: Revoked, fresh_url: Any, backend: str, s3_server: Any,
    softhsm_token: Any, tmp_path: Path,
) -> None:  # fmt: skip
    """Cold review 12: where the markers of the backup's revoked grants are all missing
    (a release before the markers; a marker past its retention) but a grant active in
    the backup and revoked after it has its marker there, the restore was refused as
    "the wrong place", and ``--without-revocation-markers`` is refused while that marker
    can be read: the backup could not be restored at all. That marker names a grant of
    the backup: the right place. The revoked grants' markers are written from their
    rows, the later one carried."""
    case = revoked_after_backup
    clerk = client(case.server, case.clerk_cert)
    revoked = grant(clerk, new_patient(), case.reader)
    clerk.access.RevokeAccess(apb.RevokeAccessRequest(grant_id=revoked.id), timeout=TIMEOUT)
    later = grant(clerk, new_patient(), case.reader)
    backup_id = _backup(case.server, case.operator_cert)  # `later` active in its rows
    clerk.access.RevokeAccess(apb.RevokeAccessRequest(grant_id=later.id), timeout=TIMEOUT)
    clerk.close()
    old = tomllib.loads(case.server.config_path.read_text())["s3"]["bucket"]
    only_later = [k for k in _markers(s3_server, old) if k.endswith(f"-{later.id}")]
    assert len(only_later) == 1, only_later
    bucket = f"mvn-{secrets.token_hex(6)}"
    into = config_file(tmp_path / "into", s3_server=s3_server, token=softhsm_token,
                       bucket=bucket, database_url=fresh_url(backend))  # fmt: skip
    markers_from = _markers_from(tmp_path / "right", s3_server, softhsm_token,
                                 _witness(s3_server, only_later))  # fmt: skip
    restored = _cli("restore", backup_id, "--into", str(into), "--config",
                    str(case.server.config_path), "--markers-from", str(markers_from))  # fmt: skip
    assert restored.returncode == 0, restored.stderr[-2000:]
    out = " ".join(restored.stdout.split())
    assert "2 revoked grant(s) of the backup had no marker there" in out, out
    carried = {k.rsplit("-", 1)[1] for k in _markers(s3_server, bucket)}
    assert carried == {case.grant_id, revoked.id, later.id}
