"""Fixtures of the signature tests: signers on the test token, a server that trusts the CA.

The signers are made in this process on the session's SoftHSM2 token before the server
starts, exactly as an operator would with ``medvault keys`` (key, CSR, certificate).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from keystore import Pkcs11SessionPool
from keystore.certificates import create_signer_key, import_certificate, make_csr
from service.localstack.ca import DevCA
from tests.fixtures.databases import new_database
from tests.fixtures.service import RunningService, TlsFiles, free_port
from tests.integration.access.helpers import Client, client, issue_client

# name -> (key kind, issuing CA: "trusted" | "rogue" | "expired")
SIGNERS = {
    "dr-ec": ("ec-p256", "trusted"),
    "dr-rsa": ("rsa-2048", "trusted"),
    "dr-rogue": ("ec-p256", "rogue"),
    "dr-old": ("ec-p256", "expired"),
    "dr-gone": ("ec-p256", "trusted"),  # its key is destroyed by a test, once loaded
}


@dataclass
class SigningStack:
    """The server, its CA, and one client per principal."""

    service: RunningService
    ca: DevCA
    clients: dict[str, Client]
    database_url: str
    metrics_port: int  # the server's Prometheus endpoint (its worker jobs)


def _make_signers(pool: Pkcs11SessionPool, trusted: DevCA, rogue: DevCA) -> None:
    for name, (kind, issuer) in SIGNERS.items():
        create_signer_key(pool, name, kind)  # type: ignore[arg-type]
        csr = make_csr(pool, name, f"CN={name},O=medvault tests")
        if issuer == "expired":
            pem = trusted.issue_signer(
                csr, not_before=datetime(2020, 1, 1, tzinfo=UTC),
                not_after=datetime(2021, 1, 1, tzinfo=UTC),
            )  # fmt: skip
        else:
            pem = (trusted if issuer == "trusted" else rogue).issue_signer(csr)
        import_certificate(pool, name, pem)


@pytest.fixture(scope="module")
def module_database(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    yield from new_database(request, database_url, tmp_path_factory)


@pytest.fixture(scope="module")
def stack(
    service_factory: Any,
    module_database: str,
    tls_files: TlsFiles,
    keystore_pool: Pkcs11SessionPool,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SigningStack]:
    ca = DevCA.load_or_create(tls_files.ca.parent)
    rogue = DevCA.load_or_create(tls_files.other_ca_client_cert.parent)
    _make_signers(keystore_pool, ca, rogue)
    metrics_port = free_port()
    service = service_factory(
        module_database, extra_sections={"signing": {"trust_anchors": tls_files.ca}},
        # No periodic health probe: its job would count among the server's worker jobs.
        metrics_listen=f"127.0.0.1:{metrics_port}", health_probe_seconds=3600,
    )  # fmt: skip
    certs: Path = tmp_path_factory.mktemp("signing-certs")
    roles = {**{name: "physician" for name in SIGNERS}, "dr-none": "physician",
             "dr-nogrant": "physician", "clerk-s": "records_clerk",
             "officer-s": "security_officer", "nurse-s": "nurse"}  # fmt: skip
    clients = {
        name: client(service, issue_client(tls_files, certs, name, role), name)
        for name, role in roles.items()
    }
    yield SigningStack(service, ca, clients, module_database, metrics_port)
    for c in clients.values():
        c.close()
