"""AuditTrail: group commit, checkpoints, fail-closed writes, on SQLite and PostgreSQL."""

# The fresh-database fixtures live in the storage tests and are imported here, which
# ruff reads as redefinitions when tests name them as parameters.
# ruff: noqa: F811

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.engine import Engine

from keystore.signing import Pkcs11Signer
from service.audit import AuditUnavailableError
from service.audit.checkpoints import make_checkpoint
from service.audit.trail import AuditTrail
from storage.audit_log import SqlAuditLog, audit_events
from tests.integration.storage.test_audit_log import (  # noqa: F401 - fixtures
    audit_engine,
    audit_log,
    audit_url,
    entry,
    signer,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def trail(audit_log: SqlAuditLog, signer: Pkcs11Signer) -> Iterator[AuditTrail]:
    with AuditTrail(audit_log, signer, checkpoint_every=1000, checkpoint_seconds=60) as t:
        yield t


class SoftwareSigner:
    """An attacker's key: valid signatures, but not the token's audit key."""

    key_label = "medvault-audit-v1"

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def public_key_der(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def test_record_commits_and_verifies(trail: AuditTrail, audit_log: SqlAuditLog) -> None:
    event = trail.record(entry(1))
    assert event.sequence == 1
    assert audit_log.events(0, 10) == [event]
    made = trail.checkpoint_now()
    assert made is not None
    assert made.sequence == 1
    assert trail.checkpoint_now() is None  # nothing new to sign
    result = trail.verify()
    assert result.ok
    assert result.checkpoints_checked == 1


def test_concurrent_records_are_complete(trail: AuditTrail, audit_log: SqlAuditLog) -> None:
    errors: list[BaseException] = []
    sequences: list[int] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        try:
            for n in range(500):
                seq = trail.record(entry(worker * 1000 + n)).sequence
                with lock:
                    sequences.append(seq)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(sequences) == list(range(1, 4001))
    assert audit_log.head()[0] == 4000
    result = trail.verify()
    assert result.ok, result
    assert result.events_checked == 4000
    # checkpoint_every=1000: the writer signed along the way.
    assert result.checkpoints_checked >= 3


def _signed(log: SqlAuditLog) -> int:
    """The sequence the last checkpoint covers (0 before the first)."""
    last = log.last_checkpoint()
    return 0 if last is None else last.sequence


def test_time_based_checkpoint(audit_log: SqlAuditLog, signer: Pkcs11Signer) -> None:
    with AuditTrail(audit_log, signer, checkpoint_seconds=0.2) as trail:
        for n in range(3):
            trail.record(entry(n))
        # The writer signs whatever is committed 0.2 s after the trail started: on a
        # loaded machine that can be before the third event is, and the head is signed
        # 0.2 s later. Wait for the checkpoint covering all three, not the first one.
        deadline = time.monotonic() + 30
        while _signed(audit_log) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        last = audit_log.last_checkpoint()
        assert last is not None
        assert last.sequence == 3


def test_close_writes_final_checkpoint_and_refuses_more(
    audit_log: SqlAuditLog, signer: Pkcs11Signer
) -> None:
    trail = AuditTrail(audit_log, signer)
    trail.record(entry(1))
    trail.record(entry(2))
    trail.close()
    trail.close()
    last = audit_log.last_checkpoint()
    assert last is not None
    assert last.sequence == 2
    with pytest.raises(AuditUnavailableError):
        trail.record(entry(3))


def test_checkpoint_signed_by_another_key_fails(trail: AuditTrail, audit_log: SqlAuditLog) -> None:
    for n in range(5):
        trail.record(entry(n))
    sequence, head_hash = audit_log.head()
    forged = make_checkpoint(SoftwareSigner(), sequence, head_hash, datetime.now(UTC))
    assert audit_log.add_checkpoint(forged)
    result = trail.verify()
    assert (result.ok, result.first_bad_sequence) == (False, 5)
    assert result.reason == "checkpoint signature invalid"


def test_failed_writes_fail_closed_then_recover(
    trail: AuditTrail, audit_engine: Engine, audit_log: SqlAuditLog
) -> None:
    trail.record(entry(0))
    with audit_engine.begin() as c:
        c.execute(sa.text("ALTER TABLE audit_events RENAME TO audit_events_away"))
    failures: list[BaseException] = []

    def client(n: int) -> None:
        try:
            trail.record(entry(n))
        except AuditUnavailableError as e:
            failures.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(failures) == 8  # every waiting caller told, none silently dropped
    with audit_engine.begin() as c:
        c.execute(sa.text("ALTER TABLE audit_events_away RENAME TO audit_events"))
    assert trail.record(entry(9)).sequence == 2
    assert trail.verify().ok


def test_database_outage_fails_closed_then_recovers(
    trail: AuditTrail, audit_engine: Engine, audit_url: str, request: pytest.FixtureRequest
) -> None:
    trail.record(entry(0))
    if audit_engine.dialect.name == "sqlite":
        # Another process holds the write lock longer than busy_timeout allows.
        blocker = sa.create_engine(audit_url)
        with blocker.connect() as c:
            c.exec_driver_sql("BEGIN IMMEDIATE")
            with pytest.raises(AuditUnavailableError):
                trail.record(entry(1))
            c.exec_driver_sql("ROLLBACK")
        blocker.dispose()
    else:
        name = audit_engine.url.database
        admin: Engine = request.getfixturevalue("postgres_admin")
        with admin.connect() as c:
            c.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            c.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
        audit_engine.dispose()  # even our own connection is gone now
        with pytest.raises(AuditUnavailableError):
            trail.record(entry(1))
        with admin.connect() as c:
            c.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    assert trail.record(entry(2)).sequence == 2
    assert trail.verify().ok
    with audit_engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(audit_events)).scalar() == 2


def test_benchmark_switch_writes_nothing(audit_log: SqlAuditLog, signer: Pkcs11Signer) -> None:
    with AuditTrail(audit_log, signer, enabled=False) as trail:
        assert trail.record(entry(1)).sequence == 0
    assert audit_log.head()[0] == 0
