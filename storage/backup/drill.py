"""The restore drill: restore a backup into a scratch place and prove every record readable.

A **full** drill restores (:func:`storage.backup.restore.restore`) into a scratch bucket
and a scratch database, then walks every record version (:mod:`storage.backup.drill_records`:
data key unwrapped in the token, whole object decrypted, plaintext and ciphertext
digests against the sealed digest, the row and the manifest, every signature
validated). Meanwhile, in a thread of its own, it walks the audit chain (checkpoint
signatures included); then it compares the counts and the audit head with the manifest.
Objects are copied and records checked by ``workers`` threads with at most ``2 x
workers`` in flight, each streamed: memory stays bounded whatever the archive's size.
The recovery time is measured from the start to the moment the restored store is
verified; the report gives the throughput (bytes and records per second) over it.

A **sampled** drill (``DrillRequest.sample``, for archives too large to drill whole)
checks everything but the content of the records outside a random sample: the manifest
and its signature, every manifest entry present in the target with its size, the
snapshot restored (every metadata row), every row authenticated in the token and
matched with its manifest entry, every signature unsealed, the audit chain and the
counts; only the sample's objects (:mod:`storage.backup.sampling`: size from the
confidence asked for, chosen by a recorded seed) are restored and decrypted. The
report says ``"mode": "sampled"`` and holds the seed, so an auditor can repeat it.

Layering: signature validation and the checkpoint key live in ``service`` (pyHanko, the
audit key), which ``storage`` must not import. The drill therefore receives them as
plain callables (:class:`DrillChecks`); ``service.backup.drill`` builds them from the
configuration, writes the audit event, and is what the CLI and the servicer call.

The report (format ``medvault-drill/1``) is canonical JSON at
``drills/<backup-id>/<drill-time>-<8 hex>.json``, signed like a manifest (``.sig.json``, the
backup key). It names records, objects and tables, never content or patient data.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import BlindIndexer, KeystoreError, KeyWrapper, Signer
from storage.audit_log import SqlAuditLog
from storage.audit_model import Checkpoint
from storage.audit_verify import verify_chain
from storage.backup import BackupError
from storage.backup.drill_records import (
    RecordChecks,
    SignatureCheck,
    Tally,
    WalkOptions,
    walk_records,
)
from storage.backup.manifest import (
    DRILLS_PREFIX,
    OBJECTS_PREFIX,
    Manifest,
    canonical_json,
    check_backup_id,
    sign,
    signature_problem,
)
from storage.backup.pool import check_workers
from storage.backup.restore import (
    Deployment,
    KekInventory,
    RestoreFailure,
    RestoreResult,
    restore,
    restore_objects,
)
from storage.backup.runner import BackupProgress, ProgressCallback
from storage.backup.sampling import SamplePlan, choose, selection_digest
from storage.backup.scratch import Scratch
from storage.backup.targets import BackupTarget, read_all
from storage.errors import StorageError
from storage.row_values import RowValues
from storage.sql_metadata import records, translated

REPORT_FORMAT = "medvault-drill/1"
_SIGNATURE_SUFFIX = ".sig.json"

CheckpointCheck = Callable[[Checkpoint], bool]
__all__ = ["CheckpointCheck", "DrillChecks", "DrillReport", "DrillRequest", "SignatureCheck",
           "run_drill", "verify_report"]  # fmt: skip


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
    """One drill: which backup, from where, into what scratch place, how."""

    target: BackupTarget
    backup_id: str
    scratch: Scratch
    progress: ProgressCallback | None = None
    workers: int = 4  # threads copying objects and checking records
    sample: SamplePlan | None = None  # None: a full drill


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

    @property
    def sampled(self) -> bool:
        """True for a sampled drill (only a sample of the records was decrypted)."""
        return self.document.get("mode") == "sampled"


def run_drill(request: DrillRequest, checks: DrillChecks) -> DrillReport:
    """Restore into scratch, verify everything, write and return the signed report."""
    check_backup_id(request.backup_id)  # it becomes part of the report's key
    check_workers(request.workers)
    started_at, started = datetime.now(UTC), time.monotonic()
    mode = "sampled" if request.sample else "full"
    document: dict[str, Any] = {"format": REPORT_FORMAT, "backup_id": request.backup_id,
                                "mode": mode}  # fmt: skip
    failures: list[RestoreFailure] = []
    tally = Tally()
    try:
        with request.scratch() as scratch:
            tally = _drill(request, checks, scratch, document, failures)
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
        verified={"records": tally.records, "decrypted": tally.decrypted, "bytes": tally.bytes,
                  "plaintext_bytes": tally.plaintext_bytes, "signatures": tally.signatures,
                  "signatures_unsealed": tally.signatures_unsealed},
        throughput=_throughput(tally, seconds, request.workers),
        failures=[_failure_doc(f) for f in failures],
    )  # fmt: skip
    key = _write_report(request.target, request.backup_id, started_at, document, checks)
    return DrillReport(
        backup_id=request.backup_id, ok=not failures, recovery_seconds=seconds,
        records_verified=tally.records, bytes_verified=tally.bytes,
        failures=tuple(failures), key=key, document=document,
    )  # fmt: skip


def _drill(
    request: DrillRequest, checks: DrillChecks, scratch: Deployment, document: dict[str, Any],
    failures: list[RestoreFailure],
) -> Tally:  # fmt: skip
    """Restore, then records and audit chain side by side, then the counts."""
    report = request.progress or _no_progress
    restored = restore(
        request.target, request.backup_id, scratch, keks=checks.keys,
        token_label=checks.token_label,
        trusted_public_key=checks.backup_signer.public_key_der(),
        strict=False, progress=report, workers=request.workers,
        objects=None if request.sample is None else (lambda _o: False),
    )  # fmt: skip
    options = WalkOptions(request.workers)
    if request.sample is not None:
        options = _sampled(request, request.sample, scratch, restored, document, report)
    failures.extend(restored.failures)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="drill-audit") as chain:
        audit = chain.submit(_audit_section, scratch.engine, restored.manifest, checks)
        record_checks = RecordChecks(scratch, restored.manifest, checks.keys, checks.indexer,
                                     checks.verify_signature, options=options)  # fmt: skip
        total = restored.manifest.counts.get("records", 0)
        tally = walk_records(scratch, record_checks, total, report, request.workers)
        failures.extend(tally.failures)
        section, chain_failures = audit.result()
    document.update(section)
    failures.extend(chain_failures)
    document.update(_count_section(scratch.engine, restored, tally, failures))
    return tally


def _sampled(  # noqa: PLR0917  (one step of _drill, named for reading)
    request: DrillRequest, plan: SamplePlan, scratch: Deployment, restored: RestoreResult,
    document: dict[str, Any], report: ProgressCallback,
) -> WalkOptions:  # fmt: skip
    """Choose the sample from the restored rows; restore its objects; list the target."""
    population = restored.tables.get("records", 0)
    query = sa.select(records.c.id, records.c.version, records.c.object_key)
    with translated(scratch.engine), scratch.engine.connect() as connection:
        rows = connection.execution_options(stream_results=True, yield_per=1000).execute(query)
        picked = choose(plan.seed, _sample_keys(rows.mappings(), restored.failures), plan.size)
    chosen = [(r[0], r[1]) for r in picked]
    wanted = {r[2] for r in picked}
    objects = [o for o in restored.manifest.objects if o.object_key in wanted]
    restore_objects(request.target, objects, scratch.blobs, restored, report,
                    workers=request.workers)  # fmt: skip
    present = {e.key: e.size for e in request.target.entries(OBJECTS_PREFIX)}
    for obj in restored.manifest.objects:  # every manifest entry, not only the sample's
        size = present.get(obj.target_key)
        if size != obj.size:
            what = "missing from the backup" if size is None else f"{size} bytes in the backup"
            restored.failures.append(RestoreFailure(
                "object", f"{what}, manifest says {obj.size} ({obj.target_key})", obj.object_key
            ))  # fmt: skip
    document["sample"] = {
        "confidence": plan.confidence, "max_defect_rate": plan.max_defect_rate,
        "seed": plan.seed.hex(), "size": len(chosen), "planned_size": plan.size,
        "population": population, "selection_sha256": selection_digest(chosen),
        "method": "the planned_size record versions of lowest SHA-256(seed || id || ':' || "
                  "version); planned_size = ceil(ln(1 - confidence) / ln(1 - max_defect_rate))",
    }  # fmt: skip
    return WalkOptions(request.workers, decrypt=frozenset(chosen), present=present)


def _sample_keys(
    rows: Iterable[Mapping[Any, Any]], failures: list[RestoreFailure]
) -> Iterator[tuple[str, int, str]]:
    """(id, version, object key) of each restored row, read strictly: a value of another
    type (the load checks types, so only a row written into the scratch database since)
    is a failure naming table and columns, not ``int()`` of it with its value."""
    for row in rows:
        v = RowValues(row)
        key = (v.text("id"), v.version("version"), v.text("object_key"))
        if v.malformed:
            failures.append(RestoreFailure("row", _malformed("records", v.malformed)))
        else:
            yield key


def _malformed(table: str, columns: list[str]) -> str:
    return f"a {table} row holds a value of another type than its column's ({', '.join(columns)})"


def _throughput(tally: Tally, seconds: float, workers: int) -> dict[str, Any]:
    """Over the recovery time: what a drill of this archive sustains on this hardware."""
    per = 1 / seconds if seconds > 0 else 0.0
    return {"workers": workers, "bytes_per_second": round(tally.bytes * per, 1),
            "records_per_second": round(tally.records * per, 2)}  # fmt: skip


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


# -- audit chain and counts ----------------------------------------------------------


def _audit_section(
    engine: Engine, manifest: Manifest, checks: DrillChecks
) -> tuple[dict[str, Any], list[RestoreFailure]]:
    """The chain walk and the head against the manifest (runs beside the record walk)."""
    failures: list[RestoreFailure] = []
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
    }}, failures  # fmt: skip


def _count_section(
    engine: Engine, restored: RestoreResult, tally: Tally, failures: list[RestoreFailure]
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
