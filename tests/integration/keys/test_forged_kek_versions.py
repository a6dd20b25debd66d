"""A ``kek_versions`` row of another type than its column's names no KEK.

SQLite keeps any type in any column (its CHECK off with ``PRAGMA
ignore_check_constraints``), and a PostgreSQL writer can change a column's type.
``KekManager.list`` passed such values on as they were (a state as bytes; a time as
text ended in an internal error). Now such a row is left out of the list, logged by
table and column; ``rotate`` numbers from the integer versions only, never ``int()`` of
another (the version column is SQLite's rowid, so only a PostgreSQL writer can retype
it, and the listing's ``sync`` then fails without naming a value).
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.engine import Engine

from storage.kek import KekManager
from tests.integration.keys.test_insert_guard import FakeRing, FakeWrapper, engine  # noqa: F401
from tests.integration.storage.test_audit_log import PG_OUT_OF_RANGE
from tests.integration.storage.test_pg_unloadable import assert_nowhere, forge_time

pytestmark = pytest.mark.integration
# ruff: noqa: F811  (the fixture imported above is the parameter)

FORGED = "SYNTHETIC-FORGED"


def _manager(engine: Engine) -> KekManager:
    ring = FakeRing()
    manager = KekManager(engine, FakeWrapper(ring), ring)
    manager.sync()
    return manager


def _logged_without_value(caplog: pytest.LogCaptureFixture, column: str) -> None:
    lines = [r.getMessage() for r in caplog.records if "kek_versions" in r.getMessage()]
    assert any(f"({column})" in line for line in lines), lines
    assert not any(FORGED in line for line in lines)


@pytest.mark.backend("sqlite")
def test_a_kek_state_of_another_type_names_no_kek(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    manager = _manager(engine)
    with engine.begin() as c:
        c.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        c.exec_driver_sql(f"UPDATE kek_versions SET state = CAST('{FORGED}' AS BLOB) "
                          "WHERE version = 1")  # fmt: skip
    assert [(k.version, k.state) for k in manager.list()] == [(2, "active")]
    _logged_without_value(caplog, "state")


@pytest.mark.backend("postgresql")
def test_a_postgresql_kek_time_column_of_another_type_names_no_kek(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A text ``created_at`` ended the listing in an internal error."""
    manager = _manager(engine)
    with engine.begin() as c:
        c.exec_driver_sql("ALTER TABLE kek_versions ALTER COLUMN created_at TYPE text")
    assert manager.list() == []
    _logged_without_value(caplog, "created_at")


@pytest.mark.backend("postgresql")
@pytest.mark.parametrize("value", PG_OUT_OF_RANGE)
@pytest.mark.parametrize("column", ["created_at", "retired_at"])
def test_a_kek_time_psycopg_cannot_load_names_no_kek_and_the_others_list(
    engine: Engine,
    column: str,
    value: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``infinity`` (or a year past 9999, or BC) in one row failed the whole listing
    (and ``rotate``, ``retire``, which list), quoting the value. ``retired_at`` is not
    listed: its row lists as it is."""
    manager = _manager(engine)
    forge_time(engine, "kek_versions", column, ("version", "1"), value)
    with caplog.at_level(logging.DEBUG):
        listed = [(k.version, k.state) for k in manager.list()]
        assert manager.rotate().version == 3
    if column == "created_at":
        assert listed == [(2, "active")]
        _logged_without_value(caplog, column)
    else:
        assert listed == [(1, "previous"), (2, "active")]
    assert_nowhere(value, [], caplog, capsys)


# Integers no KEK version is (the token numbers from 1; the column is 32 bits). SQLite
# keeps any integer in an INTEGER column; a PostgreSQL writer retypes it to go past 2^31.
OUT_OF_RANGE = ("0", "-1", "2147483648")


@pytest.mark.parametrize("version", OUT_OF_RANGE)
def test_a_kek_version_out_of_range_names_no_kek(
    engine: Engine, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    manager = _manager(engine)
    with engine.begin() as c:
        if engine.dialect.name == "postgresql":
            c.exec_driver_sql("ALTER TABLE kek_versions ALTER COLUMN version TYPE bigint")
        c.exec_driver_sql(f"UPDATE kek_versions SET version = {version} WHERE version = 1")
    # sync() registers the token's v1 again; the forged row is left out, logged.
    assert [(k.version, k.state) for k in manager.list()] == [(1, "previous"), (2, "active")]
    _logged_without_value(caplog, "version")
    assert manager.rotate().version == 3  # never numbered from the forged row
