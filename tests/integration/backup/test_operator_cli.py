"""The operator's commands go through the service, as the operator (issue 9, item 2).

``medvault backup run|list|verify|prune|public-key`` and ``restore-drill`` run in a
subprocess with only the operator's certificate: an empty working directory, no
``MEDVAULT_HOME``, no config file, no PIN file, no database URL, no token. The server
(real SeaweedFS, SoftHSM2, SQLite and PostgreSQL) authorises and audits them under the
certificate's name; a clinician is refused and the refusal is audited. The public key
the service exports verifies a real manifest with the ``openssl`` binary alone.
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.fixtures.databases import new_database
from tests.fixtures.service import RunningService, TlsFiles
from tests.integration.access.helpers import (
    client,
    engine_for,
    issue_client,
    new_patient,
    put_record,
)
from tests.integration.backup.helpers import medvault_as

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
UNKNOWN_ID = "20200101T000000Z-0badc0de"


@dataclass
class Deployment:
    server: RunningService
    url: str
    bucket: str
    tls: TlsFiles
    certs: Path


@pytest.fixture(scope="module")
def deployment(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory,
    service_factory: Any, tls_files: TlsFiles,
) -> Iterator[Deployment]:  # fmt: skip
    bucket = f"mvo-{secrets.token_hex(6)}"
    certs = tmp_path_factory.mktemp("certs")
    for url in new_database(request, database_url, tmp_path_factory):
        server = service_factory(url, extra_sections={"backup": {"bucket": bucket}})
        clerk = client(server, issue_client(tls_files, certs, "clerk-op", "records_clerk"))
        for size in (10, 70_000, 300_000):
            put_record(clerk, new_patient(), secrets.token_bytes(size))
        clerk.close()
        yield Deployment(server, url, bucket, tls_files, certs)
        server.stop()


def medvault(d: Deployment, cn: str, role: str, *args: str,
             cwd: Path) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``medvault ARGS`` as ``cn`` (a certificate whose OU is ``role``), and nothing else."""
    cert, key = issue_client(d.tls, d.certs, cn, role)  # issued once, then kept
    return medvault_as(d.server.endpoint, d.tls.ca, cert, key, *args, cwd=cwd)


def _events(d: Deployment, where: str, **params: Any) -> list[Any]:
    engine = engine_for(d.url)
    try:
        with engine.connect() as c:
            return list(c.execute(sa.text(
                "SELECT principal, action, outcome, resource, reason FROM audit_events "
                f"WHERE {where} ORDER BY sequence"), params))  # fmt: skip
    finally:
        engine.dispose()


def _object(s3_server: Any, bucket: str, key: str) -> bytes:
    response = s3_server.client().get_object(bucket, key)
    try:
        return bytes(response.read())
    finally:
        response.close()
        response.release_conn()


