"""The private PostgreSQL fixture itself: stopped (fast, and by SIGKILL) and started
again on the same port and data directory, committed rows intact."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.fixtures.private_postgres import PrivatePostgres

pytestmark = pytest.mark.integration


def _run(url: str, statement: str) -> list[int]:
    """One statement on a new connection (the rows of a SELECT)."""
    engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.begin() as connection:
            result = connection.execute(sa.text(statement))
            return list(result.scalars()) if result.returns_rows else []
    finally:
        engine.dispose()


def test_private_postgres_stops_crashes_and_restarts(private_postgres: PrivatePostgres) -> None:
    url = private_postgres.create_database("fixture_check")
    port = private_postgres.port
    _run(url, "CREATE TABLE t (n integer)")
    _run(url, "INSERT INTO t VALUES (1)")

    private_postgres.stop()
    with pytest.raises(sa.exc.OperationalError):
        _run(url, "SELECT n FROM t")
    private_postgres.start()
    _run(url, "INSERT INTO t VALUES (2)")

    private_postgres.crash()
    with pytest.raises(sa.exc.OperationalError):
        _run(url, "SELECT n FROM t")
    private_postgres.start()  # crash recovery replays the WAL
    assert private_postgres.port == port
    assert _run(url, "SELECT n FROM t ORDER BY n") == [1, 2]
