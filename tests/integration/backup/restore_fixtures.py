"""Fixtures and helpers of the restore and drill tests (real token, S3, SQLite/PostgreSQL).

A *signed source* is the backup tests' ``Source`` with records of several sizes (one
spanning several segments, one amended), one record signed by a document signer on the
test token (certificate from a throw-away CA), and audit events under a signed
checkpoint, so the drill has every kind of check to make. Content is synthetic.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from keystore import Pkcs11SessionPool, Pkcs11Signers
from keystore.certificates import create_signer_key, import_certificate, make_csr
from keystore.signing import Pkcs11Signer
from service.audit.trail import AuditTrail
from service.backup.drill import drill_checks
from service.localstack.ca import DevCA
from service.signing import DocumentSigning
from service.signing.validation import SignatureValidator
from storage.audit_log import SqlAuditLog
from storage.audit_model import AuditEntry
from storage.backup import snapshot
from storage.backup.drill import DrillChecks
from storage.backup.restore import Deployment
from storage.backup.scratch import Scratch, s3_scratch
from storage.model import NewRecord, PatientRef, RecordKind
from storage.records import RecordStore
from storage.s3_blobs import MIB, S3BlobStore
from storage.signatures import SignatureStore
from storage.sql_metadata import make_engine, run_in_transaction, upgrade
from tests.fixtures.databases import PG_ADMIN_URL
from tests.integration.backup.helpers import AUTHORITY, ROOT, Source

AUDIT_KEY = "medvault-audit-v1"
BACKUP_KEY = "medvault-backup-v1"


@dataclass(frozen=True)
class DocSigner:
    """A signer on the test token and the CA certificate that vouches for it."""

    name: str
    ca_der: bytes

    def validator(self) -> SignatureValidator:
        return SignatureValidator([self.ca_der])


@pytest.fixture(scope="session")
def doc_signer(
    keystore_pool: Pkcs11SessionPool, tmp_path_factory: pytest.TempPathFactory
) -> DocSigner:
    """A document signer key with a certificate from a throw-away CA."""
    ca = DevCA.load_or_create(tmp_path_factory.mktemp("restore-ca"))
    name = f"restore-dr-{secrets.token_hex(4)}"
    create_signer_key(keystore_pool, name, "ec-p256")
    import_certificate(
        keystore_pool, name, ca.issue_signer(make_csr(keystore_pool, name, f"CN={name}"))
    )
    ca_der = x509.load_pem_x509_certificate(ca.cert_path.read_bytes()).public_bytes(Encoding.DER)
    return DocSigner(name, ca_der)


@dataclass
class SignedSource:
    """A populated source deployment and what its records should read back as."""

    source: Source
    digests: dict[tuple[str, int], bytes]  # (record id, version) -> SHA-256 of the content
    signed: tuple[str, int]
    signer: DocSigner

    def store(self) -> RecordStore:
        return self.source.store()

    def signing(self) -> DocumentSigning:
        store = self.store()
        return DocumentSigning(
            SignatureStore(store, self.source.engine),
            Pkcs11Signers(self.source.pool),
            self.signer.validator(),
        )


def _admit(_: Any) -> None:
    """No access control in these storage-level tests."""


def populate(source: Source, signer: DocSigner) -> SignedSource:
    """Records (small, multi-segment, amended), one signature, audit events + checkpoint."""
    store = source.store()
    patient = PatientRef(source.patient, AUTHORITY)
    digests: dict[tuple[str, int], bytes] = {}
    first = None
    for size in (10, 70_000, (1 << 20) + 12_345):
        content = secrets.token_bytes(size)
        header = NewRecord(patient, RecordKind.OTHER, "application/octet-stream", title="synthetic")
        info = store.put(header, [content], "test-app")
        digests[(info.id, info.version)] = hashlib.sha256(content).digest()
        first = first or info
    assert first is not None
    amended = secrets.token_bytes(5000)
    header = NewRecord(patient, RecordKind.OTHER, "application/octet-stream", title="amended",
                       supersedes=first.id)  # fmt: skip
    info = store.put(header, [amended], "test-app")
    digests[(info.id, info.version)] = hashlib.sha256(amended).digest()
    signing = DocumentSigning(
        SignatureStore(store, source.engine), Pkcs11Signers(source.pool), signer.validator()
    )
    signing.sign(
        info.id, info.version, signer.name, _admit,
        lambda _id, insert: run_in_transaction(source.engine, insert, write=True),
    )  # fmt: skip
    _audit(source)
    return SignedSource(source, digests, (info.id, info.version), signer)


def _audit(source: Source) -> None:
    trail = AuditTrail(SqlAuditLog(source.engine), Pkcs11Signer(source.pool, AUDIT_KEY))
    with trail:
        for n in range(3):
            trail.record(AuditEntry(
                time=datetime.now(UTC),
                principal="test-app", action="records.write", resource=f"record/{n}",
                outcome="allowed",
            ))  # fmt: skip
    # close() signed a checkpoint at the head


@pytest.fixture
def signed_source(make_source: Any, backend: str, doc_signer: DocSigner) -> SignedSource:
    """A populated source deployment on ``backend``."""
    return populate(make_source(backend), doc_signer)


def checks_for(pool: Pkcs11SessionPool, signer: DocSigner) -> DrillChecks:
    """The drill's checks on the test token, trusting ``signer``'s CA."""
    return drill_checks(pool, signer.validator(), audit_key_label=AUDIT_KEY,
                        backup_key_label=BACKUP_KEY)  # fmt: skip


def scratch_for(s3_server: Any, backend: str) -> Scratch:
    """Scratch deployments on the session's SeaweedFS and ``backend``."""
    return s3_scratch(s3_server.client(), PG_ADMIN_URL if backend == "postgresql" else None)


