"""Backups inside the service: the use cases the BackupService and the scheduler share.

``Backups`` binds the storage-layer functions (:mod:`storage.backup`) to one
deployment's database, record bucket, backup target and backup signing key, so that a
gRPC call and a scheduled run do exactly the same thing. It is built once, in the
composition root (``service.bootstrap``), which chooses the concrete target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool, Pkcs11Signer, Signer
from service.backup.scheduler import (
    JobResult,
    Schedule,
    ScheduledJob,
    Scheduler,
    schedule_from,
)
from service.config import Config, read_secret
from service.signing.validation import SignatureValidator, load_pem_certificates
from storage import (
    DEFAULT_GRACE,
    AuditEntry,
    BackupResult,
    BackupSummary,
    BackupTarget,
    BlobStore,
    DrillReport,
    ProgressCallback,
    PruneResult,
    RecordNotFoundError,
    RunSealer,
    S3BlobStore,
    SamplePlan,
    SourceInfo,
    SqlRunLedger,
    VerifyReport,
    check_backup_id,
    elected,
    list_backups,
    make_minio_client,
    manifest_key,
    prune,
    run_backup,
    s3_scratch,
    signature_key,
    source_identity,
    verify_backup,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# (backup id, progress, sample or None for a full drill) -> the signed report;
# ``service.backup.drill`` builds one.
DrillRunner = Callable[[str, ProgressCallback, SamplePlan | None], DrillReport]


class BackupNotFoundError(RecordNotFoundError):
    """No complete backup (manifest and signature) has the id asked for (NOT_FOUND)."""


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Keep the newest backup of each of the last N days, weeks, months (``[backup]``)."""

    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 12
    # Prune after each scheduled backup; off only for tests that count backups.
    prune: bool = True


