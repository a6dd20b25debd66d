"""A database writer (no token) who retypes audit columns on PostgreSQL, against the
audit's lenient reads (``storage.audit_sql.rows_as_read``; review9 F1 and F3): a named
row or an integrity error, never an outage, never a value in an error."""

from __future__ import annotations

import secrets
from typing import Any, cast

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keystore.signing import Pkcs11Signer
from service.authz.permissions import ACCESS_BREAK_GLASS
from storage.audit_log import AuditColumnAlteredError, SqlAuditLog, audit_events
from storage.audit_model import AuditFilter
from storage.audit_sql import rows_as_read
from storage.break_glass import TAMPERED_MARK, BreakGlassReview
from storage.errors import BackendUnavailableError
from storage.grants import SqlGrantStore
from storage.pg_loads import UNLOADABLE
from storage.sql_metadata import make_engine
from tests.integration.storage.test_audit_log import (  # noqa: F401 - fixtures
    PATIENT,
    T0,
    audit_engine,
    audit_log,
    audit_url,
    chain,
    entry,
    signer,
    verify,
)

pytestmark = [pytest.mark.integration, pytest.mark.backend("postgresql")]
# ruff: noqa: F811  (the fixtures imported above are the parameters)

RETYPE_TIME_INTERVAL = (
    "ALTER TABLE audit_events ALTER COLUMN time TYPE interval USING time - 'epoch'"
)
RETYPE_REASON_JSON = "ALTER TABLE audit_events ALTER COLUMN reason TYPE json USING to_json(reason)"

# Values of other types than the time ones whose psycopg loaders raise on something
# PostgreSQL stores: the whole fetch fails, as an infinity did before pgtime.
_UNLOADABLE = {
    # psycopg's IntervalLoader: DataError (timedelta holds at most 999999999 days);
    # interval is not among audit_sql._TIME_TYPES.
    "interval past timedelta": (
        [RETYPE_TIME_INTERVAL,
         "UPDATE audit_events SET time = interval '2147483647 days' WHERE sequence = 1"],
        "time",
    ),
    # json.loads: ValueError past sys.get_int_max_str_digits() (4300).
    "json integer of 5000 digits": (
        [RETYPE_REASON_JSON,
         "UPDATE audit_events SET reason = repeat('1', 5000)::json WHERE sequence = 1"],
        "reason",
    ),
    # json.loads: RecursionError, not even translated by audit_log._translated.
    "json nested 3000 deep": (
        [RETYPE_REASON_JSON,
         "UPDATE audit_events SET reason = (repeat('[', 3000) || repeat(']', 3000))::json"
         " WHERE sequence = 1"],
        "reason",
    ),
}  # fmt: skip


def _run(engine: Engine, statements: list[str]) -> None:
    with engine.begin() as c:
        for statement in statements:
            c.exec_driver_sql(statement)


@pytest.mark.parametrize("kind", sorted(_UNLOADABLE))
def test_a_value_psycopg_cannot_load_is_named_by_verify_not_an_outage(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer, kind: str
) -> None:
    statements, _field = _UNLOADABLE[kind]
    _run(audit_engine, statements)
    # Row 1 holds the value (a json column reads genuine text as the same str; an
    # interval column makes every row malformed).
    assert verify(chain, signer) == (1, "event altered")


@pytest.mark.parametrize("kind", sorted(_UNLOADABLE))
def test_a_value_psycopg_cannot_load_is_left_out_of_a_listing_not_an_outage(
    audit_engine: Engine, chain: SqlAuditLog, kind: str
) -> None:
    statements, field = _UNLOADABLE[kind]
    _run(audit_engine, statements)
    listed = list(chain.query(AuditFilter()))
    assert len(listed) == 60
    assert {e.malformed for e in listed} - {()} == {(field,)}
    assert listed[0].malformed == (field,)


@pytest.mark.parametrize("kind", sorted(_UNLOADABLE))
def test_a_value_psycopg_cannot_load_is_a_flagged_grant_not_an_outage(
    audit_engine: Engine, audit_log: SqlAuditLog, kind: str
) -> None:
    genuine, forged = secrets.token_hex(16), secrets.token_hex(16)
    for grant_id in (genuine, forged):
        audit_log.append([entry(1, action=ACCESS_BREAK_GLASS, resource=f"grant/{grant_id}",
                                outcome="allowed", patient_index=PATIENT,
                                principal="dr-x")])  # fmt: skip
    statements, _field = _UNLOADABLE[kind]
    # Only the forged grant's event holds the value (the column is retyped for both).
    _run(audit_engine, [statements[0], statements[1].replace(
        "sequence = 1", f"resource = 'grant/{forged}'")])  # fmt: skip
    review = BreakGlassReview(SqlGrantStore(audit_engine, cast(Any, None)), ACCESS_BREAK_GLASS)
    queue = review.queue(include_reviewed=True)
    assert {(g.grant.id, g.grant.reason) for g in queue} == {
        (genuine, TAMPERED_MARK), (forged, TAMPERED_MARK)}  # fmt: skip


