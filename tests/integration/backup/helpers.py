"""Helpers of the backup tests: synthetic records, a target per test, the CLI in a subprocess.

Records are written with ``RecordStore`` (the service's own write path: token-wrapped
keys, encrypted objects, metadata rows). Every identifier is synthetic and random.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11KeyWrapper, Pkcs11SessionPool
from keystore.signing import Pkcs11Signer
from storage.audit_log import SqlAuditLog
from storage.audit_model import AuditEntry
from storage.backup.manifest import Manifest, SourceInfo, manifest_key, sign, signature_key
from storage.backup.runner import BackupResult, run_backup, source_identity
from storage.backup.targets import BackupTarget, read_all
from storage.grants import access_grants
from storage.model import NewRecord, PatientRef, RecordKind
from storage.records import RecordStore
from storage.s3_blobs import S3BlobStore
from storage.signatures import record_signatures

ROOT = Path(__file__).resolve().parents[3]
BACKUP_KEY = "medvault-backup-v1"
AUTHORITY = "urn:oid:2.999.42.7"


@dataclass
class Source:
    """A deployment to back up: database, bucket, token; records written so far."""

    engine: Engine
    blobs: S3BlobStore
    pool: Pkcs11SessionPool
    endpoint: str
    marker: str = field(default_factory=lambda: f"BKMARK{secrets.token_hex(8)}")
    patient: str = field(default_factory=lambda: f"SYNTH{secrets.token_hex(8)}")
    object_keys: list[str] = field(default_factory=list)

    def store(self) -> RecordStore:
        return RecordStore(self.blobs, _metadata(self.engine), Pkcs11KeyWrapper(self.pool),
                           Pkcs11BlindIndexer(self.pool))

    def add_records(self, count: int, size: int = 2000) -> list[str]:
        """``count`` synthetic HL7 records carrying the patient id and the marker."""
        store = self.store()
        ids = []
        for n in range(count):
            # One message (one MSH, one PID: a record names one patient), padded to
            # ``size`` with notes carrying the marker.
            head = (f"MSH|^~\\&|TEST|TEST|||20260101||ORU^R01|{n}|P|2.5\r"
                    f"PID|1||{self.patient}^^^{AUTHORITY}||DOE^SYNTH\r")
            note = f"NTE|1||{self.marker}\r"
            content = (head + note * (size // len(note) + 1)).encode()[:size]
            info = store.put(
                NewRecord(PatientRef(self.patient, AUTHORITY), RecordKind.HL7V2,
                          "x-application/hl7-v2+er7", title=f"note {n} {self.marker}"),
                [content], "test-app",
            )
            ids.append(info.id)
        return ids

    def add_other_rows(self) -> None:
        """An audit event, a grant and a signature row, so every table has data."""
        now = datetime.now(UTC)
        SqlAuditLog(self.engine).append([AuditEntry(
            time=now, principal="test-app", action="records.write", resource="record/x",
            outcome="allowed", patient_index=bytes(32), reason="",
        )])
        with self.engine.begin() as c:
            c.execute(access_grants.insert().values(
                id=secrets.token_hex(16), patient_index=bytes(32), principal="dr-synth",
                granted_by="admin", created_at=now, expires_at=now, break_glass=True,
                reason="synthetic emergency"))
            row = c.execute(sa.text("SELECT id, version FROM records LIMIT 1")).first()
            assert row is not None
            c.execute(record_signatures.insert().values(
                id=secrets.token_hex(16), record_id=row[0], version=row[1], signer="signer",
                certificate_subject="CN=synthetic", algorithm="ecdsa-sha256",
                signing_time=now, created_at=now, sealed_p7s=secrets.token_bytes(64)))

    def identity(self) -> SourceInfo:
        return source_identity(self.engine, self.blobs.bucket, self.endpoint)

    def signer(self) -> Pkcs11Signer:
        return Pkcs11Signer(self.pool, BACKUP_KEY)

    def backup(self, target: BackupTarget, **kwargs: object) -> BackupResult:
        return run_backup(self.engine, self.blobs, target, self.signer(), self.identity(),
                          **kwargs)  # type: ignore[arg-type]


def _metadata(engine: Engine):  # type: ignore[no-untyped-def]
    from storage.sql_metadata import SqlMetadataStore  # noqa: PLC0415

    return SqlMetadataStore(engine)


def medvault_as(
    endpoint: str, ca: Path, cert: Path, key: Path, *args: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """``medvault ARGS`` with a caller's certificate and nothing from the server's machine.

    The environment holds the endpoint and the caller's TLS files only: no config file,
    no PIN, no database, no token (``SOFTHSM2_CONF`` and every other ``MEDVAULT_*``
    removed; ``MEDVAULT_HOME`` is a directory that does not exist).
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEDVAULT_", "SOFTHSM2")) and k != "PYTHONPATH"}  # fmt: skip
    env.update(
        PYTHONPATH=str(ROOT), MEDVAULT_HOME=str(cwd / "no-home"), MEDVAULT_ENDPOINT=endpoint,
        MEDVAULT_CA=str(ca), MEDVAULT_CERT=str(cert), MEDVAULT_KEY=str(key),
    )  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "service", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip


def table_rows(engine: Engine, table: sa.Table) -> list[dict[str, object]]:
    """Every row of ``table``, ordered by primary key, times in UTC."""
    with engine.connect() as c:
        rows = c.execute(sa.select(table).order_by(*table.primary_key.columns)).mappings()
        return [{k: _norm(v) for k, v in r.items()} for r in rows]


def _norm(value: object) -> object:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def forged_snapshot(data: bytes, table: str, column: str, value: object) -> bytes:
    """``data`` (a gzipped snapshot) with ``column`` of ``table``'s first row set to
    ``value``: what a release that copied values of another type wrote."""
    lines = []
    done = False
    for line in gzip.decompress(data).splitlines():
        doc = json.loads(line)
        if doc["table"] == table and not done:
            doc["row"][column] = value
            done = True
        lines.append(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    assert done, f"no {table} row in the snapshot"
    return gzip.compress(b"\n".join(lines) + b"\n")


def forge_backup_snapshot(
    source: Source, target: BackupTarget, backup_id: str, table: str, column: str,
    value: object,
) -> None:  # fmt: skip
    """Backup ``backup_id``'s snapshot with a value of another type (``forged_snapshot``),
    its manifest updated and signed again with the backup key: a backup an earlier
    release made of a database holding that value, as it would read today."""
    manifest = Manifest.from_bytes(read_all(target, manifest_key(backup_id)))
    data = forged_snapshot(read_all(target, manifest.snapshot.key), table, column, value)
    snapshot = dataclasses.replace(
        manifest.snapshot, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    manifest_bytes = dataclasses.replace(manifest, snapshot=snapshot).to_bytes()
    signature = sign(manifest_bytes, source.signer())
    for key, content in ((manifest.snapshot.key, data), (manifest_key(backup_id), manifest_bytes),
                         (signature_key(backup_id), signature)):  # fmt: skip
        target.delete(key)
        target.put(key, [content])
