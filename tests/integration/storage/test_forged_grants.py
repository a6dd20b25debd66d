"""A database writer (no token) against grant rows whose MAC covers the values read
while SQL decides on the bytes stored (review 9b): the store re-checks each authentic
row against the query in Python (``Grant.answers``), uses none that fails, and reports
it as forged.

An expiry respelled (SQLite keeps times as text) reads as the 1970 placeholder and
fails its MAC (``storage.sqlite_text``); a view whose column calls ``random()`` hands
back a genuine row the WHERE saw as another principal's or patient's (SQLite evaluates
the column twice; PostgreSQL once, so there the row comes back as the attacker's and
fails its MAC: the same tests run). Without the re-check each view test would be handed
the genuine row in about one try in four.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore import Pkcs11BlindIndexer, Pkcs11SessionPool
from storage.grant_seal import GrantSealer
from storage.grants import SqlGrantStore
from tests.integration.storage.test_audit_log import audit_engine, audit_url  # noqa: F401

pytestmark = pytest.mark.integration

T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
TRIES = 60  # SQLite's WHERE sees the attacker's value in about half of them


@pytest.fixture
def engine(audit_engine: Engine) -> Engine:  # noqa: F811  (the fixture imported above)
    """A database of this test only, schema at head (``test_audit_log``'s)."""
    return audit_engine


@pytest.fixture
def forged() -> list[str]:
    """Ids the store reported as forged."""
    return []


@pytest.fixture
def grants(engine: Engine, keystore_pool: Pkcs11SessionPool, forged: list[str]) -> SqlGrantStore:
    return SqlGrantStore(engine, GrantSealer(Pkcs11BlindIndexer(keystore_pool)), forged.append)


def _write(engine: Engine, sql: str, **params: object) -> None:
    """What a database writer does (SQL on the database, no token)."""
    with engine.begin() as c:
        c.execute(sa.text(sql), params)


def _week_form(when: datetime) -> str:
    """``when``'s day in the ISO week form, 13:00 ('W' sorts after every digit)."""
    iso = when.isocalendar()
    return f"{iso.year}-W{iso.week:02}-{iso.weekday}T13:00:00.123456"


# --- an expiry respelled: SQL compares the text, the MAC covers the instant -----------


@pytest.mark.backend("sqlite")
def test_an_expired_grant_respelled_is_not_live_again(
    engine: Engine, grants: SqlGrantStore, forged: list[str]
) -> None:
    patient = secrets.token_bytes(32)
    grant = grants.grant(patient, "dr.former", "clerk.one", T0 + timedelta(hours=1), T0)
    later = T0 + timedelta(hours=2)
    assert grants.has_access("dr.former", patient, later) is None  # expired
    # The same instant with 'T' (0x54 > 0x20): text later than any time that day.
    _write(engine, "UPDATE access_grants SET expires_at = REPLACE(expires_at, ' ', 'T') "
                   "WHERE id = :id", id=grant.id)  # fmt: skip
    assert grants.has_access("dr.former", patient, later) is None
    assert forged == [grant.id]  # SQL matched it; it fails its MAC (1970 placeholder)
    _write(engine, "UPDATE access_grants SET expires_at = :t WHERE id = :id",
           t=_week_form(T0 + timedelta(hours=1)), id=grant.id)  # fmt: skip
    months = T0 + timedelta(days=200)
    assert grants.has_access("dr.former", patient, months) is None
    assert grants.list(patient, None, False, months) == []
    # The officer's listing shows it, as altered (it fails its MAC): never as live.
    assert [(g.id, altered) for g, altered in grants.list_opened(patient, None, False, months)] \
        == [(grant.id, True)]  # fmt: skip
    assert set(forged) == {grant.id}


@pytest.mark.backend("sqlite")
def test_a_break_glass_grant_respelled_does_not_outlive_its_hours(
    engine: Engine, grants: SqlGrantStore, forged: list[str]
) -> None:
    patient = secrets.token_bytes(32)
    glass = grants.break_glass(patient, "dr.glass", "synthetic", timedelta(hours=1), T0)
    assert glass.expires_at is not None
    _write(engine, "UPDATE access_grants SET expires_at = :t WHERE id = :id",
           t=_week_form(glass.expires_at), id=glass.id)  # fmt: skip
    assert grants.has_access("dr.glass", patient, T0 + timedelta(days=90)) is None
    assert forged == [glass.id]


@pytest.mark.backend("sqlite")
def test_a_genuine_grant_still_gives_access_beside_a_respelled_one(
    engine: Engine, grants: SqlGrantStore
) -> None:
    """A forged row is skipped, not the end of the lookup."""
    patient = secrets.token_bytes(32)
    old = grants.grant(patient, "dr.two", "clerk.one", T0 + timedelta(hours=1), T0)
    live = grants.grant(patient, "dr.two", "clerk.one", None, T0 - timedelta(days=1))
    _write(engine, "UPDATE access_grants SET expires_at = REPLACE(expires_at, ' ', 'T') "
                   "WHERE id = :id", id=old.id)  # fmt: skip
    found = grants.has_access("dr.two", patient, T0 + timedelta(hours=2))
    assert found is not None
    assert found.id == live.id


# --- a view reads a column twice: WHERE and the row returned differ -------------------

_GRANT_COLUMNS = (
    "g.id, {patient} AS patient_index, {principal} AS principal, granted_by, created_at, "
    "expires_at, revoked_at, revoked_by, break_glass, reason, reviewed_at, reviewed_by, "
    "review_comment, mac, sealed_reason, sealed_comment"
)


def _coin(engine: Engine) -> str:
    """A condition true for about half the evaluations."""
    return "abs(random()) % 2 = 0" if engine.dialect.name == "sqlite" else "random() < 0.5"


def _view(engine: Engine, patient: str, principal: str, source: str) -> None:
    _write(engine, "ALTER TABLE access_grants RENAME TO access_grants_real")
    columns = _GRANT_COLUMNS.format(patient=patient, principal=principal)
    _write(engine, f"CREATE VIEW access_grants AS SELECT {columns} FROM {source}")


def test_a_view_does_not_give_one_principals_grant_to_another(
    engine: Engine, grants: SqlGrantStore, forged: list[str]
) -> None:
    patient = secrets.token_bytes(32)
    genuine = grants.grant(patient, "dr.alice", "clerk.one", None, T0)
    swap = f"CASE WHEN {_coin(engine)} THEN 'dr.mallory' ELSE principal END"
    _view(engine, "patient_index", swap, "access_grants_real AS g")
    for _ in range(TRIES):
        assert grants.has_access("dr.mallory", patient, T0) is None
        assert grants.list(patient, "dr.mallory", False, T0) == []
        # Shown to the officer only as altered (a row that fails its MAC), never as valid.
        assert all(altered for _, altered in grants.list_opened(patient, "dr.mallory", True, T0))
    assert set(forged) == {genuine.id}  # refused (by its MAC or the re-check), reported


def test_a_view_does_not_give_a_grant_on_one_patient_for_another(
    engine: Engine, grants: SqlGrantStore, forged: list[str]
) -> None:
    own, victim = secrets.token_bytes(32), secrets.token_bytes(32)
    mine = grants.grant(own, "dr.mallory", "clerk.one", None, T0)
    blob = "BLOB" if engine.dialect.name == "sqlite" else "bytea"
    _write(engine, f"CREATE TABLE wanted (p {blob})")
    _write(engine, "INSERT INTO wanted VALUES (:p)", p=victim)  # e.g. every patient's index
    swap = f"CASE WHEN {_coin(engine)} THEN wanted.p ELSE g.patient_index END"
    _view(engine, swap, "principal", "access_grants_real AS g, wanted")
    for _ in range(TRIES):
        assert grants.has_access("dr.mallory", victim, T0) is None
        assert grants.list(victim, None, False, T0) == []
    assert set(forged) == {mine.id}
