"""A put's commit and a read's SQL build no statement per call (issue 12), on both backends.

A statement built per call costs SQLAlchemy its construction, the coercion of each value
and a new cache key, every time; on these paths the statements are built once and
executed with parameters. Here SQLAlchemy's statement builders are made to record any
call while a keyed put (under a KEK version seen for the first time) and a read run.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import dml, selectable

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool
from storage.audit_log import Pending, SqlAuditLog
from storage.audit_model import AuditEntry
from storage.grant_seal import GrantSealer
from storage.grants import SqlGrantStore
from storage.index import IndexEntry
from storage.interfaces import StoredRecord
from storage.put_requests import SqlPutRequests
from storage.sql_metadata import SqlMetadataStore, make_engine, upgrade
from tests.fixtures.databases import new_database

pytestmark = pytest.mark.integration

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
PATIENT = bytes(range(32))
ENTRIES = (IndexEntry("message_type", "ORU^R01"), IndexEntry("control_id", "MSG-1"))
# Every way a statement is made or changed on these paths before this change.
BUILDERS = [
    (sa, "select"),
    (selectable.Select, "where"),
    (selectable.Select, "with_for_update"),
    (sa.TableClause, "insert"),
    (sa.TableClause, "update"),
    (sa.TableClause, "delete"),
    (dml.ValuesBase, "values"),
    (dml.DMLWhereBase, "where"),
    (sa.dialects.postgresql, "insert"),
    (sa.dialects.sqlite, "insert"),
]


@pytest.fixture
def engine(
    database_url: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """A fresh database of this test's own (its rows have index entries)."""
    for url in new_database(request, database_url, tmp_path_factory):
        made = make_engine(url)
        upgrade(made)
        yield made
        made.dispose()


def make_row(kek_version: int) -> StoredRecord:
    """A synthetic row; every secret-looking field is random bytes."""
    return StoredRecord(
        id=secrets.token_hex(16), version=1, kind="HL7V2", content_type="x-application/hl7-v2+er7",
        patient_index=PATIENT, sealed_meta=secrets.token_bytes(48),
        object_key=f"obj/{secrets.token_hex(16)}", kek_version=kek_version,
        wrapped_dek=secrets.token_bytes(40), size=1234, stored_size=1300,
        ciphertext_sha256=secrets.token_bytes(32), segment_size=1 << 20, created_at=NOW,
        created_by="app:his", supersedes_version=None,
    )  # fmt: skip


def watch(built: list[str], name: str, builder: Callable[..., object]) -> Callable[..., object]:
    """``builder`` noting each call in ``built``."""

    def watched(*args: object, **kwargs: object) -> object:
        built.append(name)
        return builder(*args, **kwargs)

    return watched


def event(action: str) -> AuditEntry:
    return AuditEntry(
        time=NOW, principal="dr-a", action=action, resource="record/synthetic",
        outcome="allowed", patient_index=PATIENT,
    )  # fmt: skip


def test_put_commit_and_read_build_no_statement(
    engine: Engine, keystore_pool: Pkcs11SessionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta, log = SqlMetadataStore(engine), SqlAuditLog(engine)
    grants = SqlGrantStore(engine, GrantSealer(Pkcs11BlindIndexer(keystore_pool)))
    requests = SqlPutRequests(engine, clock=lambda: NOW)
    grants.grant(PATIENT, "dr-a", "clerk-b", None, NOW)

    def put(kek_version: int) -> str:
        row = make_row(kek_version=kek_version)
        request_id = secrets.token_hex(8)
        assert requests.find("dr-a", request_id) is None
        insert = meta.insert_change(row, ENTRIES)
        remember = requests.remember_change("dr-a", request_id, row.id, row.version)

        def change(connection: Connection) -> None:
            insert(connection)
            remember(connection)

        [done] = log.append_pending([Pending(event("PutRecord"), change)])
        assert done.error is None
        return row.id

    def read(record_id: str) -> None:
        got = meta.get(record_id)
        assert meta.get(record_id, 1) == got
        assert grants.has_access("dr-a", got.patient_index, NOW + timedelta(minutes=1))
        log.append([event("GetRecord")])

    read(put(kek_version=1))  # each statement compiled once, outside the watch
    built: list[str] = []
    for owner, name in BUILDERS:
        monkeypatch.setattr(owner, name, watch(built, name, getattr(owner, name)))
    read(put(kek_version=1))
    read(put(kek_version=2))  # a version no rotation registered: kek_versions insert
    assert built == []
