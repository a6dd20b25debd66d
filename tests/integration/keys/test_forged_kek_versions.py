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

import pytest
from sqlalchemy.engine import Engine

from storage.kek import KekManager
from tests.integration.keys.test_insert_guard import FakeRing, FakeWrapper, engine  # noqa: F401

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