class Backups:
    """Run, list, verify and drill the backups of one deployment."""

    def __init__(
        self,
        engine: Engine,
        blobs: BlobStore,
        target: BackupTarget,
        signer: Signer,
        source: SourceInfo,
        *,
        retention: RetentionPolicy,
        drill: DrillRunner | None = None,
        workers: int = 4,
        scheduled_sample: Callable[[], SamplePlan | None] = lambda: None,
        on_overdue: Callable[[str], None] | None = None,
    ) -> None:
        self._engine = engine
        self._blobs = blobs
        self.target = target
        self._signer = signer
        self._source = source
        self.retention = retention
        self._drill = drill
        self._workers = workers
        # A scheduled drill is sampled when [backup] drill_sample_confidence is set; a
        # new seed each time (the report records it).
        self._scheduled_sample = scheduled_sample
        # Told "backup-run-marker/<id>" of a run marker a prune did not honour.
        self._on_overdue = on_overdue

    def trusted_key(self) -> bytes:
        """The token's backup public key: the key every manifest must be signed by."""
        return self._signer.public_key_der()

    def run(self, trigger: str, progress: ProgressCallback | None = None) -> BackupResult:
        """Take one backup (``trigger`` "manual" or "scheduled")."""
        return run_backup(
            self._engine, self._blobs, self.target, self._signer, self._source,
            trigger=trigger, progress=progress, workers=self._workers,
        )  # fmt: skip

    def list_backups(self) -> list[BackupSummary]:
        """Every complete backup in the target, newest first."""
        return list_backups(self.target)

    def verify(
        self, backup_id: str, read_data: bool, progress: ProgressCallback | None = None
    ) -> VerifyReport:
        """Check the signature and every object (and every byte with ``read_data``)."""
        return verify_backup(
            self.target, backup_id, trusted_public_key=self.trusted_key(),
            read_data=read_data, progress=progress, workers=self._workers,
        )  # fmt: skip

    def public_key_pem(self) -> str:
        """The manifest-signing public key as PEM (SubjectPublicKeyInfo)."""
        key = serialization.load_der_public_key(self.trusted_key())
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    @property
    def key_label(self) -> str:
        """The token label of the manifest-signing key."""
        return self._signer.key_label

    def require_complete(self, backup_id: str) -> None:
        """``BackupNotFoundError`` unless the target holds that backup's manifest and signature."""
        check_backup_id(backup_id)
        if self.target.stat(manifest_key(backup_id)) is None or (
            self.target.stat(signature_key(backup_id)) is None
        ):
            raise BackupNotFoundError(
                f"no complete backup {backup_id} in {self.target.describe()} "
                "(see `medvault backup list`)"
            )

    def drill(
        self, backup_id: str, progress: ProgressCallback, sample: SamplePlan | None = None
    ) -> DrillReport:
        """Restore into a scratch place and check every record, or (``sample``) every
        row and a random sample of the records (the drill's report).

        An id the target holds no complete backup for is refused before anything is
        restored or written: no report for a backup that does not exist.
        """
        if self._drill is None:
            raise NotImplementedError("restore drills are not configured in this service")
        self.require_complete(backup_id)
        return self._drill(backup_id, progress, sample)

    def prune(
        self,
        now: datetime | None = None,
        *,
        policy: RetentionPolicy | None = None,
        grace: timedelta = DEFAULT_GRACE,
        dry_run: bool = False,
    ) -> PruneResult:
        """Apply the retention policy (the configured one unless ``policy``); never
        removes what a kept backup references."""
        r = policy or self.retention
        result = prune(
            self.target, r.keep_daily, r.keep_weekly, r.keep_monthly, now,
            grace=grace, dry_run=dry_run,
        )  # fmt: skip
        for run_id in result.overdue_runs:
            self._report_overdue(run_id)
        return result

    def _report_overdue(self, run_id: str) -> None:
        """A run marker that blocks pruning past its bound (``storage.backup.run_markers``):
        an incident. Never raises: the prune is done."""
        if self._on_overdue is None:
            return
        try:
            self._on_overdue(f"backup-run-marker/{run_id}")
        except Exception:  # the log line of run_markers stays
            log.exception("could not report an overdue backup run marker: %s", run_id)

    def scheduled_jobs(self, backup: Schedule | None, drill: Schedule | None) -> list[ScheduledJob]:
        """The scheduler's jobs for the configured schedules (none when both are off)."""
        jobs = []
        if backup is not None:
            jobs.append(ScheduledJob("backup", backup, self._scheduled_backup))
        if drill is not None:
            jobs.append(ScheduledJob("drill", drill, self._scheduled_drill))
        return jobs

    def _scheduled_backup(self, slot: datetime) -> JobResult:
        result = self.run("scheduled")
        c = result.counts
        detail = (
            f"{c['records']} records, {c['objects']} objects, {c['bytes']} bytes; "
            f"copied {result.copied_objects} objects, {result.copied_bytes} bytes"
        )
        if self.retention.prune:
            pruned = self.prune(datetime.now(UTC))
            detail += (
                f"; retention removed {len(pruned.removed)} backups, "
                f"{pruned.objects_removed} objects"
            )
        return JobResult(result.backup_id, ok=True, detail=detail)

    def _scheduled_drill(self, slot: datetime) -> JobResult:
        newest = self.list_backups()
        if not newest:
            return JobResult("", ok=False, detail="no complete backup to drill")
        backup_id = newest[0].id
        report = self.drill(backup_id, lambda _p: None, self._scheduled_sample())
        return JobResult(backup_id, ok=report.ok, detail=_drill_detail(report))


def _drill_detail(report: DrillReport) -> str:
    rate = report.document.get("throughput", {})
    took = (
        f"{report_kind(report)}: {report.records_verified} records, {report.bytes_verified} "
        f"bytes in {report.recovery_seconds:.1f} s "
        f"({rate.get('bytes_per_second', 0) / 1e6:.1f} MB/s, "
        f"{rate.get('records_per_second', 0):.1f} records/s); report {report.key}"
    )
    if report.ok:
        return f"drill passed: {took}"
    first = "; ".join(f"{f.check}: {f.detail}" for f in report.failures[:3])
    return f"drill FAILED ({len(report.failures)} failures: {first}): {took}"


