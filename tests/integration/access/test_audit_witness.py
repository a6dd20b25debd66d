"""The full audit rewrite against a running server with an Object Lock witness bucket.

A database writer edits one event, re-hashes every later event, rewrites the head row
and deletes the checkpoints after the first one. ``VerifyChain`` and ``medvault audit
verify`` must name the sequence after the last good checkpoint, and the server must
refuse to sign a checkpoint over the forged chain (an ``audit-chain`` incident).

PYTEST_DONT_REWRITE: failures name sequences and reasons only.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from storage.audit_log import audit_checkpoints, audit_events
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
    wait_for,
)
from tests.integration.storage.audit_attacks import rewrite_history

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
EVERY = 10


def last_checkpoint(engine: sa.Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.select(sa.func.max(audit_checkpoints.c.sequence))).scalar() or 0)


def chain_incidents(engine: sa.Engine) -> int:
    with engine.connect() as c:
        query = sa.select(sa.func.count()).where(
            audit_events.c.resource == "incident/audit-chain"
        )
        return int(c.execute(query).scalar_one())


def activity(clerk: Client, doctor: Client, rounds: int) -> None:
    """About five audit events per round (write, grant, reads allowed and denied)."""
    for _ in range(rounds):
        patient = new_patient()
        record = put_record(clerk, patient)
        grant(clerk, patient, "physician-witness")
        fetch(doctor, record.id)
        fetch(clerk, record.id)


def settle(engine: sa.Engine) -> int:
    """The last checkpoint once the writer has stopped signing (it signs after a batch)."""
    seen = -1
    for _ in range(20):
        time.sleep(0.3)
        now = last_checkpoint(engine)
        if now == seen:
            return now
        seen = now
    return seen


@pytest.fixture(scope="module")
def server(
    service_factory: Any, fresh_database: str, issue: Any
) -> Iterator[tuple[RunningService, sa.Engine, Any]]:
    service: RunningService = service_factory(
        fresh_database,
        audit={
            "checkpoint_every": EVERY, "checkpoint_seconds": 3600,
            "witness_bucket": f"wit-{secrets.token_hex(6)}", "witness_lock_days": 1,
        },
    )  # fmt: skip
    engine = engine_for(fresh_database)
    yield service, engine, issue
    engine.dispose()
    service.stop()


def test_full_rewrite_is_named_and_not_signed(
    server: tuple[RunningService, sa.Engine, Any],
) -> None:
    service, engine, issue = server
    officer_cert = issue("officer-witness", "security_officer")
    officer = client(service, officer_cert)
    clerk = client(service, issue("clerk-witness", "records_clerk"))
    doctor = client(service, issue("physician-witness", "physician"))
    activity(clerk, doctor, rounds=8)
    # Waited for, not timed: a slow host signs a checkpoint later after its batch.
    wait_for(lambda: last_checkpoint(engine) >= 3 * EVERY, 60, "checkpoints written")
    settle(engine)
    result = verify(officer)
    assert result.ok, f"{result.first_bad_sequence} {result.reason}"
    assert "witnessed" in result.reason, result.reason

    rewrite_history(engine, k=EVERY + 3, keep_through=EVERY)
    result = verify(officer)
    assert (result.ok, result.first_bad_sequence) == (False, EVERY + 1), result.reason
    assert "witnessed checkpoint does not match" in result.reason, result.reason
    code, out = cli_verify(service, officer_cert)
    assert code == 1, f"audit verify exited {code}"
    assert f"sequence {EVERY + 1}" in out, "audit verify does not name the sequence"

    activity(clerk, doctor, rounds=4)  # enough events for the next checkpoint
    # The writer's refused attempt raises the incident: waited for, then the writer is
    # let settle before what it must not have done is checked.
    wait_for(lambda: chain_incidents(engine) >= 1, 60, "the audit-chain incident")
    settle(engine)
    assert last_checkpoint(engine) == EVERY, "a checkpoint was signed over the forged chain"
    assert chain_incidents(engine) == 1, "no audit-chain incident"
    for c in (officer, clerk, doctor):
        c.close()


def cli_verify(service: RunningService, cert: tuple[Any, Any]) -> tuple[int, str]:
    env = {**service.cli_env(), "MEDVAULT_CERT": str(cert[0]), "MEDVAULT_KEY": str(cert[1])}
    done = subprocess.run(
        [sys.executable, "-m", "service", "audit", "verify"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return done.returncode, done.stdout