# F3: a time window on a retyped time column: PostgreSQL cannot compare the column with
# a timestamp (UndefinedFunction, a ProgrammingError), which audit_log._translated maps
# to "audit database unavailable ... retry later". Pre-existing, but it is the same
# outage pgtime fixes for infinity, on the officer's usual query (a time window).
_RETYPED_TIME = {
    "text": "ALTER TABLE audit_events ALTER COLUMN time TYPE text USING time::text",
    "interval": RETYPE_TIME_INTERVAL,
    "timestamptz[]": "ALTER TABLE audit_events ALTER COLUMN time TYPE timestamptz[]"
                     " USING ARRAY[time]",
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(_RETYPED_TIME))
def test_a_time_window_on_a_retyped_time_column_is_not_an_outage(
    audit_engine: Engine, chain: SqlAuditLog, kind: str
) -> None:
    _run(audit_engine, [_RETYPED_TIME[kind]])
    assert all(e.malformed for e in chain.query(AuditFilter()))  # unfiltered: named rows
    with pytest.raises(AuditColumnAlteredError, match=r"^audit_events\.time altered") as raised:
        list(chain.query(AuditFilter(since=T0, until=T0)))
    assert not isinstance(raised.value, BackendUnavailableError)
    assert raised.value.__cause__ is None  # PostgreSQL's text may quote the value


def test_an_outage_during_a_time_window_is_still_unavailable(audit_url: str) -> None:
    """Only a comparison PostgreSQL has no operator for is an altered column."""
    url = sa.make_url(audit_url).set(port=1)  # nothing listens there
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        with pytest.raises(BackendUnavailableError):
            list(SqlAuditLog(engine).query(AuditFilter(since=T0)))
    finally:
        engine.dispose()


# --- held --------------------------------------------------------------------------


def test_the_connections_loaders_are_left_as_they_were(
    audit_engine: Engine, chain: SqlAuditLog
) -> None:
    """A lenient read of values psycopg cannot load (F1's) leaves the connection's own
    loading: a plain read of an infinity on it fails afterwards."""
    _run(audit_engine, [
        RETYPE_REASON_JSON,
        "UPDATE audit_events SET reason = repeat('1', 5000)::json WHERE sequence = 59",
        "UPDATE audit_events SET time = 'infinity' WHERE sequence = 3",
    ])  # fmt: skip
    plain = sa.select(audit_events.c.time).where(audit_events.c.sequence == 3)
    with audit_engine.connect() as c:
        with rows_as_read(c):
            rows = c.execute(sa.select(audit_events).order_by(audit_events.c.sequence)).all()
        assert (rows[2].time, rows[58].reason) == (UNLOADABLE, UNLOADABLE)
        with pytest.raises(ValueError, match="digits"):
            c.execute(sa.select(audit_events.c.reason)).all()
        with pytest.raises(sa.exc.DataError):
            c.execute(plain).all()


def test_lenient_loading_is_per_connection(audit_engine: Engine, audit_log: SqlAuditLog) -> None:
    """While one connection reads leniently, another (another thread's) does not, and
    psycopg's global adapters are untouched."""
    audit_log.append([entry(1)])
    _run(audit_engine, ["UPDATE audit_events SET time = 'infinity' WHERE sequence = 1"])
    global_loader = psycopg.adapters.get_loader(
        psycopg.adapters.types["timestamptz"].oid, psycopg.pq.Format.TEXT
    )
    with audit_engine.connect() as lenient, audit_engine.connect() as plain, rows_as_read(lenient):
        assert lenient.execute(sa.select(audit_events.c.time)).scalar() is not None
        with pytest.raises(sa.exc.DataError):
            plain.execute(sa.select(audit_events.c.time)).all()
    assert (
        psycopg.adapters.get_loader(
            psycopg.adapters.types["timestamptz"].oid, psycopg.pq.Format.TEXT
        )
        is global_loader
    )


@pytest.mark.parametrize("statements", [
    ["CREATE DOMAIN forged_time AS timestamptz",
     "ALTER TABLE audit_events ALTER COLUMN time TYPE forged_time",
     "UPDATE audit_events SET time = 'infinity' WHERE sequence = 50"],
    ["ALTER TABLE audit_events ALTER COLUMN time TYPE timestamptz[] USING ARRAY[time]",
     "UPDATE audit_events SET time = ARRAY['infinity'::timestamptz] WHERE sequence = 50"],
    ["ALTER TABLE audit_events ALTER COLUMN time TYPE tstzrange"
     " USING tstzrange(time, time, '[]')",
     "UPDATE audit_events SET time = tstzrange('2020-01-01', '10000-01-01') WHERE sequence = 50"],
    ["ALTER TABLE audit_events ALTER COLUMN time TYPE numeric"
     " USING extract(epoch FROM time)", "UPDATE audit_events SET time = 'NaN' WHERE sequence = 50"],
    ["ALTER TABLE audit_events ALTER COLUMN time TYPE time USING time::time",
     "UPDATE audit_events SET time = '24:00:00' WHERE sequence = 50"],
], ids=["domain", "array", "range", "numeric-nan", "time-24h"])  # fmt: skip
def test_other_time_like_types_are_named_not_an_outage(
    audit_engine: Engine, chain: SqlAuditLog, signer: Pkcs11Signer, statements: list[str]
) -> None:
    _run(audit_engine, statements)
    first = 50 if statements[0].startswith("CREATE DOMAIN") else 1
    assert verify(chain, signer) == (first, "event altered")
