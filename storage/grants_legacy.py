"""Adoption of grant rows written before migration 0009 (no MAC, clear free text)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from storage.grant_rows import access_grants, read_grant_row
from storage.grant_seal import GrantSealer
from storage.pg_loads import lenient_loads


def adopt_legacy(sealer: GrantSealer, connection: Connection) -> int:
    """Seal and MAC the rows written before migration 0009; the number adopted.

    Called by that migration, in its transaction, when the service applies it (it
    holds the token): rows present then are trusted as they were before the upgrade,
    and from then on a row without a valid MAC grants nothing. A database migrated
    without the token (a bare ``alembic upgrade``) keeps such rows unadopted: they give
    no access, and their clear text stays readable in the review queue's legacy path.
    A row holding a value of a type medvault never stores (``storage.row_values``) is
    not adopted either.
    """
    with lenient_loads(connection):  # a time psycopg cannot load: a malformed row
        rows = connection.execute(sa.select(access_grants).where(access_grants.c.mac.is_(None)))
        legacy = rows.all()
    adopted = 0
    for row in legacy:
        read = read_grant_row(row)
        if read.malformed:  # a value of a type no service wrote: never MACed, grants nothing
            continue
        grant = read.grant
        values: dict[str, Any] = {"review_comment": None}
        sealed_reason = None
        if read.reason:
            sealed_reason = sealer.seal_reason(grant.id, read.reason)
            values.update(reason="", sealed_reason=sealed_reason)
        if read.review_comment and grant.reviewed_by and grant.reviewed_at:
            values["sealed_comment"] = sealer.seal_review(
                grant.id, grant.reviewed_by, grant.reviewed_at, read.review_comment
            )
        values["mac"] = sealer.mac(grant, sealed_reason)
        connection.execute(
            access_grants.update().where(access_grants.c.id == grant.id).values(**values)
        )
        adopted += 1
    return adopted
