"""``bench/load.py`` end to end, briefly: 2 clients for 3 seconds on a test server with a
DICOM listener, every operation of the mix. The report must be clean: no error of any
kind, the read and write events of the run's patients equal to the successful reads and
writes, the chain verified, and every operation run at least once.

The figures themselves are not asserted (speed belongs to bench/, docs/reliability.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keystore import Pkcs11SessionPool
from keystore.certificates import create_signer_key, import_certificate, make_csr
from service.localstack.ca import DevCA
from tests.fixtures.databases import new_database
from tests.fixtures.service import ROOT, TlsFiles, free_port
from tests.integration.access.helpers import issue_client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180),
              pytest.mark.backend("postgresql")]  # fmt: skip
SECONDS = 3


@pytest.fixture
def fresh_database(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    yield from new_database(request, database_url, tmp_path_factory)


def test_a_short_load_run_is_clean(
    service_factory: Any, fresh_database: str, tls_files: TlsFiles,
    keystore_pool: Pkcs11SessionPool, tmp_path: Path,
) -> None:  # fmt: skip
    doctor = f"dr-load-{uuid.uuid4().hex[:8]}"  # a signer of its own on the session's token
    create_signer_key(keystore_pool, doctor, "ec-p256")
    csr = make_csr(keystore_pool, doctor, f"CN={doctor},O=medvault tests")
    import_certificate(keystore_pool, doctor, DevCA.load_or_create(tls_files.ca.parent)
                       .issue_signer(csr))  # fmt: skip
    dicom_port = free_port()
    service = service_factory(fresh_database, extra_sections={
        "signing": {"trust_anchors": tls_files.ca},
        "dicom": {"listen": f"127.0.0.1:{dicom_port}", "ae_title": "MEDVAULT"},
    })  # fmt: skip
    certs = tmp_path / "certs"
    cert, key = issue_client(tls_files, certs, doctor, "physician")
    issue_client(tls_files, certs, "officer-load", "security_officer")
    issue_client(tls_files, certs, "clerk-load", "records_clerk")
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "bench/load.py", "--clients", "2", "--seconds", str(SECONDS),
         # The address twice: the replica list's code path (one channel per client,
         # spread over the list), on one server.
         "--endpoint", f"{service.endpoint},{service.endpoint}",
         "--ca", str(tls_files.ca), "--cert", str(cert),
         "--key", str(key), "--officer", "officer-load", "--clerk", "clerk-load",
         "--dicom", f"127.0.0.1:{dicom_port}", "--json", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + service.state()
    r = json.loads(report.read_text())
    assert r["clean"], r["problems"]
    assert set(r["ops"]) == {"put", "get", "list", "sign", "audit", "store"}, r["ops"]
    assert all(not v["errors"] and v["ok"] > 0 for v in r["ops"].values()), r["ops"]
    assert r["reads_ok"] == r["read_events"] > 0
    assert r["writes_ok"] == r["write_events"] == r["ops"]["put"]["ok"] + r["ops"]["store"]["ok"]
    assert r["refused_events"] == 0
    assert r["chain_ok"]
    assert r["endpoints"] == [service.endpoint] * 2
