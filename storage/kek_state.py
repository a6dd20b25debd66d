"""The state of each master-key (KEK) version as a records insert and the KEK lifecycle
read it from ``kek_versions``: the state, key-share-locked, and a version's registration.

A records insert checks its KEK version here in its own transaction
(``storage.sql_metadata``), so no row can reference a retired version; a retirement
(``storage.kek``) locks the same row first.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from storage.sql_schema import kek_versions

# Built once and executed with parameters, as the put's insert (storage.sql_metadata):
# built per call they cost the put SQLAlchemy's construction, coercion of each value
# and a new cache key (issue 12's GIL profile of 4 KiB puts).
_KEK_STATE = sa.select(kek_versions.c.state).where(
    kek_versions.c.version == sa.bindparam("version")
)
# FOR KEY SHARE, not FOR SHARE: it conflicts with a retirement's FOR UPDATE (below) but
# not with a rotation's plain UPDATE of the state (active to previous, the new version to
# active). With FOR SHARE an audit batch holding puts on both versions share-locked them
# in its own order while the rotation updated them in another: PostgreSQL's deadlock
# detector killed the batch and its puts answered UNAVAILABLE (session 9's CI run).
_KEK_STATE_SHARED = _KEK_STATE.with_for_update(read=True, key_share=True)
_KEK_INSERT_PG = postgresql.insert(kek_versions).on_conflict_do_nothing()
_KEK_INSERT_LITE = sqlite.insert(kek_versions).on_conflict_do_nothing()


def kek_insert_ignoring_duplicates(connection: Connection, version: int, state: str) -> None:
    """Register KEK ``version`` unless it is known already (a no-op then, never an error)."""
    values = {"version": version, "state": state, "created_at": datetime.now(UTC)}
    pg = connection.dialect.name == "postgresql"
    connection.execute(_KEK_INSERT_PG if pg else _KEK_INSERT_LITE, values)


def kek_state(connection: Connection, version: int) -> str | None:
    """State of KEK ``version``, key-share-locked on PostgreSQL until the transaction ends.

    The lock orders this insert with a concurrent retirement (which locks the row FOR
    UPDATE first, then counts the rows using it): whichever comes second sees the other.
    SQLite needs no lock: the insert before this holds the database's write lock.
    """
    query = _KEK_STATE_SHARED if connection.dialect.name == "postgresql" else _KEK_STATE
    state: str | None = connection.scalar(query, {"version": version})
    return state
