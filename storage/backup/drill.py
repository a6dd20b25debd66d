"""The restore drill: restore a backup into a scratch place and prove every record readable.

A drill restores (:func:`storage.backup.restore.restore`) into a scratch bucket and a
scratch database, then for every record version: unwraps its data key in the token,
decrypts the whole object (every segment's tag checked), compares the plaintext SHA-256
with the sealed digest and the ciphertext SHA-256 with the row and the manifest, and
checks each of its signatures. It then walks the audit chain (checkpoint signatures
included) and compares the counts and the audit head with the manifest. The recovery
time is measured from the start to the moment the restored store is verified.

Layering: signature validation and the checkpoint key live in ``service`` (pyHanko, the
audit key), which ``storage`` must not import. The drill therefore receives them as
plain callables (:class:`DrillChecks`); ``service.backup.drill`` builds them from the
configuration, writes the audit event, and is what the CLI and the servicer call.

The report (format ``medvault-drill/1``) is canonical JSON at
``drills/<backup-id>/<drill-time>-<8 hex>.json``, signed like a manifest (``.sig.json``, the
backup key). It names records, objects and tables, never content or patient data.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import BlindIndexer, KeystoreError, KeyWrapper, Signer
from storage.audit_log import SqlAuditLog
from storage.audit_model import Checkpoint
from storage.audit_verify import verify_chain
from storage.backup import BackupError
from storage.backup.manifest import (
    DRILLS_PREFIX,
    Manifest,
    canonical_json,
    check_backup_id,
    sign,
    signature_problem,
)
from storage.backup.restore import (
    Deployment,
    KekInventory,
    RestoreFailure,
    RestoreResult,
    Scratch,
    restore,
)
from storage.backup.runner import BackupProgress, ProgressCallback
from storage.backup.targets import BackupTarget, read_all
from storage.envelope import StreamingAead
from storage.errors import StorageError
from storage.row_auth import RowVerifier
from storage.signatures import record_signatures, unseal_p7s
from storage.sql_metadata import from_db_time, records, to_stored_record, translated

REPORT_FORMAT = "medvault-drill/1"
_SIGNATURE_SUFFIX = ".sig.json"

# (p7s, content SHA-256, signing time) -> (valid, reason when not).
SignatureCheck = Callable[[bytes, bytes, datetime], tuple[bool, str]]
CheckpointCheck = Callable[[Checkpoint], bool]


class TokenKeys(KeyWrapper, KekInventory, Protocol):
    """Unwrap data keys and list KEK versions (``Pkcs11KeyWrapper`` is one)."""


@dataclass(frozen=True, slots=True)
class DrillChecks:
    """What the drill checks with; built by the service layer (see the module docstring)."""

    keys: TokenKeys
    token_label: str
    # The backup key: its public half must have signed the manifest; it signs the report.
    backup_signer: Signer
    verify_signature: SignatureCheck
    verify_checkpoint: CheckpointCheck
    # The blind-index key: legacy (v1) rows are checked by recomputing their patient's
    # index; without it a legacy row fails the drill.
    indexer: BlindIndexer | None = None


@dataclass(frozen=True, slots=True)
class DrillRequest:
    """One drill: which backup, from where, into what scratch place."""

    target: BackupTarget
    backup_id: str
    scratch: Scratch
    progress: ProgressCallback | None = None


@dataclass(frozen=True, slots=True)
class DrillReport:
    """The signed outcome of a drill; ``document`` is exactly what was written."""

    backup_id: str
    ok: bool
    recovery_seconds: float
    records_verified: int
    bytes_verified: int
    failures: tuple[RestoreFailure, ...]
    key: str
    document: dict[str, Any]


@dataclass
class _Tally:
    """What the record walk verified so far."""

    records: int = 0
    bytes: int = 0
    plaintext_bytes: int = 0
    signatures: int = 0
    failures: list[RestoreFailure] = field(default_factory=list)


def run_drill(request: DrillRequest, checks: DrillChecks) -> DrillReport:
    """Restore into scratch, verify everything, write and return the signed report."""
    check_backup_id(request.backup_id)  # it becomes part of the report's key
    started_at, started = datetime.now(UTC), time.monotonic()
    report = request.progress or _no_progress
    document: dict[str, Any] = {"format": REPORT_FORMAT, "backup_id": request.backup_id}
    failures: list[RestoreFailure] = []
    tally = _Tally()
    try:
        with request.scratch() as scratch:
            restored = restore(
                request.target, request.backup_id, scratch, keks=checks.keys,
                token_label=checks.token_label,
                trusted_public_key=checks.backup_signer.public_key_der(),
                strict=False, progress=report,
            )  # fmt: skip
            failures.extend(restored.failures)
            tally = verify_records(scratch, restored.manifest, checks, report)
            failures.extend(tally.failures)
            document.update(_audit_section(scratch.engine, restored.manifest, checks, failures))
            document.update(_count_section(scratch.engine, restored, tally, failures))
            seconds = time.monotonic() - started
    except (BackupError, StorageError, KeystoreError) as e:
        # Refused before or during the restore: the message names what (no content).
        failures.append(RestoreFailure("restore", str(e)))
        seconds = time.monotonic() - started
    except sa.exc.SQLAlchemyError as e:  # the snapshot did not load; rows stay unnamed
        failures.append(
            RestoreFailure("restore", f"database refused the snapshot ({type(e).__name__})")
        )
        seconds = time.monotonic() - started
    document.update(
        started_at=started_at.isoformat(), finished_at=datetime.now(UTC).isoformat(),
        ok=not failures, recovery_seconds=round(seconds, 3),
        verified={"records": tally.records, "bytes": tally.bytes,
                  "plaintext_bytes": tally.plaintext_bytes, "signatures": tally.signatures},
        failures=[_failure_doc(f) for f in failures],
    )  # fmt: skip
    key = _write_report(request.target, request.backup_id, started_at, document, checks)
    return DrillReport(
        backup_id=request.backup_id, ok=not failures, recovery_seconds=seconds,
        records_verified=tally.records, bytes_verified=tally.bytes,
        failures=tuple(failures), key=key, document=document,
    )  # fmt: skip


def _no_progress(_: BackupProgress) -> None:
    """No progress display."""


def _failure_doc(failure: RestoreFailure) -> dict[str, Any]:
    doc: dict[str, Any] = {"check": failure.check, "detail": failure.detail}
    if failure.object_key:
        doc["object_key"] = failure.object_key
    if failure.record_id:
        doc["record_id"] = failure.record_id
        doc["version"] = failure.version
    return doc


# -- every record ------------------------------------------------------------------


def _hashed(chunks: Iterator[bytes], digest: hashlib._Hash) -> Iterator[bytes]:
    """Pass the ciphertext through while hashing it: one read checks tags and digest."""
    for chunk in chunks:
        digest.update(chunk)
        yield chunk


def _rows(engine: Engine) -> Iterator[Any]:
    query = sa.select(records).order_by(records.c.id, records.c.version)
    with translated(engine), engine.connect() as connection:
        yield from connection.execution_options(stream_results=True, yield_per=200).execute(query)


def _signature_rows(engine: Engine) -> dict[tuple[str, int], list[Any]]:
    out: dict[tuple[str, int], list[Any]] = {}
    with translated(engine), engine.connect() as connection:
        for row in connection.execute(sa.select(record_signatures)):
            out.setdefault((row.record_id, row.version), []).append(row)
    return out


Problem = tuple[str, str] | None  # (check, detail) of the first problem, None if sound


class _RecordVerifier:
    """Checks one record version after another against the manifest and the token."""

    def __init__(self, into: Deployment, manifest: Manifest, checks: DrillChecks) -> None:
        self._blobs = into.blobs
        self._expected = {o.object_key: o.sha256 for o in manifest.objects}
        self._signatures = _signature_rows(into.engine)
        self._checks = checks
        # The same verification as every read (storage.row_auth), row columns included.
        self._verifier = RowVerifier(checks.keys, checks.indexer)
        self.tally = _Tally()

    def check(self, row: Any) -> None:
        """Verify one row; count it, or record its failure (named by record and object)."""
        problem = self._one(row)
        if problem is None:
            self.tally.records += 1
            self.tally.bytes += int(row.stored_size)
            return
        self.tally.failures.append(
            RestoreFailure(problem[0], problem[1], row.object_key, row.id, row.version)
        )

    def _one(self, row: Any) -> Problem:
        try:
            verified = self._verifier.verify(to_stored_record(row))
        except (KeystoreError, StorageError) as e:
            what = type(e).__name__
            return "key", f"data key, sealed metadata or row did not authenticate ({what})"
        dek, sealed, ad = verified.dek, verified.sealed, verified.ad
        cipher, plain, size = hashlib.sha256(), hashlib.sha256(), 0
        try:
            stream = _hashed(self._blobs.read(row.object_key), cipher)
            for chunk in StreamingAead(dek, row.segment_size).decrypt(stream, ad):
                plain.update(chunk)
                size += len(chunk)
        except StorageError as e:
            return "content", f"object did not decrypt ({type(e).__name__}: {e})"
        if size != row.size or not secrets.compare_digest(plain.digest(), sealed.sha256):
            return "digest", "plaintext SHA-256 or size differs from the sealed digest"
        if not secrets.compare_digest(cipher.digest(), bytes(row.ciphertext_sha256)):
            return "digest", "ciphertext SHA-256 differs from the row"
        if self._expected.get(row.object_key) != cipher.hexdigest():
            return "manifest", "object not in the manifest, or listed with another SHA-256"
        self.tally.plaintext_bytes += size
        return self._signatures_of(row, dek, sealed.sha256)

    def _signatures_of(self, row: Any, dek: bytes, digest: bytes) -> Problem:
        for sig in self._signatures.get((row.id, row.version), []):
            try:
                # storage.signatures owns the sealing layout (place and shown columns).
                p7s = unseal_p7s(dek, sig)
            except StorageError:
                return "signature", f"signature {sig.id} did not unseal (altered or moved)"
            signing_time = from_db_time(sig.signing_time)  # SQLite keeps no zone
            valid, reason = self._checks.verify_signature(p7s, digest, signing_time)
            if not valid:
                return "signature", f"signature {sig.id} invalid: {reason}"
            self.tally.signatures += 1
        return None


def verify_records(
    into: Deployment, manifest: Manifest, checks: DrillChecks, report: ProgressCallback
) -> _Tally:
    """Decrypt and check every record version in ``into``; name each that fails."""
    verifier = _RecordVerifier(into, manifest, checks)
    total = manifest.counts.get("records", 0)
    report(BackupProgress("records", 0, total, 0))
    for done, row in enumerate(_rows(into.engine), 1):
        verifier.check(row)
        report(BackupProgress("records", done, total, verifier.tally.bytes))
    return verifier.tally


# -- audit chain and counts ----------------------------------------------------------


def _audit_section(
    engine: Engine, manifest: Manifest, checks: DrillChecks, failures: list[RestoreFailure]
) -> dict[str, Any]:
    result = verify_chain(SqlAuditLog(engine), checks.verify_checkpoint)
    if not result.ok:
        failures.append(RestoreFailure(
            "audit", f"audit chain: {result.reason} at sequence {result.first_bad_sequence}"
        ))  # fmt: skip
    head = SqlAuditLog(engine).head()
    restored_head = {"sequence": head[0], "hash": head[1].hex()}
    if restored_head != manifest.audit_head:
        failures.append(RestoreFailure("audit", "audit head differs from the manifest"))
    return {"audit_chain": {
        "ok": result.ok, "events_checked": result.events_checked,
        "checkpoints_checked": result.checkpoints_checked, "reason": result.reason,
        "first_bad_sequence": result.first_bad_sequence, "head": restored_head,
    }}  # fmt: skip


def _count_section(
    engine: Engine, restored: RestoreResult, tally: _Tally, failures: list[RestoreFailure]
) -> dict[str, Any]:
    manifest = restored.manifest
    tables = restored.tables
    with translated(engine), engine.connect() as connection:
        stored = connection.scalar(
            sa.select(sa.func.coalesce(sa.func.sum(records.c.stored_size), 0))
        )
    counts = {
        "records": tables.get("records", 0), "objects": tables.get("records", 0),
        "bytes": int(stored or 0), "audit_events": tables.get("audit_events", 0),
        "signatures": tables.get("record_signatures", 0),
        "grants": tables.get("access_grants", 0),
    }  # fmt: skip
    for name, expected in sorted(manifest.counts.items()):
        if counts.get(name) != expected:
            failures.append(RestoreFailure(
                "count", f"{name}: restored {counts.get(name)}, manifest {expected}"
            ))  # fmt: skip
    if tally.records != manifest.counts.get("records"):
        failures.append(RestoreFailure(
            "count", f"records verified {tally.records}, manifest {manifest.counts.get('records')}"
        ))  # fmt: skip
    return {"expected": manifest.counts, "restored": counts, "tables": tables,
            "objects_restored": restored.objects}  # fmt: skip


# -- the signed report ---------------------------------------------------------------


def report_key(backup_id: str, at: datetime) -> str:
    """``drills/<backup-id>/<UTC yyyymmddThhmmssZ>-<8 hex>.json``: sorts by time, and two
    drills of one backup in the same second (two replicas, two operators) never share a
    name, so neither report overwrites the other."""
    stamp = f"{at.astimezone(UTC):%Y%m%dT%H%M%SZ}"
    return f"{DRILLS_PREFIX}{backup_id}/{stamp}-{secrets.token_hex(4)}.json"


def _write_report(
    target: BackupTarget, backup_id: str, at: datetime, document: dict[str, Any],
    checks: DrillChecks,
) -> str:  # fmt: skip
    key = report_key(backup_id, at)
    data = canonical_json(document)
    target.put(key, [data])
    target.put(key.removesuffix(".json") + _SIGNATURE_SUFFIX, [sign(data, checks.backup_signer)])
    return key


def verify_report(target: BackupTarget, key: str, trusted_public_key: bytes) -> str | None:
    """None if the drill report at ``key`` is signed by the trusted backup key; else why not."""
    data = read_all(target, key)
    signature = read_all(target, key.removesuffix(".json") + _SIGNATURE_SUFFIX)
    problem = signature_problem(data, signature, trusted_public_key)
    return problem.replace("manifest", "drill report") if problem else None
