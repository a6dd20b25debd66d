"""Composition root: the one place where concrete backends are chosen and wired.

Everything else receives Protocols (``BlobStore``, ``MetadataStore``, ``KeyWrapper``,
``BlindIndexer``, ``SignerFactory``, and the role Protocols of ``storage.roles``), so
SoftHSM2 or a hardware HSM, SQLite or PostgreSQL, SeaweedFS or another S3 differ here
by configuration and nowhere else. ``build`` returns the process's ``Components``; their
``app`` is the one application object whose use cases the servicers call.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from minio import Minio
from sqlalchemy import Engine

from keystore import (
    Pkcs11BlindIndexer,
    Pkcs11Config,
    Pkcs11KekRing,
    Pkcs11KeyWrapper,
    Pkcs11SessionPool,
    Pkcs11Signer,
    Pkcs11Signers,
)
from service.audit.trail import AuditTrail
from service.authn import Authenticator
from service.authz.policy import PolicyHolder
from service.backup import Backups, BackupWiring
from service.backup import build as build_backups
from service.config import Config, ConfigError, read_secret
from service.guard import AccessGuard
from service.incidents import IncidentDetector
from service.revocation import RevocationError, RevocationList
from service.signing import DocumentSigning
from service.signing.validation import SignatureValidator, load_pem_certificates
from service.write_once import audit_witnesses, revoked_grants
from storage import (
    GRANT_ADOPTER,
    WRITE_FAULT_POINTS,
    AuditLog,
    CheckpointWitness,
    CommitTagger,
    GrantSealer,
    KekManager,
    KekRegistry,
    RecordStatistics,
    RecordStore,
    RevokedGrants,
    RunSealer,
    S3BlobStore,
    SignatureStore,
    SqlAuditLog,
    SqlGrantStore,
    SqlMetadataStore,
    SqlPutRequests,
    SqlRunLedger,
    StorageError,
    StoreLimits,
    WorkLedger,
    WorkSealer,
    adopt_legacy,
    install_statement_deadlines,
    make_engine,
    make_minio_client,
    time_left,
    upgrade,
)

# Fault injection for the crash-safety tests (docs/reliability.md): "crash-before-commit"
# makes the process exit (86) between the object upload and the metadata commit;
# "sigkill:<point>[:<n>]" makes it SIGKILL itself the n-th time (default the first) a
# put passes the named point of storage.records.WRITE_FAULT_POINTS.
FAULT_ENV = "MEDVAULT_FAULT"

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Application:
    """The use cases of one service process: what the servicers call.

    Typed by role where a Protocol exists, so a test can build one from in-memory fakes
    (``tests/unit/fakes.py``) and the servicers cannot reach past a role to its backend.
    """

    records: RecordStore
    access: AccessGuard
    audit: AuditLog
    signing: DocumentSigning
    keys: KekRegistry
    backups: Backups
    stats: RecordStatistics


@dataclass
class Components:
    """The wired backends of one service process."""

    store: RecordStore
    blobs: S3BlobStore
    metadata: SqlMetadataStore
    pool: Pkcs11SessionPool
    engine: Engine
    guard: AccessGuard
    audit_log: SqlAuditLog
    signing: DocumentSigning
    wrapper: Pkcs11KeyWrapper
    kek: KekManager
    backup: BackupWiring
    stats: RecordStatistics
    work_ledger: WorkLedger  # scheduled_work: the orphan sweep's rounds
    revocation: RevocationList | None = None
    put_requests: SqlPutRequests | None = None
    revoked_grants: RevokedGrants | None = None

    @property
    def app(self) -> Application:
        """The use cases the servicers call (the backends above stay with the process)."""
        return Application(
            records=self.store, access=self.guard, audit=self.audit_log,
            signing=self.signing, keys=self.kek, backups=self.backup.backups,
            stats=self.stats,
        )  # fmt: skip

    def missing_row(self, object_key: str) -> None:
        """The sweeper's report of a committed object without a row: a ``row-tampered``
        incident naming the object (its key is opaque: no patient data)."""
        self.guard.incidents.tampered(
            "row-tampered", f"object/{object_key}",
            "a committed record's object has no row (deleted or re-pointed in the "
            "database); the object is kept: restore its row from a backup",
        )  # fmt: skip

    def reloadables(self) -> list[RevocationList]:
        """What SIGHUP re-reads besides the policy (the CRL, when configured)."""
        return [self.revocation] if self.revocation is not None else []

    def close(self) -> None:
        """Flush the audit trail, release the token sessions and database connections."""
        self.backup.scheduler.stop()  # after its current run; before what it uses closes
        if self.revoked_grants is not None:
            self.revoked_grants.stop()
        try:
            self.store.close()  # the commit tags still queued
            self.guard.trail.close()
        finally:
            self.pool.close()
            self.engine.dispose()


def keystore_config(config: Config) -> Pkcs11Config:
    """The keystore's own configuration from the service's."""
    ks = config.keystore
    if ks.softhsm2_conf:
        # SoftHSM2 reads this when the module loads; set it before the first load.
        os.environ.setdefault("SOFTHSM2_CONF", ks.softhsm2_conf)
    return Pkcs11Config(
        module_path=ks.module,
        token_label=ks.token_label,
        pin_env=ks.pin_env or None,
        pin_file=ks.pin_file or None,
        pool_size=ks.pool_size,
    )


def ledger_reader(config: Config) -> tuple[SqlRunLedger, Pkcs11SessionPool]:
    """The run ledger for a process that only reads it (the supervisor's gauges), and the
    one-session token pool it authenticates rows with (close it when done)."""
    pool = Pkcs11SessionPool(replace(keystore_config(config), pool_size=1))
    return SqlRunLedger(make_engine(config.database.url), RunSealer(Pkcs11BlindIndexer(pool))), pool


def s3_client(config: Config) -> Minio:
    """The minio client of the ``[s3]`` endpoint (built once; its users share it)."""
    s3 = config.s3
    return make_minio_client(
        s3.endpoint,
        read_secret(s3.access_key_env, s3.access_key_file),
        read_secret(s3.secret_key_env, s3.secret_key_file),
        secure=s3.secure,
        ca_file=s3.ca_file or None,
    )


def blob_store(config: Config, client: Minio | None = None) -> S3BlobStore:
    """The S3 blob store named by the configuration (bucket created if absent)."""
    blobs = S3BlobStore(
        client or s3_client(config), config.s3.bucket, part_size=config.s3.part_size
    )
    blobs.ensure_bucket()
    return blobs


def _fault_hook() -> Callable[[], None] | None:
    if os.environ.get(FAULT_ENV) == "crash-before-commit":
        return lambda: os._exit(86)
    return None


def _fault_points() -> Callable[[str], None] | None:
    """The ``sigkill:<point>[:<n>]`` fault of ``MEDVAULT_FAULT``, or None."""
    value = os.environ.get(FAULT_ENV, "")
    if not value.startswith("sigkill:"):
        return None
    _, point, *rest = value.split(":")
    if (
        point not in WRITE_FAULT_POINTS
        or len(rest) > 1
        or not all(r.isdigit() and int(r) > 0 for r in rest)
    ):
        raise ConfigError(
            f"{FAULT_ENV}: expected sigkill:<point>[:<n>], n >= 1, point one of "
            + ", ".join(WRITE_FAULT_POINTS)
        )
    remaining = [int(rest[0]) if rest else 1]
    lock = threading.Lock()

    def fault(name: str) -> None:
        if name != point:
            return
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    return fault


BENCHMARK_ENV = "MEDVAULT_BENCHMARK"


def _check_audit_switch(config: Config) -> None:
    """``audit.enabled = false`` exists for one benchmark; refuse it anywhere else."""
    if not config.audit.enabled and os.environ.get(BENCHMARK_ENV) != "1":
        raise ConfigError(
            "audit.enabled = false is a benchmark-only switch and would leave reads "
            f"unaudited; remove it (or set {BENCHMARK_ENV}=1 in a benchmark)"
        )


def revocation_list(config: Config) -> RevocationList | None:
    """The client-certificate CRL of ``[tls] crl``, checked against ``client_ca``."""
    tls = config.tls
    if not tls.crl:
        return None
    try:
        return RevocationList.from_files(Path(tls.crl), Path(tls.client_ca))
    except RevocationError as e:
        raise ConfigError(f"[tls] crl: {e}") from e


def access_guard(  # noqa: PLR0917  (the composition root wires what it is given)
    config: Config,
    engine: Engine,
    log: SqlAuditLog,
    pool: Pkcs11SessionPool,
    witnesses: Sequence[CheckpointWitness] = (),
    sealer: GrantSealer | None = None,
    revocation: RevocationList | None = None,
    revoked: RevokedGrants | None = None,
) -> AccessGuard:
    """Policy, authentication, grants, the audit trail and incident detection."""
    _check_audit_switch(config)
    holder = PolicyHolder.load(config.base_dir / config.server.policy, config.server.process_count)
    audit = config.audit
    trail = AuditTrail(
        log,
        Pkcs11Signer(pool, audit.signing_key_label),
        checkpoint_every=audit.checkpoint_every,
        checkpoint_seconds=audit.checkpoint_seconds,
        enabled=audit.enabled,
        witnesses=witnesses,
    )
    incidents = IncidentDetector(lambda: holder.current.incidents, trail)

    def forged(grant_id: str) -> None:
        incidents.tampered(
            "grant-tampered",
            f"grant/{grant_id}",
            "grant row missing, altered or failing authentication; it grants nothing",
        )

    def unrevoked(grant_id: str) -> None:
        incidents.tampered(
            "grant-tampered", f"grant/{grant_id}",
            "grant row says not revoked but its revocation marker (outside the database) "
            "says revoked: the row was put back in the database or restored from an older "
            "backup (or its revocation did not commit: revoke it again); it grants nothing",
        )  # fmt: skip

    sealer = sealer or GrantSealer(Pkcs11BlindIndexer(pool))
    grants = SqlGrantStore(engine, sealer, forged, revocations=revoked, on_unrevoked=unrevoked)
    try:
        marked = grants.mark_revoked_rows(datetime.now(UTC))
    except StorageError as e:
        raise ConfigError(f"[audit] grant revocation markers: {e}") from e
    if marked:
        _log.warning("revocation markers written for %d revoked grants that had none", marked)
    authenticator = Authenticator(holder, revocation=revocation)
    return AccessGuard(holder, authenticator, grants, trail, incidents)


def _certificates(path: str, key: str) -> list[bytes]:
    """The DER certificates of a ``[signing]`` PEM file; ``ConfigError`` names the key."""
    try:
        return load_pem_certificates(path)
    except ValueError as e:
        raise ConfigError(f"[signing] {key}: {e}") from e


def build(config: Config) -> Components:
    """Open the token, the database (migrated to head) and the object store."""
    # A call's token operations wait for a session no longer than the call has left.
    pool = Pkcs11SessionPool(keystore_config(config), time_left=time_left)
    try:
        return _wire(config, pool)
    except BaseException:
        pool.close()
        raise


def _wire(config: Config, pool: Pkcs11SessionPool) -> Components:
    revocation = revocation_list(config)
    engine = make_engine(config.database.url)
    install_statement_deadlines(engine)  # a call's statements end with its deadline
    indexer = Pkcs11BlindIndexer(pool)
    sealer = GrantSealer(indexer)
    upgrade(engine, hooks={GRANT_ADOPTER: functools.partial(adopt_legacy, sealer)})
    metadata = SqlMetadataStore(engine)
    client = s3_client(config)
    blobs = blob_store(config, client)
    audit_log = SqlAuditLog(engine)
    witnesses = audit_witnesses(config, client)  # the witness bucket ensured first
    revoked = revoked_grants(config, client)
    guard = access_guard(config, engine, audit_log, pool, witnesses, sealer, revocation, revoked)
    limits = StoreLimits(
        max_record_size=config.server.max_record_size, segment_size=config.server.segment_size
    )
    wrapper = Pkcs11KeyWrapper(pool)
    retention = timedelta(hours=config.server.request_id_retention_hours)
    put_requests = SqlPutRequests(engine, retention)
    store = RecordStore(
        blobs, metadata, wrapper, indexer, limits,
        before_commit=_fault_hook(),
        fault=_fault_points(),
        accept_legacy=config.server.accept_legacy_sealed_rows,
        requests=put_requests,
        tagger=CommitTagger(blobs.mark_committed),
        on_tampered=lambda e: guard.incidents.tampered(
            "row-tampered", e.resource,
            "metadata row failed authentication (changed in the database); the read was refused",
        ),
    )  # fmt: skip
    # The rewrap's last phase upgrades legacy (v1) sealed metadata (storage.reseal).
    kek = KekManager(engine, wrapper, Pkcs11KekRing(pool, wrapper), upgrade=store.upgrade_sealed)
    kek.sync()  # register the token's KEK versions in kek_versions
    signing = DocumentSigning(
        SignatureStore(store, engine),
        Pkcs11Signers(pool),
        SignatureValidator(_certificates(config.signing.trust_anchors, "trust_anchors")),
        chain=_certificates(config.signing.chain, "chain"),
    )
    backup = build_backups(
        config, engine, blobs, pool, guard.trail.record,
        forged_run=lambda run: guard.incidents.tampered(
            "run-tampered", run,
            "scheduled-run ledger row failing its MAC (written in the database without the "
            "token); the slot was claimed over and runs",
        ),
        missed_run=lambda run: guard.incidents.tampered(
            "run-missed", run,
            "scheduled slot left unclaimed while the election lock was held by a session "
            "that runs no slot (a database writer's?); the slot runs without the lock",
        ),
        overdue_run=lambda marker: guard.incidents.tampered(
            "run-overdue", marker,
            "backup run marker beating for longer than any run lasts, or dated ahead (written "
            "in the backup target?); not honoured: pruning went ahead",
        ),
    )  # fmt: skip
    stats = RecordStatistics(
        engine, store.verifier, facility=config.stats.facility,
        time_zone=config.stats.time_zone, min_cell=config.stats.min_cell,
    )  # fmt: skip
    return Components(
        store=store,
        blobs=blobs,
        metadata=metadata,
        pool=pool,
        engine=engine,
        guard=guard,
        audit_log=audit_log,
        signing=signing,
        wrapper=wrapper,
        kek=kek,
        backup=backup,
        stats=stats,
        revocation=revocation,
        put_requests=put_requests,
        revoked_grants=revoked,
        work_ledger=WorkLedger(engine, WorkSealer(indexer), functools.partial(_forged_work, guard)),
    )


def _forged_work(guard: AccessGuard, row: str) -> None:
    """A ``scheduled_work`` row failing its MAC: a ``run-tampered`` incident."""
    guard.incidents.tampered(
        "run-tampered", row,
        "scheduled-work ledger row failing its MAC (written in the database without the "
        "token); read as no run: the work was claimed over and runs",
    )  # fmt: skip
