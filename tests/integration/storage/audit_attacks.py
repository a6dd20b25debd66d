"""Attacks on the audit trail shared by its tests: a database writer's rewrite, and the
incident count that shows the service noticed."""

from __future__ import annotations

from datetime import UTC

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage.audit_log import SqlAuditLog, audit_checkpoints, audit_events, audit_head
from storage.audit_model import AuditEntry, chain_hash


def rewrite_history(engine: Engine, k: int, keep_through: int) -> None:
    """The attack: edit event k, re-hash all later events and the head, drop checkpoints."""
    with engine.begin() as c:
        rows = [dict(r._mapping) for r in c.execute(
            sa.select(audit_events).where(audit_events.c.sequence >= k)
            .order_by(audit_events.c.sequence)
        )]  # fmt: skip
        prev = bytes(rows[0]["prev_hash"])
        for n, row in enumerate(rows):
            if n == 0:
                row["principal"] = "someone-else"
            e = AuditEntry(
                time=row["time"].replace(tzinfo=UTC), principal=row["principal"],
                application=row["application"], role=row["role"], action=row["action"],
                resource=row["resource"], outcome=row["outcome"],
                patient_index=row["patient_index"], status=row["status"],
                reason=row["reason"], source=row["source"],
            )  # fmt: skip
            digest = chain_hash(prev, row["sequence"], e)
            c.execute(audit_events.update().where(audit_events.c.sequence == row["sequence"])
                      .values(principal=row["principal"], prev_hash=prev, hash=digest))
            prev = digest
        c.execute(audit_head.update().values(hash=prev))
        c.execute(audit_checkpoints.delete().where(audit_checkpoints.c.sequence > keep_through))


def incidents(log: SqlAuditLog) -> int:
    return sum(1 for e in log.events(0, 10_000) if e.entry.action == "incident")
