"""Restore drills in the service layer: the checks wired from the configuration, the audit.

``storage.backup.drill`` does the restore and every check, but signature validation
(pyHanko, the configured trust anchors) and the audit checkpoint key belong to
``service``, which ``storage`` must not import. This module builds those checks, runs the
drill and writes its audit event (action ``backup.drill``) when a trail is given: the
servicer passes the guard's trail, the CLI the one of ``service.bootstrap``'s
components. The scheduler audits its runs itself, so it passes none.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from keystore import Pkcs11BlindIndexer, Pkcs11KeyWrapper, Pkcs11SessionPool, Pkcs11Signer
from service.audit.checkpoints import signature_checker
from service.backup import DrillRunner, report_kind
from service.signing.validation import SignatureValidator
from storage import (
    AuditEntry,
    BackupTarget,
    DrillChecks,
    DrillReport,
    DrillRequest,
    InvalidRecordError,
    ProgressCallback,
    SamplePlan,
    Scratch,
    SignatureCheck,
    check_plan,
    parse_seed,
    run_drill,
)

ACTION = "backup.drill"
DEFAULT_DEFECT_RATE = 0.01
Audit = Callable[[AuditEntry], object]


def signature_check(validator: SignatureValidator) -> SignatureCheck:
    """The drill's signature check: the same validation ``VerifyRecord`` applies."""

    def check(p7s: bytes, content_sha256: bytes, signing_time: datetime) -> tuple[bool, str]:
        verdict = validator.validate(p7s, content_sha256, signing_time)
        return verdict.valid, verdict.reason

    return check


def drill_checks(
    pool: Pkcs11SessionPool,
    validator: SignatureValidator,
    *,
    audit_key_label: str,
    backup_key_label: str,
) -> DrillChecks:
    """Checks over the live token: its KEKs unwrap, its audit key pins the checkpoints,
    its backup key must have signed the manifest and signs the report."""
    audit_key = Pkcs11Signer(pool, audit_key_label).public_key_der()
    return DrillChecks(
        keys=Pkcs11KeyWrapper(pool),
        token_label=pool.config.token_label,
        backup_signer=Pkcs11Signer(pool, backup_key_label),
        verify_signature=signature_check(validator),
        verify_checkpoint=signature_checker(audit_key),
        indexer=Pkcs11BlindIndexer(pool),
    )


def audited_drill(
    request: DrillRequest,
    checks: DrillChecks,
    *,
    audit: Audit | None,
    principal: str,
    role: str = "",
    source: str = "",
) -> DrillReport:
    """Run the drill, then commit its audit event (when ``audit`` is given)."""
    report = run_drill(request, checks)
    if audit is not None:
        audit(drill_event(report, principal=principal, role=role, source=source))
    return report


def drill_event(
    report: DrillReport, *, principal: str, role: str = "", source: str = ""
) -> AuditEntry:
    """The audit event of one drill: outcome, counts, the report's key (no patient data)."""
    reason = (
        f"{report_kind(report)}: {report.records_verified} records, {report.bytes_verified} "
        f"bytes verified in {report.recovery_seconds:.1f} s; {len(report.failures)} failures; "
        f"report {report.key}"
    )
    return AuditEntry(
        time=datetime.now(UTC), principal=principal, role=role, action=ACTION,
        resource=f"backup/{report.backup_id}", outcome="allowed" if report.ok else "failed",
        status="passed" if report.ok else "failed", reason=reason[:1000], source=source,
    )  # fmt: skip


def sample_plan(confidence: float, max_defect_rate: float, seed: str) -> SamplePlan | None:
    """The sample asked for, checked (``InvalidRecordError`` names the field); None when
    ``confidence`` is 0 (a full drill). A rate of 0 means the default 0.01."""
    if confidence == 0:
        if max_defect_rate or seed:
            raise InvalidRecordError(
                "sample_confidence", "is required with max_defect_rate or seed (a sampled drill)"
            )
        return None
    rate = max_defect_rate or DEFAULT_DEFECT_RATE
    check_plan(confidence, rate)
    return SamplePlan(confidence, rate, parse_seed(seed))


def drill_runner(
    target: BackupTarget, scratch: Scratch, checks: DrillChecks, workers: int = 4
) -> DrillRunner:
    """What ``service.backup.Backups`` calls (servicer and scheduler audit it themselves)."""

    def run(backup_id: str, progress: ProgressCallback, sample: SamplePlan | None) -> DrillReport:
        request = DrillRequest(target, backup_id, scratch, progress, workers, sample)
        return run_drill(request, checks)

    return run
