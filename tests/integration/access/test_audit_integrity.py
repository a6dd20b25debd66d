"""Tampering with the audit table directly in the database is caught by VerifyChain.

One server per backend on a database of this module. Each case tampers, checks that
``AuditService.VerifyChain`` (and ``medvault audit verify``) names the first bad
sequence, then undoes the tampering exactly and checks the chain verifies again; the
insertion, which cannot be undone, runs last.

PYTEST_DONT_REWRITE: failures name sequences and reasons only.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from service._gen.medvault.v1 import access_pb2 as apb
from storage.audit_log import audit_checkpoints, audit_events, audit_head
from storage.audit_model import AuditEntry, chain_hash
from tests.fixtures.service import ROOT, RunningService
from tests.integration.access.helpers import (
    Client,
    client,
    engine_for,
    fetch,
    grant,
    new_patient,
    put_record,
    verify,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
CHECKPOINT_EVERY = 10


@dataclass
class World:
    service: RunningService
    engine: sa.Engine
    officer: Client
    officer_cert: Any
    clerk: Client


@pytest.fixture(scope="module")
def world(service_factory: Any, fresh_database: str, issue: Any) -> Iterator[World]:
    # Count-based checkpoints only, so the test knows when they happen.
    service: RunningService = service_factory(
        fresh_database, audit={"checkpoint_every": CHECKPOINT_EVERY, "checkpoint_seconds": 3600}
    )
    officer_cert = issue("officer-integrity", "security_officer")
    officer = client(service, officer_cert)
    clerk = client(service, issue("clerk-integrity", "records_clerk"))
    doctor = client(service, issue("physician-integrity", "physician"))
    for _ in range(8):  # allowed, denied and failed events
        patient = new_patient()
        record = put_record(clerk, patient)
        grant(clerk, patient, "physician-integrity")
        fetch(doctor, record.id)
        fetch(clerk, record.id)  # denied: the clerk reads no content
    doctor.close()
    engine = engine_for(fresh_database)
    yield World(service, engine, officer, officer_cert, clerk)
    officer.close()
    clerk.close()
    engine.dispose()
    service.stop()


def row(engine: sa.Engine, sequence: int) -> dict[str, Any]:
    with engine.connect() as c:
        found = c.execute(sa.select(audit_events).where(audit_events.c.sequence == sequence))
        return dict(found.one()._mapping)


def head(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.select(audit_head.c.sequence)).scalar_one())


def last_checkpoint(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.select(sa.func.max(audit_checkpoints.c.sequence))).scalar() or 0)


def set_row(engine: sa.Engine, sequence: int, values: dict[str, Any]) -> None:
    body = {k: v for k, v in values.items() if k != "sequence"}
    with engine.begin() as c:
        c.execute(audit_events.update().where(audit_events.c.sequence == sequence).values(**body))


def expect_bad(w: World, sequence: int, reason: str) -> None:
    result = verify(w.officer)
    assert not result.ok, "tampering not detected"
    assert result.first_bad_sequence == sequence, (
        f"first bad sequence {result.first_bad_sequence}, expected {sequence} ({result.reason})"
    )
    assert reason in result.reason, f"reason {result.reason!r}, expected {reason!r}"


def expect_ok(w: World) -> None:
    result = verify(w.officer)
    assert result.ok, f"chain not intact: {result.first_bad_sequence} {result.reason}"


def cli_verify(w: World) -> tuple[int, str]:
    cert, key = w.officer_cert
    env = {**w.service.cli_env(), "MEDVAULT_CERT": str(cert), "MEDVAULT_KEY": str(key)}
    done = subprocess.run(
        [sys.executable, "-m", "service", "audit", "verify"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout


def test_chain_starts_intact_with_checkpoints(world: World) -> None:
    expect_ok(world)
    assert last_checkpoint(world.engine) >= CHECKPOINT_EVERY, "no checkpoint written"
    code, _ = cli_verify(world)
    assert code == 0, f"audit verify exited {code} on an intact chain"


def test_edited_event(world: World) -> None:
    k = 5
    original = row(world.engine, k)
    set_row(world.engine, k, {"principal": "someone-else"})
    expect_bad(world, k, "altered")
    code, out = cli_verify(world)
    assert code == 1, f"audit verify exited {code} on a tampered chain"
    assert f"sequence {k}" in out, "audit verify does not name the sequence"
    set_row(world.engine, k, original)
    expect_ok(world)


def test_edited_outcome_and_rehashed(world: World) -> None:
    # Rewriting a denial as allowed and recomputing its hash breaks the next link.
    with world.engine.connect() as c:
        k = int(
            c.execute(
                sa.select(sa.func.min(audit_events.c.sequence)).where(
                    audit_events.c.outcome == "denied"
                )
            ).scalar_one()
        )
    original = row(world.engine, k)
    entry = AuditEntry(
        time=original["time"].replace(tzinfo=UTC),
        principal=original["principal"],
        application=original["application"],
        role=original["role"],
        action=original["action"],
        resource=original["resource"],
        outcome="allowed",
        patient_index=original["patient_index"],
        status="",
        reason=original["reason"],
        source=original["source"],
    )
    forged_hash = chain_hash(bytes(original["prev_hash"]), k, entry)
    set_row(world.engine, k, {"outcome": "allowed", "status": "", "hash": forged_hash})
    expect_bad(world, k, "link broken")
    set_row(world.engine, k, original)
    expect_ok(world)


def test_deleted_event(world: World) -> None:
    k = 9
    original = row(world.engine, k)
    with world.engine.begin() as c:
        c.execute(audit_events.delete().where(audit_events.c.sequence == k))
    expect_bad(world, k, "missing")
    with world.engine.begin() as c:
        c.execute(audit_events.insert().values(**original))
    expect_ok(world)


def test_reordered_events(world: World) -> None:
    k = 11
    first, second = row(world.engine, k), row(world.engine, k + 1)
    set_row(world.engine, k, second)
    set_row(world.engine, k + 1, first)
    expect_bad(world, k, "out of place")
    set_row(world.engine, k, first)
    set_row(world.engine, k + 1, second)
    expect_ok(world)


def _settled_tail(world: World) -> tuple[int, int]:
    """(last checkpoint, head) with events after the checkpoint and no writer activity."""
    for _ in range(30):
        checkpoint, last = last_checkpoint(world.engine), head(world.engine)
        if last > checkpoint:
            time.sleep(0.5)  # a checkpoint is signed just after its batch commits
            if (last_checkpoint(world.engine), head(world.engine)) == (checkpoint, last):
                return checkpoint, last
            continue
        world.clerk.access.ListGrants(apb.ListGrantsRequest(principal="nobody"), timeout=30)
    raise AssertionError("no events after the last checkpoint")


def test_truncated_after_last_checkpoint(world: World) -> None:
    checkpoint, last = _settled_tail(world)
    with world.engine.connect() as c:
        tail = [
            dict(r._mapping)
            for r in c.execute(
                sa.select(audit_events)
                .where(audit_events.c.sequence > checkpoint)
                .order_by(audit_events.c.sequence)
            )
        ]
    assert len(tail) == last - checkpoint, "tail rows do not match the head"
    with world.engine.begin() as c:
        c.execute(audit_events.delete().where(audit_events.c.sequence > checkpoint))
    expect_bad(world, checkpoint + 1, "")
    with world.engine.begin() as c:
        c.execute(audit_events.insert(), tail)
    expect_ok(world)


def test_truncated_before_last_checkpoint_with_head_rewritten(world: World) -> None:
    # The attacker also moves the head row back; the signed checkpoint still names
    # events that no longer exist.
    checkpoint, last = _settled_tail(world)
    cut = checkpoint - 3
    keep = row(world.engine, cut - 1)
    with world.engine.connect() as c:
        tail = [
            dict(r._mapping)
            for r in c.execute(
                sa.select(audit_events)
                .where(audit_events.c.sequence >= cut)
                .order_by(audit_events.c.sequence)
            )
        ]
    with world.engine.begin() as c:
        c.execute(audit_events.delete().where(audit_events.c.sequence >= cut))
        c.execute(audit_head.update().values(sequence=cut - 1, hash=keep["hash"]))
    # VerifyChain's own event takes sequence ``cut`` and chains correctly; the walk
    # then ends below the checkpoint, which names a sequence no event has.
    result = verify(world.officer)
    assert not result.ok, "truncation with a rewritten head not detected"
    assert cut <= result.first_bad_sequence <= checkpoint, (
        f"first bad sequence {result.first_bad_sequence} outside [{cut}, {checkpoint}]"
    )
    assert "truncated" in result.reason, f"reason {result.reason!r}"
    # Undo: drop what the server appended meanwhile, restore the tail and the head.
    with world.engine.begin() as c:
        c.execute(audit_events.delete().where(audit_events.c.sequence >= cut))
        c.execute(audit_checkpoints.delete().where(audit_checkpoints.c.sequence > last))
        c.execute(audit_events.insert(), tail)
        c.execute(audit_head.update().values(sequence=last, hash=tail[-1]["hash"]))
    expect_ok(world)


def test_inserted_event(world: World) -> None:
    """Runs last: the shifted rows cannot be put back under the server's new events."""
    k = 6
    prev = row(world.engine, k - 1)
    forged = AuditEntry(
        time=datetime.now(UTC),
        principal="physician-integrity",
        action="records.read",
        resource="record/forged",
        outcome="allowed",
        role="physician",
        source="ipv4:127.0.0.1:1",
    )
    digest = chain_hash(bytes(prev["hash"]), k, forged)
    seq = audit_events.c.sequence
    with world.engine.begin() as c:
        # Two steps: a unique key cannot be shifted by +1 in place, row by row.
        c.execute(audit_events.update().where(seq >= k).values(sequence=-seq - 1))
        c.execute(audit_events.update().where(seq < 0).values(sequence=-seq))
        c.execute(
            audit_events.insert().values(
                sequence=k,
                time=forged.time,
                principal=forged.principal,
                application="",
                role=forged.role,
                action=forged.action,
                resource=forged.resource,
                patient_index=None,
                outcome=forged.outcome,
                status="",
                reason="",
                source=forged.source,
                prev_hash=bytes(prev["hash"]),
                hash=digest,
            )
        )
        c.execute(audit_head.update().values(sequence=audit_head.c.sequence + 1))
    expect_bad(world, k, "inserted")
    code, out = cli_verify(world)
    assert code == 1, f"audit verify exited {code}"
    assert f"sequence {k}" in out, "audit verify does not name the sequence"