def _run_backup(d: Deployment, cn: str, tmp_path: Path) -> str:
    run = medvault(d, cn, "backup_operator", "backup", "run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r"backup (\d{8}T\d{6}Z-[0-9a-f]{8}) complete", run.stdout)
    assert found, run.stdout
    return found.group(1)


def test_operator_commands_are_audited_as_the_operator(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    operator = f"op-{secrets.token_hex(3)}"
    assert not (tmp_path / "no-home").exists()
    run = medvault(d, operator, "backup_operator", "backup", "run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    backup_id = re.search(r"backup (\S+) complete", run.stdout).group(1)  # type: ignore[union-attr]
    # Not a terminal: one line per finished phase, once each, sizes human-readable.
    phase_lines = [line for line in run.stderr.splitlines() if re.match(r"^\w+: \d+/\d+ ", line)]
    phases = [line.split(":")[0] for line in phase_lines]
    assert len(phases) == len(set(phases)) >= 2, run.stderr
    assert re.search(r"\(\d+(\.\d)? (B|KiB|MiB)\)", run.stdout), run.stdout
    assert "KiB" in run.stdout, run.stdout  # ~370 KB of objects: not a raw byte count

    listing = medvault(d, operator, "backup_operator", "backup", "list", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert backup_id in listing.stdout

    verify = medvault(d, operator, "backup_operator", "backup", "verify", backup_id,
                      "--read-data", cwd=tmp_path)  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "signature valid" in verify.stdout
    assert verify.stdout.rstrip().endswith("OK")
    assert re.search(r"took [\d.]+ s: [\d.]+ objects/s, .*/s", verify.stdout), verify.stdout

    prune = medvault(d, operator, "backup_operator", "backup", "prune", "--dry-run",
                     cwd=tmp_path)  # fmt: skip
    assert prune.returncode == 0, prune.stderr
    assert "would remove" in prune.stdout

    drill = medvault(d, operator, "backup_operator", "restore-drill", backup_id, cwd=tmp_path)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert f"full drill of backup {backup_id}: PASSED" in drill.stdout
    assert re.search(r"throughput .*/s, [\d.]+ records/s \(\d+ workers\)", drill.stdout)
    assert "Running upgrade" not in drill.stdout + drill.stderr  # no alembic lines
    report_key = re.search(r"signed report: (\S+)", drill.stdout).group(1)  # type: ignore[union-attr]
    again = medvault(d, operator, "backup_operator", "restore-drill", backup_id, cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    second_key = re.search(r"signed report: (\S+)", again.stdout).group(1)  # type: ignore[union-attr]
    assert second_key != report_key, "each drill report has a name of its own"

    mine = _events(d, "principal = :p", p=operator)
    actions = {(e.action, e.outcome) for e in mine}
    assert ("backup.run", "allowed") in actions
    assert ("backup.read", "allowed") in actions
    assert any("prune" in e.reason for e in mine)
    assert any("restore drill passed" in e.reason for e in mine)
    assert _events(d, "principal LIKE 'console%'") == [], "nothing audited as console:*"
    assert not (tmp_path / "no-home").exists(), "the CLI needed no home directory"


@pytest.mark.parametrize("args", [("backup", "run"), ("backup", "list"),
                                  ("backup", "public-key"), ("restore-drill", UNKNOWN_ID)])
def test_clinician_is_refused_and_the_refusal_audited(
    deployment: Deployment, tmp_path: Path, args: tuple[str, ...]
) -> None:
    cn = f"dr-{secrets.token_hex(3)}"
    refused = medvault(deployment, cn, "physician", *args, cwd=tmp_path)
    assert refused.returncode == 1
    assert "PERMISSION_DENIED" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    denied = _events(deployment, "principal = :p", p=cn)
    assert [(e.outcome) for e in denied] == ["denied"], denied


def test_drill_of_an_unknown_backup_is_refused_without_a_report(
    deployment: Deployment, tmp_path: Path, s3_server: Any
) -> None:
    cn = f"op-{secrets.token_hex(3)}"
    drill = medvault(deployment, cn, "backup_operator", "restore-drill", UNKNOWN_ID,
                     cwd=tmp_path)  # fmt: skip
    assert drill.returncode == 1
    assert "NOT_FOUND" in drill.stderr, drill.stderr
    assert UNKNOWN_ID in drill.stderr
    assert "Traceback" not in drill.stderr
    reports = list(s3_server.client().list_objects(
        deployment.bucket, f"drills/{UNKNOWN_ID}/", recursive=True))  # fmt: skip
    assert reports == [], "no report for a backup that does not exist"
    [event] = _events(deployment, "principal = :p", p=cn)
    assert (event.outcome, event.resource) == ("failed", f"backup/{UNKNOWN_ID}")


def test_public_key_verifies_a_manifest_with_openssl(
    deployment: Deployment, tmp_path: Path, s3_server: Any
) -> None:
    d = deployment
    operator = f"op-{secrets.token_hex(3)}"
    backup_id = _run_backup(d, operator, tmp_path)
    exported = medvault(d, operator, "backup_operator", "backup", "public-key",
                        "-o", "backup-key.pem", cwd=tmp_path)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    pem = tmp_path / "backup-key.pem"
    assert pem.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert _events(d, "principal = :p AND reason LIKE 'export%'", p=operator)
    offline = medvault(d, operator, "backup_operator", "backup", "verify", backup_id,
                       "--trusted-key", "backup-key.pem", "--config", str(d.server.config_path),
                       cwd=tmp_path)  # fmt: skip
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert "signature valid" in offline.stdout

    # The auditor's steps of docs/operations.md, with openssl alone.
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(_object(s3_server, d.bucket, f"manifests/{backup_id}.json"))
    sig = json.loads(_object(s3_server, d.bucket, f"manifests/{backup_id}.sig.json"))
    assert sig["algorithm"] == "ecdsa-sha256"
    (tmp_path / "manifest.sig").write_bytes(base64.b64decode(sig["signature"]))
    (tmp_path / "signer.der").write_bytes(base64.b64decode(sig["public_key_der"]))

    def openssl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", *args], cwd=tmp_path, capture_output=True,
                              text=True, check=False)  # fmt: skip

    same_key = openssl("pkey", "-pubin", "-inform", "DER", "-in", "signer.der", "-outform", "PEM")
    assert same_key.stdout == pem.read_text(), "the signature file names the exported key"
    good = openssl("dgst", "-sha256", "-verify", "backup-key.pem", "-signature",
                   "manifest.sig", "manifest.json")  # fmt: skip
    assert good.returncode == 0, good.stdout + good.stderr
    assert "Verified OK" in good.stdout

    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0x01
    manifest.write_bytes(bytes(data))
    bad = openssl("dgst", "-sha256", "-verify", "backup-key.pem", "-signature",
                  "manifest.sig", "manifest.json")  # fmt: skip
    assert bad.returncode != 0
    assert "Verification failure" in bad.stdout + bad.stderr


def test_drill_of_a_corrupted_backup_fails_and_says_so(
    deployment: Deployment, tmp_path: Path, s3_server: Any
) -> None:
    d = deployment
    operator = f"op-{secrets.token_hex(3)}"
    backup_id = _run_backup(d, operator, tmp_path)
    s3 = s3_server.client()
    biggest = max(s3.list_objects(d.bucket, "objects/", recursive=True),
                  key=lambda o: o.size or 0)  # fmt: skip
    original = _object(s3_server, d.bucket, biggest.object_name)
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    s3.put_object(d.bucket, biggest.object_name, io.BytesIO(bytes(flipped)), len(flipped))
    try:
        drill = medvault(d, operator, "backup_operator", "restore-drill", backup_id,
                         cwd=tmp_path)  # fmt: skip
    finally:  # the other tests of this deployment back up the same objects
        s3.put_object(d.bucket, biggest.object_name, io.BytesIO(original), len(original))
    assert drill.returncode == 1, drill.stdout + drill.stderr
    assert f"drill of backup {backup_id}: FAILED" in drill.stdout
    assert "object:" in drill.stdout, drill.stdout
    assert "signed report: drills/" in drill.stdout
    ends = [e for e in _events(d, "principal = :p", p=operator) if "drill" in e.reason]
    assert ends[-1].outcome == "failed"


def test_prune_applies_the_callers_rules_and_refuses_keeping_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    operator = f"op-{secrets.token_hex(3)}"
    _run_backup(d, operator, tmp_path)
    newest = _run_backup(d, operator, tmp_path)
    dry = medvault(d, operator, "backup_operator", "backup", "prune", "--dry-run",
                   "--keep-daily", "1", "--keep-weekly", "0", "--keep-monthly", "0",
                   cwd=tmp_path)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    removed = int(re.search(r"would remove (\d+):", dry.stdout).group(1))  # type: ignore[union-attr]
    assert removed >= 1, dry.stdout  # two backups today, the rule keeps one
    assert newest not in dry.stdout.splitlines()[0].partition(":")[2], "the newest stays"
    listing = medvault(d, operator, "backup_operator", "backup", "list", cwd=tmp_path)
    assert newest in listing.stdout

    nothing = medvault(d, operator, "backup_operator", "backup", "prune", "--keep-daily", "0",
                       "--keep-weekly", "0", "--keep-monthly", "0", cwd=tmp_path)  # fmt: skip
    assert nothing.returncode == 1
    assert "INVALID_ARGUMENT" in nothing.stderr
    assert "keep nothing" in nothing.stderr
    reasons = [e.reason for e in _events(d, "principal = :p", p=operator)]
    assert any("prune (dry run)" in r for r in reasons), reasons
    assert any("keep nothing" in r for r in reasons), "the refused prune is audited"


def test_sampled_drill_through_the_service_says_so_and_can_be_repeated(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    operator = f"op-{secrets.token_hex(3)}"
    backup_id = _run_backup(d, operator, tmp_path)
    seed = secrets.token_hex(16)
    args = ("restore-drill", backup_id, "--sample-confidence", "0.5", "--max-defect-rate",
            "0.5", "--seed", seed)  # fmt: skip
    drill = medvault(d, operator, "backup_operator", *args, cwd=tmp_path)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert f"SAMPLED drill of backup {backup_id}: PASSED" in drill.stdout
    assert re.search(r"sample: 1 of \d+ records decrypted", drill.stdout), drill.stdout
    assert f"--seed {seed}" in drill.stdout
    assert re.search(r"throughput .*/s, [\d.]+ records/s \(\d+ workers\)", drill.stdout)
    reasons = [e.reason for e in _events(d, "principal = :p", p=operator)]
    assert any(seed in r and r.startswith("sampled restore drill started") for r in reasons)
    assert any("restore drill passed (sampled drill" in r for r in reasons), reasons

    bad = medvault(d, operator, "backup_operator", "restore-drill", backup_id,
                   "--sample-confidence", "1.5", cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr, bad.stderr
    assert "sample_confidence" in bad.stderr
    refused = _events(d, "principal = :p AND outcome = 'failed'", p=operator)
    assert any("sample_confidence" in e.reason for e in refused), "the refusal is audited"