def wipe(deployment: Source | Deployment) -> None:
    """Delete every object of the bucket and every row of the medvault tables."""
    for info in list(deployment.blobs.list()):
        deployment.blobs.delete(info.key)
    with deployment.engine.begin() as connection:
        for table in reversed(snapshot.tables()):
            connection.execute(table.delete())


@pytest.fixture
def empty_deployment(fresh_url: Any, backend: str, s3_server: Any) -> Iterator[Deployment]:
    """A new, empty deployment on ``backend``: migrated database, new bucket."""
    engine = make_engine(fresh_url(backend, migrated=True))
    upgrade(engine)
    blobs = S3BlobStore(s3_server.client(), f"rs-{secrets.token_hex(8)}", part_size=5 * MIB)
    blobs.ensure_bucket()
    yield Deployment(engine, blobs)
    engine.dispose()


def count(engine: sa.Engine, table: str) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(sa.text(f"SELECT count(*) FROM {table}")) or 0)


def drill_buckets(s3_server: Any) -> list[str]:
    """Scratch buckets still present (each drill must remove its own)."""
    return [
        b.name for b in s3_server.client().list_buckets() if b.name.startswith("medvault-drill-")
    ]


def config_file(directory: Path, *, s3_server: Any, token: Any, bucket: str,
                database_url: str, trust_anchor_der: bytes = b"") -> Path:  # fmt: skip
    """A config file for the CLI (the backup target is given with ``--bucket``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.toml").write_text((ROOT / "deploy" / "policy.toml").read_text())
    text = f"""
[tls]
enabled = false

[s3]
endpoint = "{s3_server.endpoint}"
bucket = "{bucket}"
access_key_file = "{s3_server.access_key_file}"
secret_key_file = "{s3_server.secret_key_file}"

[database]
url = "{database_url}"

[keystore]
module = "{token.module_path}"
token_label = "{token.token_label}"
pin_env = ""
pin_file = "{token.pin_file}"
softhsm2_conf = "{token.conf_path}"
"""
    if trust_anchor_der:
        pem = x509.load_der_x509_certificate(trust_anchor_der).public_bytes(Encoding.PEM)
        (directory / "anchors.pem").write_bytes(pem)
        text += '\n[signing]\ntrust_anchors = "anchors.pem"\n'
    path = directory / "config.toml"
    path.write_text(text)
    return path
