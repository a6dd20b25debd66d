# The fresh-database fixtures live in test_audit_log and are imported here, which ruff
# reads as redefinitions when tests name them as parameters.
# ruff: noqa: F811
"""The unsigned tail: events after the last checkpoint, rewritten by a database writer.

Before, the service walked from its last checkpoint to the head and signed whatever it
found there: a writer who edited an event after the last checkpoint, re-hashed the
later ones and rewrote the head got the forged tail signed, and so made it permanent.
The trail now remembers the last event it committed itself and refuses to sign a head
from which that event is gone or changed. Real SoftHSM2 audit key, SQLite and
PostgreSQL.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore.signing import Pkcs11Signer
from service.audit import AuditChainError
from service.audit.trail import AuditTrail
from storage.audit_log import SqlAuditLog, audit_events, audit_head
from tests.integration.storage.audit_attacks import incidents, rewrite_history
from tests.integration.storage.test_audit_log import (  # noqa: F401 - fixtures
    audit_engine,
    audit_log,
    audit_url,
    entry,
    signer,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _trail(log: SqlAuditLog, signer: Pkcs11Signer) -> AuditTrail:
    # Checkpoints only when the test asks (no timing in the test).
    return AuditTrail(log, signer, checkpoint_every=10_000, checkpoint_seconds=3600)


def test_rewritten_tail_is_not_signed(
    audit_log: SqlAuditLog, audit_engine: Engine, signer: Pkcs11Signer
) -> None:
    with _trail(audit_log, signer) as trail:
        for n in range(10):
            trail.record(entry(n))
        first = trail.checkpoint_now()
        assert first is not None
        assert first.sequence == 10
        for n in range(10, 16):
            trail.record(entry(n))
        # Edit event 12 (after the checkpoint), re-hash 12..16 and the head.
        rewrite_history(audit_engine, k=12, keep_through=10)
        with pytest.raises(AuditChainError):
            trail.checkpoint_now()
        last = audit_log.last_checkpoint()
        assert last is not None
        assert last.sequence == 10  # the forged tail was not signed
        assert incidents(audit_log) == 1
        result = trail.verify()
        assert not result.ok
        assert result.first_bad_sequence == 16, result.reason
        assert "refused" in result.reason


def test_truncated_tail_is_not_signed(
    audit_log: SqlAuditLog, audit_engine: Engine, signer: Pkcs11Signer
) -> None:
    with _trail(audit_log, signer) as trail:
        for n in range(10):
            trail.record(entry(n))
        assert trail.checkpoint_now() is not None
        for n in range(10, 14):
            trail.record(entry(n))
        # Delete the last three events and point the head at event 11.
        with audit_engine.begin() as c:
            c.execute(audit_events.delete().where(audit_events.c.sequence > 11))
            kept = c.execute(
                sa.select(audit_events.c.hash).where(audit_events.c.sequence == 11)
            ).scalar_one()
            c.execute(audit_head.update().values(sequence=11, hash=kept))
        with pytest.raises(AuditChainError):
            trail.checkpoint_now()
        last = audit_log.last_checkpoint()
        assert last is not None
        assert last.sequence == 10


def test_untouched_tail_is_signed(audit_log: SqlAuditLog, signer: Pkcs11Signer) -> None:
    with _trail(audit_log, signer) as trail:
        for n in range(5):
            trail.record(entry(n))
        assert trail.checkpoint_now() is not None
        audit_log.append([entry(100)])  # another replica's event after ours: fine
        made = trail.checkpoint_now()
        assert made is not None
        assert made.sequence == 6
        assert trail.verify().ok
