"""Chained checkpoints and write-once witnesses against a database writer's rewrite.

Real SoftHSM2 audit key, real SeaweedFS bucket with S3 Object Lock (COMPLIANCE), SQLite
and PostgreSQL. The attack: edit one event, re-hash every later event, rewrite the head
row, delete the checkpoints after an early one. The database alone then verifies; the
witnesses name the first sequence after the last good checkpoint, and the service will
not sign over it.
"""

# The fresh-database fixtures live in test_audit_log and are imported here, which ruff
# reads as redefinitions when tests name them as parameters.
# ruff: noqa: F811

from __future__ import annotations

import io
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from minio import Minio
from minio.commonconfig import COMPLIANCE, GOVERNANCE
from minio.error import S3Error
from minio.retention import Retention
from sqlalchemy.engine import Engine

from keystore.signing import Pkcs11Signer
from service.audit import AuditChainError
from service.audit.checkpoints import (
    WITNESS_FAILURES,
    Checkpointer,
    make_checkpoint,
    signature_checker,
)
from service.audit.trail import AuditTrail
from storage.audit_log import SqlAuditLog, audit_checkpoints
from storage.audit_model import Checkpoint, checkpoint_message
from storage.audit_verify import (
    CHECKPOINT_DELETED,
    WITNESS_FORGED,
    WITNESS_MISMATCH,
    WITNESS_MISSING,
    WITNESS_UNAVAILABLE,
    verify_chain,
)
from storage.audit_witness import (
    CheckpointWitness,
    FileCheckpointWitness,
    S3CheckpointWitness,
    encode,
)
from storage.backup.targets import S3Target
from tests.integration.storage.audit_attacks import incidents, rewrite_history
from tests.integration.storage.test_audit_log import (  # noqa: F401 - fixtures
    audit_engine,
    audit_log,
    audit_url,
    entry,
    signer,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
EVERY = 10  # events per checkpoint in these tests


@pytest.fixture(scope="module")
def locked_bucket(s3_server: Any) -> tuple[Minio, str]:
    """One Object Lock bucket for the module (each test writes under its own prefix)."""
    client: Minio = s3_server.client()
    name = f"wit-{secrets.token_hex(6)}"
    S3Target(client, name, lock_days=1, lock_mode=COMPLIANCE).ensure_bucket()
    return client, name


@pytest.fixture
def s3_witness(locked_bucket: tuple[Minio, str]) -> S3CheckpointWitness:
    client, name = locked_bucket
    target = S3Target(client, name, lock_days=1, lock_mode=COMPLIANCE)
    witness = S3CheckpointWitness(client, target, name, f"d-{secrets.token_hex(6)}")
    witness.ensure(require_lock=True)
    return witness


@pytest.fixture
def file_witness(tmp_path: Path) -> FileCheckpointWitness:
    return FileCheckpointWitness(tmp_path / "checkpoints.jsonl")


def grow(log: SqlAuditLog, checkpointer: Checkpointer, rounds: int, tail: int = 3) -> None:
    """``rounds`` checkpoints, one every EVERY events, then ``tail`` unsigned events."""
    for r in range(rounds):
        log.append([entry(r * EVERY + n) for n in range(EVERY)])
        assert checkpointer.checkpoint() is not None
    log.append([entry(1000 + n) for n in range(tail)])


def checker(signer: Pkcs11Signer) -> Any:
    return signature_checker(signer.public_key_der())


def verify(log: SqlAuditLog, signer: Pkcs11Signer, *witnesses: CheckpointWitness) -> Any:
    return verify_chain(log, checker(signer), witnesses=witnesses, batch_size=16)


def test_full_rewrite_named_by_witnesses_and_not_signed(
    audit_log: SqlAuditLog, audit_engine: Engine, signer: Pkcs11Signer,
    s3_witness: S3CheckpointWitness, file_witness: FileCheckpointWitness,
) -> None:  # fmt: skip
    checkpointer = Checkpointer(audit_log, signer, [s3_witness, file_witness])
    grow(audit_log, checkpointer, rounds=5)  # checkpoints 10 ... 50, head 53
    assert verify(audit_log, signer, s3_witness, file_witness).ok
    rewrite_history(audit_engine, k=23, keep_through=20)

    # The database alone cannot tell: this is the attack as it stood.
    assert verify(audit_log, signer).ok
    for witness in (s3_witness, file_witness):
        result = verify(audit_log, signer, witness)
        assert (result.ok, result.first_bad_sequence) == (False, 21), result.reason
        assert result.reason == WITNESS_MISMATCH

    # The service refuses to sign over it, raises an incident, and says so in verify.
    audit_log.append([entry(n) for n in range(EVERY)])
    claims_before = len(s3_witness.claims())
    with pytest.raises(AuditChainError):
        checkpointer.checkpoint()
    last = audit_log.last_checkpoint()
    assert last is not None
    assert last.sequence == 20  # nothing new signed
    assert len(s3_witness.claims()) == claims_before
    assert incidents(audit_log) == 1
    result = checkpointer.verify()
    assert (result.ok, result.first_bad_sequence) == (False, 21)
    with pytest.raises(AuditChainError):
        checkpointer.checkpoint()
    assert incidents(audit_log) == 1  # one incident per finding, not per attempt

    # After a restart the anchor is read back from the witness: still refused.
    with pytest.raises(AuditChainError):
        Checkpointer(audit_log, signer, [s3_witness]).checkpoint()
    assert audit_log.last_checkpoint() == last


def test_refused_without_witness_from_memory(
    audit_log: SqlAuditLog, audit_engine: Engine, signer: Pkcs11Signer
) -> None:
    checkpointer = Checkpointer(audit_log, signer)
    grow(audit_log, checkpointer, rounds=3)
    rewrite_history(audit_engine, k=15, keep_through=10)
    audit_log.append([entry(1)])
    with pytest.raises(AuditChainError):
        checkpointer.checkpoint()
    result = checkpointer.verify()
    assert not result.ok
    assert result.first_bad_sequence == 30  # the checkpoint it signed is gone
    assert "refused" in result.reason


def test_deleted_checkpoints_named(
    audit_log: SqlAuditLog, audit_engine: Engine, signer: Pkcs11Signer,
    s3_witness: S3CheckpointWitness,
) -> None:  # fmt: skip
    checkpointer = Checkpointer(audit_log, signer, [s3_witness])
    grow(audit_log, checkpointer, rounds=4)
    with audit_engine.begin() as c:  # one from the middle: its successor names it
        c.execute(audit_checkpoints.delete().where(audit_checkpoints.c.sequence == 20))
    result = verify(audit_log, signer)
    assert (result.first_bad_sequence, result.reason) == (20, CHECKPOINT_DELETED)
    with audit_engine.begin() as c:  # every one after 10: only the witness knows
        c.execute(audit_checkpoints.delete().where(audit_checkpoints.c.sequence > 10))
    assert verify(audit_log, signer).ok
    result = verify(audit_log, signer, s3_witness)
    assert (result.first_bad_sequence, result.reason) == (20, WITNESS_MISSING)


def forbidden(
    client: Minio, bucket: str, key: str, version: str | None, until: datetime
) -> list[Callable[[], object]]:
    """What Object Lock (COMPLIANCE) must refuse to anyone, the bucket owner included."""
    return [
        lambda: client.remove_object(bucket, key, version_id=version),
        lambda: client._execute(  # DELETE with x-amz-bypass-governance-retention
            "DELETE", bucket, key, query_params={"versionId": version or ""},
            headers={"x-amz-bypass-governance-retention": "true"},
        ),
        lambda: client.set_object_retention(  # shorten
            bucket, key, Retention(COMPLIANCE, until), version_id=version
        ),
        lambda: client.set_object_retention(  # downgrade to a bypassable mode
            bucket, key, Retention(GOVERNANCE, until + timedelta(days=2)), version_id=version
        ),
    ]  # fmt: skip


def test_object_lock_refuses_removing_witness_objects(
    audit_log: SqlAuditLog, audit_engine: Engine, signer: Pkcs11Signer,
    s3_witness: S3CheckpointWitness, locked_bucket: tuple[Minio, str],
) -> None:  # fmt: skip
    client, bucket = locked_bucket
    checkpointer = Checkpointer(audit_log, signer, [s3_witness])
    grow(audit_log, checkpointer, rounds=3)
    keys = [c.where for c in s3_witness.claims()]
    assert len(keys) == 3
    until = datetime.now(UTC) + timedelta(minutes=1)
    for key in keys:
        version = client.stat_object(bucket, key).version_id
        assert client.get_object_retention(bucket, key).mode == COMPLIANCE
        refused = forbidden(client, bucket, key, version, until)
        for attempt in refused:
            with pytest.raises(S3Error) as denied:
                attempt()
            assert denied.value.code == "AccessDenied"
        # What a bucket writer can do: hide the key behind a delete marker, or overwrite.
        client.remove_object(bucket, key)
        client.put_object(bucket, key, io.BytesIO(b"{}"), 2)
    # The locked versions still speak: the rewrite is named all the same.
    rewrite_history(audit_engine, k=12, keep_through=10)
    result = verify(audit_log, signer, s3_witness)
    assert (result.first_bad_sequence, result.reason) == (11, WITNESS_MISMATCH)


def test_forged_witness_entry_is_reported(
    audit_log: SqlAuditLog, signer: Pkcs11Signer, s3_witness: S3CheckpointWitness,
    locked_bucket: tuple[Minio, str],
) -> None:  # fmt: skip
    client, bucket = locked_bucket
    checkpointer = Checkpointer(audit_log, signer, [s3_witness])
    grow(audit_log, checkpointer, rounds=2)
    genuine = audit_log.last_checkpoint()
    assert genuine is not None
    # A bucket writer without the token: a claim at 15 with a made-up hash and signature.
    fake = Checkpoint(15, bytes(32), b"x", genuine.key_label, genuine.public_key_der,
                      genuine.created_at, 2, 10, bytes(32))  # fmt: skip
    data = encode(fake)
    client.put_object(bucket, s3_witness.key(fake), io.BytesIO(data), len(data))
    result = verify(audit_log, signer, s3_witness)
    assert (result.first_bad_sequence, result.reason) == (15, WITNESS_FORGED)


def test_v1_checkpoints_still_verify_and_chain(
    audit_log: SqlAuditLog, audit_engine: Engine, signer: Pkcs11Signer
) -> None:
    audit_log.append([entry(n) for n in range(5)])
    sequence, head_hash = audit_log.head()
    v1 = Checkpoint(sequence, head_hash, signer.sign(checkpoint_message(sequence, head_hash)),
                    signer.key_label, signer.public_key_der(), datetime.now(UTC))  # fmt: skip
    assert audit_log.add_checkpoint(v1)
    assert audit_log.checkpoints() == [v1]  # stored and read back as version 1
    assert verify(audit_log, signer).ok
    audit_log.append([entry(n) for n in range(5)])
    v2 = Checkpointer(audit_log, signer).checkpoint()
    assert v2 is not None
    assert (v2.version, v2.prev_sequence) == (2, 5)
    assert verify(audit_log, signer).ok
    with audit_engine.begin() as c:
        c.execute(audit_checkpoints.delete().where(audit_checkpoints.c.sequence == 5))
    assert (verify(audit_log, signer).first_bad_sequence, verify(audit_log, signer).reason) == (
        5, CHECKPOINT_DELETED,
    )  # fmt: skip


def test_stale_predecessor_is_not_stored(audit_log: SqlAuditLog, signer: Pkcs11Signer) -> None:
    # Two replicas signing at once: the one whose predecessor is stale stores nothing.
    audit_log.append([entry(n) for n in range(3)])
    first = Checkpointer(audit_log, signer).checkpoint()
    audit_log.append([entry(n) for n in range(3)])
    sequence, head_hash = audit_log.head()
    stale = make_checkpoint(signer, sequence, head_hash, datetime.now(UTC), None)
    assert not audit_log.add_checkpoint(stale)
    assert audit_log.checkpoints() == [first]


def test_witness_down_checkpoints_anyway_and_retries(
    audit_log: SqlAuditLog, signer: Pkcs11Signer, tmp_path: Path
) -> None:
    directory = tmp_path / "not-yet"
    witness = FileCheckpointWitness(directory / "checkpoints.jsonl")
    checkpointer = Checkpointer(audit_log, signer, [witness])
    failures = WITNESS_FAILURES._value.get()
    audit_log.append([entry(n) for n in range(3)])
    assert checkpointer.checkpoint() is not None  # stored although the witness failed
    assert WITNESS_FAILURES._value.get() == failures + 1
    result = verify(audit_log, signer, witness)  # an absent file claims nothing
    assert result.ok
    directory.mkdir()
    audit_log.append([entry(n) for n in range(3)])
    assert checkpointer.checkpoint() is not None
    assert [c.sequence for c in witness.claims()] == [3, 6]  # the missed one caught up
    unreadable = FileCheckpointWitness(tmp_path)  # a directory: reading fails
    result = verify(audit_log, signer, unreadable)
    assert (result.ok, result.first_bad_sequence, result.reason) == (
        False, None, WITNESS_UNAVAILABLE,
    )  # fmt: skip



def _break(path: Path) -> None:
    """The witness file replaced by a directory: appends and reads both fail."""
    path.rename(path.with_suffix(".kept"))
    path.mkdir()


def _restore(path: Path) -> None:
    path.rmdir()
    path.with_suffix(".kept").rename(path)


def test_copies_missed_before_a_restart_are_caught_up(
    audit_log: SqlAuditLog, signer: Pkcs11Signer, tmp_path: Path
) -> None:
    """Checkpoints whose copy failed (pending in memory) survive a restart: the next
    process copies every checkpoint newer than the witness's newest, once it can."""
    path = tmp_path / "checkpoints.jsonl"
    witness = FileCheckpointWitness(path)
    grow(audit_log, Checkpointer(audit_log, signer, [witness]), rounds=1, tail=0)
    _break(path)
    first = Checkpointer(audit_log, signer, [witness])
    grow(audit_log, first, rounds=2, tail=0)  # both copies fail and stay pending
    del first  # the process stops: its pending copies are gone
    second = Checkpointer(audit_log, signer, [witness])  # restarted, witness still down
    grow(audit_log, second, rounds=1, tail=0)
    _restore(path)
    assert [c.sequence for c in witness.claims()] == [EVERY]
    audit_log.append([entry(n) for n in range(3)])
    assert second.checkpoint() is not None
    stored = [c.sequence for c in audit_log.checkpoints()]
    assert [c.sequence for c in witness.claims()] == stored  # every one, once, in order
    assert stored == [EVERY, 2 * EVERY, 3 * EVERY, 4 * EVERY, 4 * EVERY + 3]
    assert verify(audit_log, signer, witness).ok


def test_catch_up_copies_nothing_over_a_forged_chain(
    audit_log: SqlAuditLog, audit_engine: Engine, signer: Pkcs11Signer, tmp_path: Path
) -> None:
    """A database rewritten after the witness's newest copy is not copied to it."""
    path = tmp_path / "checkpoints.jsonl"
    witness = FileCheckpointWitness(path)
    grow(audit_log, Checkpointer(audit_log, signer, [witness]), rounds=1, tail=0)
    _break(path)
    grow(audit_log, Checkpointer(audit_log, signer, [witness]), rounds=2, tail=0)
    _restore(path)
    rewrite_history(audit_engine, EVERY + 2, keep_through=3 * EVERY)
    restarted = Checkpointer(audit_log, signer, [witness])
    audit_log.append([entry(n) for n in range(3)])
    with pytest.raises(AuditChainError):
        restarted.checkpoint()
    assert [c.sequence for c in witness.claims()] == [EVERY]


def test_restarted_trail_copies_what_the_stopped_one_missed(
    audit_log: SqlAuditLog, signer: Pkcs11Signer, tmp_path: Path
) -> None:
    """The same through ``AuditTrail``: stop it while the witness is down, restore the
    witness, start a new trail; its next checkpoint brings the witness up to date."""
    path = tmp_path / "checkpoints.jsonl"
    witness = FileCheckpointWitness(path)

    def trail() -> AuditTrail:
        return AuditTrail(audit_log, signer, checkpoint_every=10_000, witnesses=[witness])

    with trail() as first:
        first.record(entry(1))
        assert first.checkpoint_now() is not None
        _break(path)
        for n in range(2):
            first.record(entry(2 + n))
            assert first.checkpoint_now() is not None
    _restore(path)
    assert len(witness.claims()) == 1
    with trail() as second:
        second.record(entry(9))
        assert second.checkpoint_now() is not None
    stored = [c.sequence for c in audit_log.checkpoints()]
    assert [c.sequence for c in witness.claims()] == stored
    assert len(stored) == 4
