"""``SqlGrantStore.mark_revoked_rows`` (run by every replica process at start) under a
database writer without the token, on SQLite and PostgreSQL, real token and SeaweedFS.

Cold review 11d: a writer who drops the primary key (cold review 9d: a PostgreSQL
writer may drop a constraint; a SQLite one may rebuild the table) and copies one revoked
row many times made start-up read every copy once per batch of the revoked ids, the
copies counted once per id listed (quadratic in the copies: a few hundred thousand
copies kept every process from starting for a long time).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from minio import Minio
from minio.commonconfig import COMPLIANCE
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool
from storage.backup.targets import S3Target
from storage.grant_revocations import RevokedGrants, S3RevocationMarkers
from storage.grant_seal import GrantSealer
from storage.grants import SqlGrantStore, access_grants
from storage.sql_metadata import make_engine
from tests.fixtures.databases import new_database

pytestmark = pytest.mark.integration

NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
PATIENT = bytes(range(32))
COPIES = 1200  # more than two of mark_revoked_rows' batches of ids


@pytest.fixture
def engine(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    for url in new_database(request, database_url, tmp_path_factory, migrated=True):
        engine = make_engine(url)
        yield engine
        engine.dispose()


@pytest.fixture
def markers(s3_server: Any) -> S3RevocationMarkers:
    client: Minio = s3_server.client()
    bucket = f"rev-{secrets.token_hex(6)}"
    target = S3Target(client, bucket, lock_days=1, lock_mode=COMPLIANCE)
    target.ensure_bucket()
    return S3RevocationMarkers(client, target, bucket, f"d-{secrets.token_hex(6)}")


def _drop_primary_key(engine: Engine) -> None:
    """What a database writer may do first (cold review 9d)."""
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            drop = "ALTER TABLE access_grants DROP CONSTRAINT pk_access_grants"
            connection.execute(sa.text(drop))
            return
        # SQLite cannot drop a primary key: the writer rebuilds the table without one.
        connection.execute(sa.text("CREATE TABLE copied AS SELECT * FROM access_grants"))
        connection.execute(sa.text("DROP TABLE access_grants"))
        connection.execute(sa.text("ALTER TABLE copied RENAME TO access_grants"))


def test_copies_of_a_revoked_row_are_read_once(
    engine: Engine, keystore_pool: Pkcs11SessionPool, markers: S3RevocationMarkers
) -> None:
    sealer = GrantSealer(Pkcs11BlindIndexer(keystore_pool))
    plain = SqlGrantStore(engine, sealer, lambda _: None)
    granted = plain.grant(PATIENT, "dr.copied", "clerk", None, NOW)
    plain.revoke(granted.id, "clerk", NOW + timedelta(minutes=1))  # before the markers
    _drop_primary_key(engine)
    with engine.begin() as connection:
        row = dict(connection.execute(sa.select(access_grants)).one()._mapping)
        connection.execute(access_grants.insert(), [row] * (COPIES - 1))

    revoked = RevokedGrants(markers, refresh_seconds=1, stale_seconds=60)
    revoked.refresh(full=True)
    store = SqlGrantStore(engine, sealer, lambda _: None, revocations=revoked)
    rows_read = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        rows_read.append(statement)

    sa.event.listen(engine, "after_cursor_execute", count)
    try:
        marked = store.mark_revoked_rows(NOW + timedelta(hours=1))
    finally:
        sa.event.remove(engine, "after_cursor_execute", count)
    assert marked == 1, "one revoked grant, counted once per copy and batch"
    selects = [s for s in rows_read if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2, f"{len(selects)} queries: the ids, then each batch of them"
    assert [m.grant_id for m in markers.list(None)] == [granted.id]