def report_kind(report: DrillReport) -> str:
    """Either "full drill" or "sampled drill (n of N records decrypted, confidence, ...)"."""
    sample = report.document.get("sample")
    if not report.sampled:
        return "full drill"
    if not isinstance(sample, dict):
        return "sampled drill (stopped before the sample was drawn)"
    return (
        f"sampled drill ({sample['size']} of {sample['population']} records decrypted, "
        f"confidence {sample['confidence']:g}, max defect rate {sample['max_defect_rate']:g}, "
        f"seed {sample['seed']})"
    )


@dataclass(frozen=True, slots=True)
class BackupWiring:
    """What ``service.bootstrap`` keeps: the use cases, the (not yet started) scheduler
    and its run ledger (the gauges of ``service.metrics`` read it)."""

    backups: Backups
    scheduler: Scheduler
    ledger: SqlRunLedger


def build(
    config: Config,
    engine: Engine,
    blobs: S3BlobStore,
    pool: Pkcs11SessionPool,
    audit: Callable[[AuditEntry], object],
    *,
    forged_run: Callable[[str], None] | None = None,
    missed_run: Callable[[str], None] | None = None,
    overdue_run: Callable[[str], None] | None = None,
) -> BackupWiring:
    """The backups of this deployment from ``[backup]``; called by ``service.bootstrap``.

    The target is created if absent and the backup key looked up now, so a wrong
    ``[backup]`` section or a token without ``medvault-backup-v1`` fails at start-up.
    ``forged_run`` is told of a ledger row that failed its MAC where a slot was claimed;
    ``missed_run`` of a slot left unclaimed while the election lock was held elsewhere;
    ``overdue_run`` of a run marker a prune did not honour (beating for over a week).
    """
    # Imported here: service.backup.drill imports this package (DrillRunner).
    from service.backup.drill import drill_checks, drill_runner, sample_plan  # noqa: PLC0415
    from service.backup.targets import backup_settings, make_target  # noqa: PLC0415

    chosen = backup_settings(config)
    target = make_target(config, chosen)
    signer = Pkcs11Signer(pool, chosen.signing_key_label)
    validator = SignatureValidator(
        load_pem_certificates(config.signing.trust_anchors) if config.signing.trust_anchors else []
    )
    checks = drill_checks(
        pool, validator, audit_key_label=config.audit.signing_key_label,
        backup_key_label=chosen.signing_key_label,
    )  # fmt: skip
    client = make_minio_client(
        config.s3.endpoint, read_secret(config.s3.access_key_env, config.s3.access_key_file),
        read_secret(config.s3.secret_key_env, config.s3.secret_key_file),
        secure=config.s3.secure, ca_file=config.s3.ca_file or None,
    )  # fmt: skip
    scratch = s3_scratch(client, config.backup.drill_database or None)
    backups = Backups(
        engine, blobs, target, signer,
        source_identity(engine, blobs.bucket, config.s3.endpoint),
        retention=RetentionPolicy(
            chosen.keep_daily, chosen.keep_weekly, chosen.keep_monthly,
            prune=config.backup.prune_after_backup,
        ),
        drill=drill_runner(target, scratch, checks, config.backup.workers),
        workers=config.backup.workers,
        scheduled_sample=partial(
            sample_plan, config.backup.drill_sample_confidence,
            config.backup.drill_max_defect_rate, "",
        ),
        on_overdue=overdue_run,
    )  # fmt: skip
    jobs = backups.scheduled_jobs(
        schedule_from(config.backup.schedule, config.backup.schedule_seconds),
        schedule_from(config.backup.drill_schedule, config.backup.drill_schedule_seconds),
    )
    ledger = SqlRunLedger(engine, RunSealer(Pkcs11BlindIndexer(pool)), forged_run)
    scheduler = Scheduler(jobs, ledger, partial(elected, engine), audit, on_missed=missed_run)
    return BackupWiring(backups, scheduler, ledger)
