"""The service configuration's sections: frozen dataclasses with their defaults.

``service.config`` parses the TOML file into these and checks their values; every
module imports them from there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import ServiceError

# Longest wait for a request message that the edge allows (service.streams relies on it).
MAX_IDLE_SECONDS = 300.0
# More service processes than this on one host is a typo, not a plan.
MAX_PROCESSES = 256


class ConfigError(ServiceError):
    """The configuration file is missing or invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Listening address and limits."""

    listen: str = "127.0.0.1:7443"
    # Service processes sharing ``listen`` (SO_REUSEPORT, service.supervisor); 0 = one per
    # core this process may run on. 1 = no supervisor: the server runs in this process.
    processes: int = 0
    max_record_size: int = 4 << 30
    chunk_size: int = 1 << 20
    segment_size: int = 1 << 20
    workers: int = 32
    orphan_grace_seconds: int = 3600
    # Seconds between orphan sweeps (one replica sweeps per interval); 0 = a quarter of
    # the grace period, at least 60.
    orphan_sweep_seconds: float = 0.0
    # How long a PutRecord request id is remembered (a retry within it gets the first result).
    request_id_retention_hours: float = 24.0
    # Access policy (roles, applications, delegation); re-read on SIGHUP.
    policy: str = "policy.toml"
    # host:port for Prometheus metrics; empty = off.
    metrics_listen: str = ""
    # Seconds between probes of the database, object store and token, reported in the
    # gRPC health service as medvault.dependency.* (service/health.py).
    health_probe_seconds: float = 10.0
    # Edge limits (docs/security.md). A stream's first message must arrive within
    # first_message_seconds of the call's start, each later one within idle_seconds.
    first_message_seconds: float = 10.0
    idle_seconds: float = 30.0
    # After its first idle_seconds, an upload must average at least this many bytes per
    # second, else DEADLINE_EXCEEDED: a trickle would hold an upload slot for ever. 0 = off.
    min_upload_bytes_per_second: int = 4096
    # Concurrent calls one principal (or one application, over all the users it relays
    # for) may hold; 0 = a quarter (an application: a half) of ``workers``.
    max_calls_per_principal: int = 0
    max_calls_per_application: int = 0
    # Uploads (PutRecord) in progress at once over all callers; each holds a store thread
    # while it streams. 0 = ``workers``: half the pool, so reads always find threads.
    max_uploads: int = 0
    # Refusals over a share are audited as one event per principal per window.
    refusal_summary_seconds: float = 60.0
    # grpc's own cap on calls in flight: a backstop far above the per-principal shares.
    max_concurrent_rpcs: int = 1024
    max_streams_per_connection: int = 100
    keepalive_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0
    max_connection_idle_seconds: float = 600.0
    # Legacy (v1) sealed rows carry no sealed copy of their columns: only their patient
    # is checked. Set false once `medvault keys rewrap` has upgraded every row
    # (docs/keys.md): a v1 row is then refused with DATA_LOSS, so a database writer
    # cannot put back an older v1 blob to edit a row's other columns undetected.
    accept_legacy_sealed_rows: bool = True

    @property
    def process_count(self) -> int:
        """How many service processes to run: ``processes``, or one per usable core."""
        return self.processes or len(os.sched_getaffinity(0))

    @property
    def principal_share(self) -> int:
        """Concurrent calls allowed to one principal."""
        return self.max_calls_per_principal or max(1, self.workers // 4)

    @property
    def upload_cap(self) -> int:
        """Uploads streaming at once over all callers (below the pool's 2 x workers)."""
        return self.max_uploads or self.workers

    @property
    def application_share(self) -> int:
        """Concurrent delegated calls allowed to one application (all its users together)."""
        return self.max_calls_per_application or max(1, self.workers // 2)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Mutual TLS: on by default; a client without a certificate from ``client_ca`` is refused."""

    enabled: bool = True
    cert: str = ""
    key: str = ""
    client_ca: str = ""
    # CRL (PEM or DER) signed by ``client_ca``; empty = no revocation check. Re-read on
    # SIGHUP; a revoked client certificate is refused on every call.
    crl: str = ""


@dataclass(frozen=True, slots=True)
class S3Config:
    """The object store holding ciphertext."""

    endpoint: str = "127.0.0.1:8333"
    secure: bool = False
    ca_file: str = ""
    bucket: str = "medvault-records"
    access_key_env: str = "MEDVAULT_S3_ACCESS_KEY"
    secret_key_env: str = "MEDVAULT_S3_SECRET_KEY"  # noqa: S105  (a variable name)
    access_key_file: str = ""
    secret_key_file: str = ""
    part_size: int = 8 << 20


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """The metadata database (SQLAlchemy URL: sqlite:///... or postgresql+psycopg://...)."""

    url: str = ""


@dataclass(frozen=True, slots=True)
class KeystoreConfig:
    """The PKCS#11 token."""

    module: str = "/usr/lib/softhsm/libsofthsm2.so"
    token_label: str = "medvault"  # noqa: S105  (a label, not a secret)
    pin_env: str = "MEDVAULT_PIN"
    pin_file: str = ""
    softhsm2_conf: str = ""
    pool_size: int = 8


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The audit trail's checkpoints."""

    checkpoint_every: int = 1000
    checkpoint_seconds: float = 60.0
    signing_key_label: str = "medvault-audit-v1"
    # BENCHMARK ONLY: false skips writing audit events. Never in production.
    enabled: bool = True
    # Write-once copies of every checkpoint (docs/audit.md): a bucket of their own on the
    # [s3] endpoint, created with S3 Object Lock; empty = no bucket witness.
    witness_bucket: str = "medvault-audit-witness"
    witness_lock_mode: str = "COMPLIANCE"  # or "GOVERNANCE"
    # Retention of each copy; 0 = no Object Lock (for an S3 without it: a weaker witness).
    witness_lock_days: int = 3650
    # A file that gets one JSON line per checkpoint (make it append-only); empty = off.
    witness_file: str = ""
    # Grant revocation markers (storage.grant_revocations), kept in witness_bucket (the
    # record bucket without one): each replica re-reads them this often (the bound on a
    # rollback of a revocation made on another replica), and refuses grant checks once
    # it could not for revocation_stale_seconds.
    revocation_refresh_seconds: float = 10.0
    revocation_stale_seconds: float = 120.0


@dataclass(frozen=True, slots=True)
class SigningConfig:
    """Document signatures: trust anchors for VerifyRecord, chain embedded when signing."""

    # PEM file of one or more CA certificates; empty = every signature is untrusted.
    trust_anchors: str = ""
    # PEM file of intermediate CA certificates embedded in each new .p7s; empty = none.
    chain: str = ""


@dataclass(frozen=True, slots=True)
class BackupConfig:
    """Backups: where they go, when they run, how long they are kept (docs/operations.md)."""

    target: str = "s3"  # "s3" or "directory"
    bucket: str = "medvault-backups"
    endpoint: str = ""  # empty = the [s3] endpoint
    secure: bool | None = None  # unset = as [s3]
    ca_file: str = ""
    access_key_file: str = ""  # empty = the [s3] credentials
    secret_key_file: str = ""
    directory: str = "backups"
    object_lock_days: int = 0
    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 12
    signing_key_label: str = "medvault-backup-v1"
    # Cron expressions (UTC); empty = not scheduled.
    schedule: str = "0 2 * * *"
    drill_schedule: str = ""
    # TESTS ONLY: a slot every N seconds instead of the cron expression; 0 = off.
    schedule_seconds: int = 0
    drill_schedule_seconds: int = 0
    prune_after_backup: bool = True
    drill_database: str = ""  # PostgreSQL URL for scratch databases; empty = SQLite temp
    # Threads copying objects, verifying and drilling (1 to 64).
    workers: int = 4
    # Scheduled drills: 0 = full; else sampled with this confidence (0.5 <= c < 1) of
    # finding a defect rate of drill_max_defect_rate (docs/operations.md).
    drill_sample_confidence: float = 0.0
    drill_max_defect_rate: float = 0.01


@dataclass(frozen=True, slots=True)
class StatsConfig:
    """Aggregate statistics for SDMX-HD reporting (docs/statistics.md)."""

    # The facility code the counts are reported under (the Ministry's code of this
    # hospital); every record of this deployment counts for it. Empty: exports refused.
    facility: str = ""
    # IANA time zone in which a month starts and ends.
    time_zone: str = "UTC"
    # Counts from 1 to min_cell - 1 are withheld (suppressed); zero is shown.
    min_cell: int = 5


@dataclass(frozen=True, slots=True)
class MllpConfig:
    """HL7 v2 over MLLP on the [tls] certificates (service.mllp, docs/formats.md).

    Off unless ``listen`` is set. Each connection must present a client certificate of
    ``[tls] client_ca``; it names the principal exactly as on gRPC.
    """

    listen: str = ""  # host:port, e.g. "0.0.0.0:2575"; empty = no MLLP listener
    # A frame (one message) longer than this is answered AR and its connection closed.
    max_frame_bytes: int = 4 << 20
    # A connection with no complete frame for this long is closed (also mid-frame).
    idle_seconds: float = 120.0
    max_connections: int = 64
    max_connections_per_principal: int = 4
    # Which part of PID-3 CX.4 becomes the record's assigning authority: "oid"
    # (urn:oid:<HD.2> when HD.3 is ISO, else HD.1) or "namespace" (HD.1 first).
    authority: str = "oid"


MAX_MLLP_FRAME = 64 << 20


@dataclass(frozen=True, slots=True)
class DicomConfig:
    """The DICOM network service (service/dicom, docs/formats.md); off unless ``listen``."""

    listen: str = ""  # host:port; empty = no DICOM listener
    ae_title: str = "MEDVAULT"
    # Largest instance a C-STORE may send, and a C-GET may hold in memory while sending.
    max_instance_size: int = 1 << 30
    max_associations: int = 16
    network_timeout_seconds: float = 60.0
    # Where received data sets are spooled (sealed, nameless files; service.dicom.spool):
    # a folder of the service's own, in its state folder, emptied at every start.
    spool_directory: str = "dicom-spool"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole service configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    s3: S3Config = field(default_factory=S3Config)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    keystore: KeystoreConfig = field(default_factory=KeystoreConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    signing: SigningConfig = field(default_factory=SigningConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    mllp: MllpConfig = field(default_factory=MllpConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    base_dir: Path = Path()
