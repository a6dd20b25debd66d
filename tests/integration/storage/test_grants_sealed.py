"""Grant rows under attack by a database writer without the token, on SQLite and PostgreSQL.

Forged and edited rows grant nothing and are reported; a review set in the database is
not a review; break-the-glass reasons and review comments are not in clear at rest;
rows from before migration 0009 are adopted when the service (with the token) migrates.
"""

from __future__ import annotations

import functools
import secrets
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool
from storage.errors import RecordConflictError
from storage.grant_seal import GrantSealer
from storage.grants import GRANT_ADOPTER, LEGACY_MARK, SqlGrantStore, access_grants
from storage.grants_legacy import adopt_legacy
from storage.sql_metadata import make_engine, upgrade
from storage.sqlite_text import StoredTime
from tests.fixtures.databases import new_database

pytestmark = pytest.mark.integration

T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
HOUR = timedelta(hours=1)
PATIENT = bytes(range(32))
OTHER = bytes(32)


@pytest.fixture
def sealer(keystore_pool: Pkcs11SessionPool) -> GrantSealer:
    return GrantSealer(Pkcs11BlindIndexer(keystore_pool))


@pytest.fixture
def fresh_url(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An empty database of this test only, on ``database_url``'s backend."""
    yield from new_database(request, database_url, tmp_path_factory)


@pytest.fixture
def engine(fresh_url: str) -> Iterator[Engine]:
    engine = make_engine(fresh_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def forged() -> list[str]:
    return []


@pytest.fixture
def store(engine: Engine, sealer: GrantSealer, forged: list[str]) -> SqlGrantStore:
    return SqlGrantStore(engine, sealer, forged.append)


def _edit(engine: Engine, grant_id: str, **values: object) -> None:
    with engine.begin() as connection:
        connection.execute(
            access_grants.update().where(access_grants.c.id == grant_id).values(**values)
        )


def _row(engine: Engine, grant_id: str) -> dict[str, object]:
    with engine.connect() as connection:
        query = sa.select(access_grants).where(access_grants.c.id == grant_id)
        return dict(connection.execute(query).one()._mapping)


# --- forged and edited rows --------------------------------------------------------------


def test_inserted_row_grants_nothing_and_is_reported(
    store: SqlGrantStore, engine: Engine, forged: list[str]
) -> None:
    real = store.grant(PATIENT, "dr.house", "clerk.cuddy", None, T0)
    row = _row(engine, real.id)
    # The writer copies an authentic row (MAC and all) and names themselves.
    fake_id = secrets.token_hex(16)
    with engine.begin() as connection:
        connection.execute(
            access_grants.insert().values(**{**row, "id": fake_id, "principal": "mallory"})
        )
        connection.execute(
            access_grants.insert().values(
                **{**row, "id": secrets.token_hex(16), "principal": "eve", "mac": None}
            )
        )
    assert store.has_access("mallory", PATIENT, T0) is None
    assert store.has_access("eve", PATIENT, T0) is None
    assert fake_id in forged
    assert store.has_access("dr.house", PATIENT, T0) is not None
    assert [g.id for g in store.list(PATIENT, None, False, T0)] == [real.id]


@pytest.mark.parametrize(
    "change",
    [
        {"principal": "mallory"},
        {"patient_index": OTHER},
        {"expires_at": T0 + 1000 * HOUR},
        {"break_glass": True, "reason": ""},
        {"granted_by": "someone.else"},
        {"created_at": T0 - HOUR},
    ],
    ids=["principal", "patient", "expiry", "break-glass", "granted-by", "created-at"],
)
def test_edited_row_grants_nothing(
    store: SqlGrantStore, engine: Engine, forged: list[str], change: dict[str, object]
) -> None:
    grant = store.grant(PATIENT, "dr.house", "clerk.cuddy", T0 + HOUR, T0)
    _edit(engine, grant.id, **change)
    principal = str(change.get("principal", "dr.house"))
    patient = bytes(change.get("patient_index", PATIENT))  # type: ignore[call-overload]
    assert store.has_access(principal, patient, T0 + timedelta(minutes=1)) is None
    assert forged == [grant.id]


def test_swapped_sealed_reason_is_detected(store: SqlGrantStore, engine: Engine) -> None:
    a = store.break_glass(PATIENT, "dr.a", "synthetic reason A", HOUR, T0)
    b = store.break_glass(PATIENT, "dr.b", "synthetic reason B", HOUR, T0)
    _edit(engine, a.id, sealed_reason=_row(engine, b.id)["sealed_reason"])
    assert [g.id for g in store.break_glass_queue(include_reviewed=False)] == [b.id]


def test_review_set_in_the_database_is_not_a_review(
    store: SqlGrantStore, engine: Engine, forged: list[str]
) -> None:
    grant = store.break_glass(PATIENT, "dr.house", "synthetic reason", HOUR, T0)
    _edit(engine, grant.id, reviewed_at=T0 + HOUR, reviewed_by="officer.sec")
    queue = store.break_glass_queue(include_reviewed=False)
    assert [g.id for g in queue] == [grant.id]
    assert queue[0].reviewed_at is None
    assert forged == [grant.id]


def test_self_review_is_refused_by_the_store(store: SqlGrantStore) -> None:
    grant = store.break_glass(PATIENT, "dr.house", "synthetic reason", HOUR, T0)
    with pytest.raises(RecordConflictError, match="their own"):
        store.review(grant.id, "dr.house", "looks fine to me", T0 + HOUR)
    reviewed = store.review(grant.id, "officer.sec", "checked", T0 + HOUR)
    assert reviewed.review_comment == "checked"
    assert reviewed.reason == "synthetic reason"


# --- no free text in clear at rest -------------------------------------------------------


def _at_rest(url: str, engine: Engine) -> bytes:
    """Every byte the database keeps: the SQLite file and its WAL, or a pg_dump."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine.dispose()
        path = str(parsed.database)
        data = b""
        for suffix in ("", "-wal"):
            try:
                with open(path + suffix, "rb") as f:
                    data += f.read()
            except FileNotFoundError:
                pass
        with sqlite3.connect(path) as connection:  # and after a checkpoint, the main file
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with open(path, "rb") as f:
            return data + f.read()
    dump = subprocess.run(
        ["pg_dump", "--data-only", "-h", str(parsed.host), "-p", str(parsed.port or 5432),
         "-U", str(parsed.username), str(parsed.database)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return dump.stdout


def test_reason_and_comment_are_not_in_clear_at_rest(
    store: SqlGrantStore, engine: Engine, fresh_url: str
) -> None:
    marker = secrets.token_hex(8)
    reason, comment = f"SYNTHETIC-REASON-{marker}", f"SYNTHETIC-COMMENT-{marker}"
    grant = store.break_glass(PATIENT, "dr.house", reason, HOUR, T0)
    store.review(grant.id, "officer.sec", comment, T0 + HOUR)
    (item,) = store.break_glass_queue(include_reviewed=True)
    assert (item.reason, item.review_comment) == (reason, comment)  # the officer reads them
    data = _at_rest(fresh_url, engine)
    assert grant.id.encode() in data, "the dump holds no grant at all"
    assert marker.encode() not in data, "free text found in clear at rest"


# --- rows from before migration 0009 -----------------------------------------------------


def _legacy_database(url: str) -> Engine:
    engine = make_engine(url)
    upgrade(engine, "0006")
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO access_grants (id, patient_index, principal, granted_by, created_at,"
                " expires_at, break_glass, reason, reviewed_at, reviewed_by, review_comment)"
                " VALUES (:id, :p, 'dr.old', 'dr.old', :t, :e, :bg, 'synthetic old reason',"
                " :t, 'officer.old', 'synthetic old comment')"
            ).bindparams(  # times as the table's type writes them (SQLite: its exact text)
                sa.bindparam("t", type_=StoredTime()), sa.bindparam("e", type_=StoredTime())
            ),
            {"id": "0" * 32, "p": PATIENT, "t": T0, "e": T0 + 4 * HOUR, "bg": True},
        )
    return engine


def test_legacy_rows_are_adopted_when_the_service_migrates(
    fresh_url: str, sealer: GrantSealer, forged: list[str]
) -> None:
    engine = _legacy_database(fresh_url)
    upgrade(engine, hooks={GRANT_ADOPTER: functools.partial(adopt_legacy, sealer)})
    store = SqlGrantStore(engine, sealer, forged.append)
    assert store.has_access("dr.old", PATIENT, T0 + HOUR) is not None
    (item,) = store.break_glass_queue(include_reviewed=True)
    assert (item.reason, item.review_comment) == ("synthetic old reason", "synthetic old comment")
    row = _row(engine, "0" * 32)
    assert (row["reason"], row["review_comment"]) == ("", None)
    assert forged == []
    engine.dispose()


def test_legacy_rows_migrated_without_the_token_grant_nothing(
    fresh_url: str, sealer: GrantSealer, forged: list[str]
) -> None:
    engine = _legacy_database(fresh_url)
    upgrade(engine)  # no adopter: a bare migration
    store = SqlGrantStore(engine, sealer, forged.append)
    assert store.has_access("dr.old", PATIENT, T0 + HOUR) is None
    (item,) = store.break_glass_queue(include_reviewed=True)
    assert item.reason == f"{LEGACY_MARK} synthetic old reason"
    engine.dispose()
