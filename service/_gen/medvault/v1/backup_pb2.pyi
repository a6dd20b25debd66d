import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BackupSummary(_message.Message):
    __slots__ = ("id", "created_at", "completed_at", "records", "objects", "bytes", "objects_copied", "bytes_copied", "trigger")
    ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_COPIED_FIELD_NUMBER: _ClassVar[int]
    BYTES_COPIED_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    id: str
    created_at: _timestamp_pb2.Timestamp
    completed_at: _timestamp_pb2.Timestamp
    records: int
    objects: int
    bytes: int
    objects_copied: int
    bytes_copied: int
    trigger: str
    def __init__(self, id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., completed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., records: _Optional[int] = ..., objects: _Optional[int] = ..., bytes: _Optional[int] = ..., objects_copied: _Optional[int] = ..., bytes_copied: _Optional[int] = ..., trigger: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "done", "total", "bytes_done", "bytes_total")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    phase: str
    done: int
    total: int
    bytes_done: int
    bytes_total: int
    def __init__(self, phase: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class RunBackupRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunBackupResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: BackupSummary
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[BackupSummary, _Mapping]] = ...) -> None: ...

class ListBackupsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBackupsResponse(_message.Message):
    __slots__ = ("backups",)
    BACKUPS_FIELD_NUMBER: _ClassVar[int]
    backups: _containers.RepeatedCompositeFieldContainer[BackupSummary]
    def __init__(self, backups: _Optional[_Iterable[_Union[BackupSummary, _Mapping]]] = ...) -> None: ...

class VerifyBackupRequest(_message.Message):
    __slots__ = ("id", "read_data")
    ID_FIELD_NUMBER: _ClassVar[int]
    READ_DATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    read_data: bool
    def __init__(self, id: _Optional[str] = ..., read_data: _Optional[bool] = ...) -> None: ...

class VerifyReport(_message.Message):
    __slots__ = ("id", "ok", "manifest_signature_valid", "objects_checked", "bytes_checked", "failures", "seconds", "bytes_per_second", "objects_per_second")
    ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SIGNATURE_VALID_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    BYTES_CHECKED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    id: str
    ok: bool
    manifest_signature_valid: bool
    objects_checked: int
    bytes_checked: int
    failures: _containers.RepeatedScalarFieldContainer[str]
    seconds: float
    bytes_per_second: float
    objects_per_second: float
    def __init__(self, id: _Optional[str] = ..., ok: _Optional[bool] = ..., manifest_signature_valid: _Optional[bool] = ..., objects_checked: _Optional[int] = ..., bytes_checked: _Optional[int] = ..., failures: _Optional[_Iterable[str]] = ..., seconds: _Optional[float] = ..., bytes_per_second: _Optional[float] = ..., objects_per_second: _Optional[float] = ...) -> None: ...

class VerifyBackupResponse(_message.Message):
    __slots__ = ("progress", "report")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    report: VerifyReport
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., report: _Optional[_Union[VerifyReport, _Mapping]] = ...) -> None: ...

class RunRestoreDrillRequest(_message.Message):
    __slots__ = ("id", "sample_confidence", "max_defect_rate", "seed")
    ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_DEFECT_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    id: str
    sample_confidence: float
    max_defect_rate: float
    seed: str
    def __init__(self, id: _Optional[str] = ..., sample_confidence: _Optional[float] = ..., max_defect_rate: _Optional[float] = ..., seed: _Optional[str] = ...) -> None: ...

class DrillReport(_message.Message):
    __slots__ = ("backup_id", "ok", "recovery_seconds", "records_verified", "bytes_verified", "signatures_verified", "audit_chain_ok", "failures", "report_json", "report_key", "bytes_per_second", "records_per_second", "workers", "records_decrypted", "sampled", "sample_size", "population", "sample_confidence", "max_defect_rate", "seed")
    BACKUP_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    BYTES_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    AUDIT_CHAIN_OK_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    REPORT_KEY_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RECORDS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_DECRYPTED_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    POPULATION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    MAX_DEFECT_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    backup_id: str
    ok: bool
    recovery_seconds: float
    records_verified: int
    bytes_verified: int
    signatures_verified: int
    audit_chain_ok: bool
    failures: _containers.RepeatedScalarFieldContainer[str]
    report_json: bytes
    report_key: str
    bytes_per_second: float
    records_per_second: float
    workers: int
    records_decrypted: int
    sampled: bool
    sample_size: int
    population: int
    sample_confidence: float
    max_defect_rate: float
    seed: str
    def __init__(self, backup_id: _Optional[str] = ..., ok: _Optional[bool] = ..., recovery_seconds: _Optional[float] = ..., records_verified: _Optional[int] = ..., bytes_verified: _Optional[int] = ..., signatures_verified: _Optional[int] = ..., audit_chain_ok: _Optional[bool] = ..., failures: _Optional[_Iterable[str]] = ..., report_json: _Optional[bytes] = ..., report_key: _Optional[str] = ..., bytes_per_second: _Optional[float] = ..., records_per_second: _Optional[float] = ..., workers: _Optional[int] = ..., records_decrypted: _Optional[int] = ..., sampled: _Optional[bool] = ..., sample_size: _Optional[int] = ..., population: _Optional[int] = ..., sample_confidence: _Optional[float] = ..., max_defect_rate: _Optional[float] = ..., seed: _Optional[str] = ...) -> None: ...

class RunRestoreDrillResponse(_message.Message):
    __slots__ = ("progress", "report")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    report: DrillReport
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., report: _Optional[_Union[DrillReport, _Mapping]] = ...) -> None: ...

class PruneBackupsRequest(_message.Message):
    __slots__ = ("keep_daily", "keep_weekly", "keep_monthly", "grace_hours", "dry_run")
    KEEP_DAILY_FIELD_NUMBER: _ClassVar[int]
    KEEP_WEEKLY_FIELD_NUMBER: _ClassVar[int]
    KEEP_MONTHLY_FIELD_NUMBER: _ClassVar[int]
    GRACE_HOURS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    keep_daily: int
    keep_weekly: int
    keep_monthly: int
    grace_hours: float
    dry_run: bool
    def __init__(self, keep_daily: _Optional[int] = ..., keep_weekly: _Optional[int] = ..., keep_monthly: _Optional[int] = ..., grace_hours: _Optional[float] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class PruneBackupsResponse(_message.Message):
    __slots__ = ("kept", "removed", "objects_removed", "bytes_removed", "leftovers_removed", "objects_deferred", "dry_run")
    KEPT_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_REMOVED_FIELD_NUMBER: _ClassVar[int]
    LEFTOVERS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_DEFERRED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    kept: _containers.RepeatedScalarFieldContainer[str]
    removed: _containers.RepeatedScalarFieldContainer[str]
    objects_removed: int
    bytes_removed: int
    leftovers_removed: int
    objects_deferred: bool
    dry_run: bool
    def __init__(self, kept: _Optional[_Iterable[str]] = ..., removed: _Optional[_Iterable[str]] = ..., objects_removed: _Optional[int] = ..., bytes_removed: _Optional[int] = ..., leftovers_removed: _Optional[int] = ..., objects_deferred: _Optional[bool] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class GetBackupPublicKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackupPublicKey(_message.Message):
    __slots__ = ("public_key_pem", "key_label", "algorithm")
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    KEY_LABEL_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    public_key_pem: str
    key_label: str
    algorithm: str
    def __init__(self, public_key_pem: _Optional[str] = ..., key_label: _Optional[str] = ..., algorithm: _Optional[str] = ...) -> None: ...
