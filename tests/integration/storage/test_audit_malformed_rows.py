"""Malformed ``audit_checkpoints`` and ``audit_head`` rows, on SQLite and PostgreSQL.

A database writer without the token stores a value the service never stores: each is
named by verification (field names, never values), the checkpointer refuses to sign,
and the writer fails closed on a malformed head. ``test_audit_log`` covers events.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore.signing import Pkcs11Signer
from service.audit import AuditChainError, AuditUnavailableError
from service.audit.checkpoints import Checkpointer, signature_checker
from service.audit.trail import AuditTrail
from storage.audit_log import SqlAuditLog
from storage.audit_verify import verify_chain
from storage.errors import BackendUnavailableError
from tests.integration.storage import test_audit_log as base
from tests.integration.storage.test_audit_log import entry, verify

pytestmark = pytest.mark.integration
# The tampering fixtures of test_audit_log: a fresh database, a chain of 60 events.
audit_url, audit_engine, audit_log = base.audit_url, base.audit_engine, base.audit_log
signer, chain = base.signer, base.chain

# kind: (field, (SQLite statements, first bad sequence), (PostgreSQL statements, ...)).
# The chain has checkpoints at 20 and 40 and 60 events. On PostgreSQL a writer changes a
# column's type, so every row is malformed and the first checkpoint (20) is named. A
# checkpoint whose sequence is unreadable is named just after the previous readable one.
_CHECKPOINTS: dict[str, tuple[str, tuple[list[str], int], tuple[list[str], int]]] = {
    "sequence not an integer": ("sequence",
        (["UPDATE audit_checkpoints SET sequence = 39.5 WHERE sequence = 40"], 21),
        (["ALTER TABLE audit_checkpoints ALTER COLUMN sequence TYPE numeric"], 1)),
    "hash short": ("hash",
        (["UPDATE audit_checkpoints SET hash = X'00' WHERE sequence = 40"], 40),
        (["UPDATE audit_checkpoints SET hash = decode('00', 'hex') WHERE sequence = 40"], 40)),
    "signature text": ("signature",
        (["UPDATE audit_checkpoints SET signature = 'forged' WHERE sequence = 40"], 40),
        (["ALTER TABLE audit_checkpoints ALTER COLUMN signature TYPE text"
          " USING encode(signature, 'base64')"], 20)),
    "signature empty": ("signature",
        (["UPDATE audit_checkpoints SET signature = X'' WHERE sequence = 40"], 40),
        (["UPDATE audit_checkpoints SET signature = decode('', 'hex') WHERE sequence = 40"],
         40)),
    "created_at unparsable": ("created_at",
        (["UPDATE audit_checkpoints SET created_at = 'yesterday' WHERE sequence = 40"], 40),
        (["ALTER TABLE audit_checkpoints ALTER COLUMN created_at TYPE text"
          " USING created_at::text",
          "UPDATE audit_checkpoints SET created_at = 'yesterday' WHERE sequence = 40"], 20)),
    "key_label bytes": ("key_label",
        (["UPDATE audit_checkpoints SET key_label = X'01' WHERE sequence = 40"], 40),
        (["ALTER TABLE audit_checkpoints ALTER COLUMN key_label TYPE bytea"
          " USING convert_to(key_label, 'UTF8')"], 20)),
    "version unknown": ("version",
        (["UPDATE audit_checkpoints SET version = 7 WHERE sequence = 40"], 40),
        (["UPDATE audit_checkpoints SET version = 7 WHERE sequence = 40"], 40)),
    "prev_digest short": ("prev_digest",
        (["UPDATE audit_checkpoints SET prev_digest = X'00' WHERE sequence = 40"], 40),
        (["UPDATE audit_checkpoints SET prev_digest = decode('00', 'hex')"
          " WHERE sequence = 40"], 40)),
}  # fmt: skip

# kind: (field, SQLite statements, PostgreSQL statements); the head is at sequence 60,
# named when its sequence is readable (else no sequence: None).
_HEADS: dict[str, tuple[str, list[str], list[str], int | None]] = {
    "sequence text": ("sequence",
        ["UPDATE audit_head SET sequence = 'many'"],
        ["ALTER TABLE audit_head ALTER COLUMN sequence TYPE text USING sequence::text",
         "UPDATE audit_head SET sequence = 'many'"], None),
    "sequence not an integer": ("sequence",
        ["UPDATE audit_head SET sequence = 60.5"],
        ["ALTER TABLE audit_head ALTER COLUMN sequence TYPE numeric"], None),
    "hash short": ("hash",
        ["UPDATE audit_head SET hash = X'00'"],
        ["UPDATE audit_head SET hash = decode('00', 'hex')"], 60),
    # bytes(32) of this integer would be 32 zero bytes: a plausible hash.
    "hash integer": ("hash",
        ["UPDATE audit_head SET hash = 32"],
        ["ALTER TABLE audit_head ALTER COLUMN hash TYPE integer USING 32"], 60),
}  # fmt: skip


def _run(engine: Engine, statements: list[str]) -> None:
    with engine.begin() as c:
        for statement in statements:
            c.exec_driver_sql(statement)


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as c:
        return int(c.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


@pytest.mark.parametrize("kind", sorted(_CHECKPOINTS))
def test_malformed_checkpoint_is_named_and_not_signed_over(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer, kind: str
) -> None:
    """A checkpoint row the service never stores is 'checkpoint altered', not a crash."""
    field, on_sqlite, on_postgres = _CHECKPOINTS[kind]
    statements, expected = on_sqlite if audit_engine.dialect.name == "sqlite" else on_postgres
    _run(audit_engine, statements)
    _checkpoint_named(audit_engine, chain, signer, field, expected)


@pytest.mark.backend("postgresql")
@pytest.mark.parametrize("value", base.PG_OUT_OF_RANGE)
def test_a_checkpoint_time_python_cannot_hold_is_named_not_an_outage(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer, value: str
) -> None:
    """psycopg failed the whole fetch on such a ``created_at`` (``storage.audit_sql``)."""
    _run(audit_engine, [f"UPDATE audit_checkpoints SET created_at = '{value}' WHERE sequence = 40"])
    _checkpoint_named(audit_engine, chain, signer, "created_at", 40)


def _checkpoint_named(
    engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer, field: str, expected: int
) -> None:
    """Verify names ``expected`` as a checkpoint altered in ``field``, and nothing is
    signed over it; no stored value in the reason."""
    reason = f"checkpoint altered: {field} malformed"
    assert verify(chain, signer) == (expected, reason)
    chain.append([entry(61)])  # something new to sign
    checkpointer = Checkpointer(chain, signer)
    with pytest.raises(AuditChainError, match=reason):
        checkpointer.checkpoint()
    assert _count(engine, "audit_checkpoints") == 2  # nothing signed over it
    result = checkpointer.verify()
    assert not result.ok
    assert result.reason == reason
    for value in ("39.5", "forged", "yesterday", "infinity", "294276"):
        assert value not in result.reason


@pytest.mark.parametrize("kind", sorted(_HEADS))
def test_malformed_head_is_named_and_fails_closed(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer, kind: str
) -> None:
    """A head row the writer never stores: verification names it, nothing is signed,
    and no event is chained onto it (the writer fails closed, as on an outage)."""
    field, on_sqlite, on_postgres, expected = _HEADS[kind]
    _run(audit_engine, on_sqlite if audit_engine.dialect.name == "sqlite" else on_postgres)
    reason = f"head row altered: {field} malformed"
    result = verify_chain(chain, signature_checker(signer.public_key_der()))
    assert (result.ok, result.first_bad_sequence, result.reason) == (False, expected, reason)
    with pytest.raises(AuditChainError, match=reason):
        Checkpointer(chain, signer).checkpoint()
    assert _count(audit_engine, "audit_checkpoints") == 2
    with pytest.raises(BackendUnavailableError, match="audit head row malformed"):
        chain.append([entry(61)])
    with AuditTrail(chain, signer, checkpoint_every=1) as trail:
        for n in (62, 63):  # the writer thread survives: the second is refused the same way
            with pytest.raises(AuditUnavailableError, match="audit head row malformed") as info:
                trail.record(entry(n))
            assert "many" not in str(info.value)
    assert _count(audit_engine, "audit_events") == 60
