"""Storage: encrypted records in S3, their metadata, grants, audit log, signatures, backups.

This module is the package's face: the rest of medvault imports from ``storage``,
never from its submodules (import-linter checks it; docs/layers.md). Use cases depend
on the role Protocols (``storage.roles``: ``GrantStore``, ``AuditLog``,
``RecordSignatures``, ``KekRegistry``, ``RunLedger``; ``storage.interfaces``:
``BlobStore``, ``MetadataStore``; ``BackupTarget``); the SQL and S3 implementations are
exported for the composition root (``service.bootstrap``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.audit_fields import (
        normalise,
    )
    from storage.audit_log import (
        Appended,
        Change,
        Pending,
        SqlAuditLog,
    )
    from storage.audit_model import (
        GENESIS_HASH,
        AuditEntry,
        AuditFilter,
        ChainedEvent,
        Checkpoint,
        Outcome,
        VerifyResult,
        checkpoint_digest,
        checkpoint_message_v2,
        event_document,
        format_time,
        signed_message,
    )
    from storage.audit_rows import (
        AuditHeadMalformedError,
    )
    from storage.audit_verify import (
        SIGNATURE_INVALID,
        Problem,
        malformed_checkpoint,
        malformed_head,
        verify_chain,
        verify_since,
    )
    from storage.audit_witness import (
        CheckpointWitness,
        FileCheckpointWitness,
        LockedBucket,
        S3CheckpointWitness,
        WitnessError,
        gather,
    )
    from storage.backup import (
        BackupError,
        BackupNotFoundError,
    )
    from storage.backup.drill import (
        DrillChecks,
        DrillReport,
        DrillRequest,
        SignatureCheck,
        run_drill,
    )
    from storage.backup.manifest import (
        ALGORITHM,
        SourceInfo,
        canonical_json,
        check_backup_id,
        manifest_key,
        signature_key,
    )
    from storage.backup.restore import (
        Deployment,
        RestoreFailure,
        read_manifest,
        restore,
    )
    from storage.backup.retention import (
        DEFAULT_GRACE,
        BackupSummary,
        PruneResult,
        list_backups,
        prune,
    )
    from storage.backup.run_model import (
        RunAuth,
        RunKind,
        RunOutcome,
        ScheduledRun,
    )
    from storage.backup.run_seal import (
        RunSealer,
    )
    from storage.backup.runner import (
        BackupProgress,
        BackupResult,
        ProgressCallback,
        run_backup,
        source_identity,
    )
    from storage.backup.runs import (
        SqlRunLedger,
        elected,
        run_resource,
    )
    from storage.backup.sampling import (
        SamplePlan,
        check_plan,
        parse_seed,
    )
    from storage.backup.scratch import (
        Scratch,
        s3_scratch,
    )
    from storage.backup.targets import (
        BackupTarget,
        DirectoryTarget,
        S3Target,
    )
    from storage.backup.verify import (
        VerifyReport,
        verify_backup,
    )
    from storage.break_glass import (
        RESTORED_MARK,
        TAMPERED_MARK,
        BreakGlassReview,
        QueueItem,
    )
    from storage.commit_tags import CommitTagger
    from storage.deadlines import (
        CallDeadline,
        bounded,
        check_deadline,
        checked_when_run,
        grace,
        set_deadline,
        time_left,
    )
    from storage.errors import (
        BackendUnavailableError,
        DeadlineExceededError,
        IntegrityError,
        InvalidRecordError,
        RecordConflictError,
        RecordNotFoundError,
        StorageError,
    )
    from storage.grant_reads import (
        ALTERED_MARK,
        REASON_UNREADABLE_MARK,
        REVIEW_ALTERED_MARK,
    )
    from storage.grant_revocations import (
        Marker,
        RevocationMarkerError,
        RevokedGrants,
        S3RevocationMarkers,
        authentic_grant_row,
        copy_markers,
        revoked_row_markers,
    )
    from storage.grant_seal import (
        GrantSealer,
    )
    from storage.grants import (
        GRANT_ADOPTER,
        SqlGrantStore,
    )
    from storage.grants_legacy import (
        adopt_legacy,
    )
    from storage.grants_model import (
        Grant,
    )
    from storage.interfaces import (
        BlobInfo,
        BlobStore,
        MetadataStore,
        StoredRecord,
    )
    from storage.kek import (
        DEFAULT_BATCH,
        KekManager,
        KekVersionInfo,
    )
    from storage.kek_rewrap import (
        RewrapJob,
    )
    from storage.model import (
        NewRecord,
        PatientRef,
        RecordInfo,
        RecordKind,
        RecordQuery,
        StudySummary,
    )
    from storage.put_requests import (
        SqlPutRequests,
    )
    from storage.record_types import (
        WRITE_FAULT_POINTS,
        CommitGate,
        Gate,
        OpenRecord,
        RecordRef,
        StoreLimits,
        StudyMember,
    )
    from storage.records import (
        RecordStore,
    )
    from storage.roles import (
        AuditLog,
        GrantStore,
        KekRegistry,
        RecordSignatures,
        RunLedger,
    )
    from storage.row_auth import (
        RowTamperedError,
    )
    from storage.s3_blobs import (
        S3BlobStore,
        make_minio_client,
    )
    from storage.signatures import (
        NewSignature,
        Signature,
        SignatureStore,
        SignedRecord,
    )
    from storage.sql_deadlines import install_statement_deadlines
    from storage.sql_engine import (
        make_engine,
    )
    from storage.sql_metadata import (
        SqlMetadataStore,
    )
    from storage.sql_upgrade import (
        upgrade,
    )
    from storage.stats import (
        CountCell,
        MonthlyCounts,
        RecordStatistics,
        StatisticsNotConfiguredError,
    )
    from storage.sweeper import (
        sweep_if_due,
        sweep_orphans,
    )
    from storage.work_ledger import (
        WorkLedger,
    )
    from storage.work_seal import (
        WorkSealer,
    )

# name -> the module that defines it. Resolved on first use (PEP 562), so importing one
# submodule (``storage.errors`` in the CLI) does not load the whole package.
_EXPORTS: dict[str, str] = {
    "adopt_legacy": "storage.grants_legacy",
    "Appended": "storage.audit_log",
    "AuditEntry": "storage.audit_model",
    "AuditFilter": "storage.audit_model",
    "AuditLog": "storage.roles",
    "BackendUnavailableError": "storage.errors",
    "bounded": "storage.deadlines",
    "CallDeadline": "storage.deadlines",
    "check_deadline": "storage.deadlines",
    "checked_when_run": "storage.deadlines",
    "DeadlineExceededError": "storage.errors",
    "grace": "storage.deadlines",
    "install_statement_deadlines": "storage.sql_deadlines",
    "set_deadline": "storage.deadlines",
    "time_left": "storage.deadlines",
    "BackupError": "storage.backup",
    "BackupNotFoundError": "storage.backup",
    "BackupProgress": "storage.backup.runner",
    "BackupResult": "storage.backup.runner",
    "BackupSummary": "storage.backup.retention",
    "BackupTarget": "storage.backup.targets",
    "BlobInfo": "storage.interfaces",
    "BlobStore": "storage.interfaces",
    "BreakGlassReview": "storage.break_glass",
    "canonical_json": "storage.backup.manifest",
    "ChainedEvent": "storage.audit_model",
    "Change": "storage.audit_log",
    "check_backup_id": "storage.backup.manifest",
    "Checkpoint": "storage.audit_model",
    "checkpoint_digest": "storage.audit_model",
    "checkpoint_message_v2": "storage.audit_model",
    "CheckpointWitness": "storage.audit_witness",
    "CommitGate": "storage.record_types",
    "DEFAULT_BATCH": "storage.kek",
    "DEFAULT_GRACE": "storage.backup.retention",
    "Deployment": "storage.backup.restore",
    "DirectoryTarget": "storage.backup.targets",
    "DrillChecks": "storage.backup.drill",
    "DrillReport": "storage.backup.drill",
    "DrillRequest": "storage.backup.drill",
    "elected": "storage.backup.runs",
    "event_document": "storage.audit_model",
    "FileCheckpointWitness": "storage.audit_witness",
    "format_time": "storage.audit_model",
    "Gate": "storage.record_types",
    "gather": "storage.audit_witness",
    "GENESIS_HASH": "storage.audit_model",
    "Grant": "storage.grants_model",
    "GRANT_ADOPTER": "storage.grants",
    "GrantSealer": "storage.grant_seal",
    "GrantStore": "storage.roles",
    "IntegrityError": "storage.errors",
    "InvalidRecordError": "storage.errors",
    "KekManager": "storage.kek",
    "KekRegistry": "storage.roles",
    "KekVersionInfo": "storage.kek",
    "list_backups": "storage.backup.retention",
    "LockedBucket": "storage.audit_witness",
    "make_engine": "storage.sql_engine",
    "make_minio_client": "storage.s3_blobs",
    "MetadataStore": "storage.interfaces",
    "NewRecord": "storage.model",
    "NewSignature": "storage.signatures",
    "normalise": "storage.audit_fields",
    "OpenRecord": "storage.record_types",
    "Outcome": "storage.audit_model",
    "PatientRef": "storage.model",
    "Pending": "storage.audit_log",
    "Problem": "storage.audit_verify",
    "ProgressCallback": "storage.backup.runner",
    "prune": "storage.backup.retention",
    "PruneResult": "storage.backup.retention",
    "RecordConflictError": "storage.errors",
    "RecordInfo": "storage.model",
    "RecordKind": "storage.model",
    "RecordNotFoundError": "storage.errors",
    "RecordQuery": "storage.model",
    "RecordRef": "storage.record_types",
    "RecordSignatures": "storage.roles",
    "RecordStore": "storage.records",
    "restore": "storage.backup.restore",
    "read_manifest": "storage.backup.restore",
    "RestoreFailure": "storage.backup.restore",
    "RewrapJob": "storage.kek_rewrap",
    "RowTamperedError": "storage.row_auth",
    "run_backup": "storage.backup.runner",
    "SamplePlan": "storage.backup.sampling",
    "check_plan": "storage.backup.sampling",
    "parse_seed": "storage.backup.sampling",
    "run_drill": "storage.backup.drill",
    "run_resource": "storage.backup.runs",
    "RunAuth": "storage.backup.run_model",
    "RunKind": "storage.backup.run_model",
    "RunLedger": "storage.roles",
    "RunOutcome": "storage.backup.run_model",
    "RunSealer": "storage.backup.run_seal",
    "ScheduledRun": "storage.backup.run_model",
    "s3_scratch": "storage.backup.scratch",
    "S3BlobStore": "storage.s3_blobs",
    "S3CheckpointWitness": "storage.audit_witness",
    "S3RevocationMarkers": "storage.grant_revocations",
    "RevocationMarkerError": "storage.grant_revocations",
    "RevokedGrants": "storage.grant_revocations",
    "copy_markers": "storage.grant_revocations",
    "revoked_row_markers": "storage.grant_revocations",
    "authentic_grant_row": "storage.grant_revocations",
    "Marker": "storage.grant_revocations",
    "S3Target": "storage.backup.targets",
    "Scratch": "storage.backup.scratch",
    "Signature": "storage.signatures",
    "SIGNATURE_INVALID": "storage.audit_verify",
    "AuditHeadMalformedError": "storage.audit_rows",
    "malformed_checkpoint": "storage.audit_verify",
    "malformed_head": "storage.audit_verify",
    "SignatureCheck": "storage.backup.drill",
    "SignatureStore": "storage.signatures",
    "signed_message": "storage.audit_model",
    "SignedRecord": "storage.signatures",
    "source_identity": "storage.backup.runner",
    "SourceInfo": "storage.backup.manifest",
    "SqlAuditLog": "storage.audit_log",
    "SqlGrantStore": "storage.grants",
    "SqlMetadataStore": "storage.sql_metadata",
    "SqlPutRequests": "storage.put_requests",
    "SqlRunLedger": "storage.backup.runs",
    "StorageError": "storage.errors",
    "StoredRecord": "storage.interfaces",
    "StoreLimits": "storage.record_types",
    "WRITE_FAULT_POINTS": "storage.record_types",
    "sweep_if_due": "storage.sweeper",
    "sweep_orphans": "storage.sweeper",
    "upgrade": "storage.sql_upgrade",
    "verify_backup": "storage.backup.verify",
    "verify_chain": "storage.audit_verify",
    "verify_since": "storage.audit_verify",
    "VerifyReport": "storage.backup.verify",
    "VerifyResult": "storage.audit_model",
    "WitnessError": "storage.audit_witness",
    "WorkLedger": "storage.work_ledger",
    "WorkSealer": "storage.work_seal",
    "QueueItem": "storage.break_glass",
    "StudySummary": "storage.model",
    "RESTORED_MARK": "storage.break_glass",
    "TAMPERED_MARK": "storage.break_glass",
    "ALTERED_MARK": "storage.grant_reads",
    "REASON_UNREADABLE_MARK": "storage.grant_reads",
    "REVIEW_ALTERED_MARK": "storage.grant_reads",
    "CommitTagger": "storage.commit_tags",
    "StudyMember": "storage.record_types",
    "CountCell": "storage.stats",
    "MonthlyCounts": "storage.stats",
    "RecordStatistics": "storage.stats",
    "StatisticsNotConfiguredError": "storage.stats",
    "ALGORITHM": "storage.backup.manifest",
    "manifest_key": "storage.backup.manifest",
    "signature_key": "storage.backup.manifest",
}

__all__ = [
    "ALGORITHM",
    "ALTERED_MARK",
    "DEFAULT_BATCH",
    "DEFAULT_GRACE",
    "GENESIS_HASH",
    "GRANT_ADOPTER",
    "REASON_UNREADABLE_MARK",
    "RESTORED_MARK",
    "REVIEW_ALTERED_MARK",
    "SIGNATURE_INVALID",
    "TAMPERED_MARK",
    "WRITE_FAULT_POINTS",
    "Appended",
    "AuditEntry",
    "AuditFilter",
    "AuditHeadMalformedError",
    "AuditLog",
    "BackendUnavailableError",
    "BackupError",
    "BackupNotFoundError",
    "BackupProgress",
    "BackupResult",
    "BackupSummary",
    "BackupTarget",
    "BlobInfo",
    "BlobStore",
    "BreakGlassReview",
    "CallDeadline",
    "ChainedEvent",
    "Change",
    "Checkpoint",
    "CheckpointWitness",
    "CommitGate",
    "CommitTagger",
    "CountCell",
    "DeadlineExceededError",
    "Deployment",
    "DirectoryTarget",
    "DrillChecks",
    "DrillReport",
    "DrillRequest",
    "FileCheckpointWitness",
    "Gate",
    "Grant",
    "GrantSealer",
    "GrantStore",
    "IntegrityError",
    "InvalidRecordError",
    "KekManager",
    "KekRegistry",
    "KekVersionInfo",
    "LockedBucket",
    "Marker",
    "MetadataStore",
    "MonthlyCounts",
    "NewRecord",
    "NewSignature",
    "OpenRecord",
    "Outcome",
    "PatientRef",
    "Pending",
    "Problem",
    "ProgressCallback",
    "PruneResult",
    "QueueItem",
    "RecordConflictError",
    "RecordInfo",
    "RecordKind",
    "RecordNotFoundError",
    "RecordQuery",
    "RecordRef",
    "RecordSignatures",
    "RecordStatistics",
    "RecordStore",
    "RestoreFailure",
    "RevocationMarkerError",
    "RevokedGrants",
    "RewrapJob",
    "RowTamperedError",
    "RunAuth",
    "RunKind",
    "RunLedger",
    "RunOutcome",
    "RunSealer",
    "S3BlobStore",
    "S3CheckpointWitness",
    "S3RevocationMarkers",
    "S3Target",
    "SamplePlan",
    "ScheduledRun",
    "Scratch",
    "Signature",
    "SignatureCheck",
    "SignatureStore",
    "SignedRecord",
    "SourceInfo",
    "SqlAuditLog",
    "SqlGrantStore",
    "SqlMetadataStore",
    "SqlPutRequests",
    "SqlRunLedger",
    "StatisticsNotConfiguredError",
    "StorageError",
    "StoreLimits",
    "StoredRecord",
    "StudyMember",
    "StudySummary",
    "VerifyReport",
    "VerifyResult",
    "WitnessError",
    "WorkLedger",
    "WorkSealer",
    "adopt_legacy",
    "authentic_grant_row",
    "bounded",
    "canonical_json",
    "check_backup_id",
    "check_deadline",
    "check_plan",
    "checked_when_run",
    "checkpoint_digest",
    "checkpoint_message_v2",
    "copy_markers",
    "elected",
    "event_document",
    "format_time",
    "gather",
    "grace",
    "install_statement_deadlines",
    "list_backups",
    "make_engine",
    "make_minio_client",
    "malformed_checkpoint",
    "malformed_head",
    "manifest_key",
    "normalise",
    "parse_seed",
    "prune",
    "read_manifest",
    "restore",
    "revoked_row_markers",
    "run_backup",
    "run_drill",
    "run_resource",
    "s3_scratch",
    "set_deadline",
    "signature_key",
    "signed_message",
    "source_identity",
    "sweep_if_due",
    "sweep_orphans",
    "time_left",
    "upgrade",
    "verify_backup",
    "verify_chain",
    "verify_since",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
