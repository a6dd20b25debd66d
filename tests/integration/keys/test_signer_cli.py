"""``medvault keys create-signer|import-cert|list`` go through the KeyService as the caller.

Run in a subprocess with only a key administrator's certificate (no config, PIN file,
database or token on the client side); the audit trail names the administrator. A
clinician is refused and the refusal audited. ``keys init-token`` stays local, says so,
and writes its own audit event into the deployment's database.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from service.localstack.ca import DevCA
from tests.fixtures.service import RunningService, TlsFiles
from tests.integration.access.helpers import engine_for, issue_client
from tests.integration.backup.helpers import ROOT, medvault_as

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def server(start_keys_server: Any) -> RunningService:
    service: RunningService = start_keys_server()
    return service


def _as(server: RunningService, tls: TlsFiles, certs: Path, cn: str, role: str,
        *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:  # fmt: skip
    cert, key = issue_client(tls, certs, cn, role)
    return medvault_as(server.endpoint, tls.ca, cert, key, *args, cwd=cwd)


def _events(url: str, principal_like: str) -> list[Any]:
    engine = engine_for(url)
    try:
        with engine.connect() as c:
            return list(c.execute(sa.text(
                "SELECT principal, action, outcome, resource, reason FROM audit_events "
                "WHERE principal LIKE :p ORDER BY sequence"), {"p": principal_like}))  # fmt: skip
    finally:
        engine.dispose()


def test_signer_commands_are_audited_as_the_key_admin(
    server: RunningService, tls_files: TlsFiles, tmp_path: Path, keys_database: str
) -> None:
    admin = f"ka-{secrets.token_hex(3)}"
    name = f"dr-{secrets.token_hex(3)}"
    certs = tmp_path / "certs"
    certs.mkdir()

    def as_admin(*args: str) -> subprocess.CompletedProcess[str]:
        return _as(server, tls_files, certs, admin, "key_admin", *args, cwd=tmp_path)

    created = as_admin("keys", "create-signer", name, "--csr", "req.pem")
    assert created.returncode == 0, created.stderr
    assert "key created" in created.stdout
    csr = (tmp_path / "req.pem").read_bytes()
    assert csr.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")

    signed = DevCA.load_or_create(tls_files.ca.parent).issue_signer(csr)
    (tmp_path / "signer.pem").write_bytes(signed)
    imported = as_admin("keys", "import-cert", name, "signer.pem")
    assert imported.returncode == 0, imported.stderr
    assert f"CN={name}" in imported.stdout
    assert "valid until" in imported.stdout

    # Another key's certificate is refused, naming the field, without a traceback.
    admin_cert = certs / f"client-{admin}.pem"
    mismatched = as_admin("keys", "import-cert", name, str(admin_cert))
    assert mismatched.returncode == 1
    assert "INVALID_ARGUMENT" in mismatched.stderr
    assert "certificate" in mismatched.stderr
    assert "Traceback" not in mismatched.stderr

    listed = as_admin("keys", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(name))
    assert f"CN={name}" in row

    events = _events(keys_database, admin)
    assert {e.action for e in events} == {"keys.manage"}
    resources = {(e.resource, e.outcome) for e in events}
    assert (f"signer/{name}", "allowed") in resources
    assert (f"signer/{name}", "failed") in resources, "the refused import is audited"
    assert ("signer", "allowed") in resources
    assert not (tmp_path / "no-home").exists()


def test_clinician_is_refused_and_audited(
    server: RunningService, tls_files: TlsFiles, tmp_path: Path, keys_database: str
) -> None:
    cn = f"dr-{secrets.token_hex(3)}"
    refused = _as(server, tls_files, tmp_path, cn, "physician", "keys", "create-signer",
                  "mine", cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 1
    assert "PERMISSION_DENIED" in refused.stderr
    assert not (tmp_path / "mine.csr.pem").exists()
    assert [e.outcome for e in _events(keys_database, cn)] == ["denied"]


def test_init_token_runs_locally_and_audits_into_the_deployment(
    server: RunningService, tmp_path: Path, keys_database: str
) -> None:
    def medvault(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip

    shown = medvault("keys", "init-token", "--help")
    assert "Runs locally" in " ".join(shown.stdout.split())
    before = len(_events(keys_database, "console%"))
    done = medvault("keys", "init-token", "--config", str(server.config_path))
    assert done.returncode == 0, done.stderr
    assert "all keys present" in done.stdout
    assert "Running upgrade" not in done.stdout + done.stderr
    events = _events(keys_database, "console%")
    assert len(events) == before + 1
    assert (events[-1].action, events[-1].outcome) == ("keys.init_token", "allowed")
