"""Issue 10: replicas starting together on an empty database migrate one at a time.

Two processes (forked, so they start in milliseconds) wait on one barrier and then
run ``upgrade`` on the same fresh database, many times over in a loop bounded in
seconds: neither may fail and the schema must end at head. Without the migration lock
the second one trips over tables the first is creating.
"""

from __future__ import annotations

import multiprocessing
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from storage.errors import BackendUnavailableError
from storage.migration_lock import migration_lock
from storage.sql_metadata import alembic_config, make_engine, upgrade
from tests.fixtures.databases import PG_ADMIN_URL

pytestmark = pytest.mark.integration
BUDGET_SECONDS = 12.0
MAX_ROUNDS = 8
_fork = multiprocessing.get_context("fork")


def _migrate(url: str, barrier: Any, failures: Any) -> None:
    """Child: wait for the other, migrate, report a failure's class name (never its text)."""
    engine = make_engine(url)
    try:
        barrier.wait(timeout=30)
        upgrade(engine)
    except Exception as e:  # noqa: BLE001  (reported to the parent)
        failures.put(f"{type(e).__name__}: {type(e.__cause__).__name__}")
    finally:
        engine.dispose()


def _race(url: str) -> list[str]:
    barrier, failures = _fork.Barrier(2), _fork.Queue()
    children = [_fork.Process(target=_migrate, args=(url, barrier, failures)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    codes = [child.exitcode for child in children]
    found = []
    while not failures.empty():
        found.append(failures.get())
    return found + [f"exit {c}" for c in codes if c != 0]


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _version(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            value = connection.scalar(sa.text("SELECT version_num FROM alembic_version"))
            return str(value) if value is not None else None
    finally:
        engine.dispose()


def _fresh_databases(request: pytest.FixtureRequest, backend: str, tmp: Path) -> Iterator[str]:
    """Empty databases on ``backend``, one per round (PostgreSQL ones dropped after)."""
    if backend.startswith("sqlite"):
        n = 0
        while True:
            n += 1
            yield f"sqlite:///{tmp / f'race-{n}.db'}"
    admin: Engine = request.getfixturevalue("postgres_admin")
    while True:
        name = f"medvault_m_{secrets.token_hex(6)}"
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(
                hide_password=False
            )
        finally:
            with admin.connect() as connection:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_two_concurrent_upgrades_on_an_empty_database(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path
) -> None:
    head, rounds = _head(), 0
    deadline = time.monotonic() + BUDGET_SECONDS
    databases = _fresh_databases(request, database_url, tmp_path)
    try:
        while rounds < MAX_ROUNDS and (rounds < 2 or time.monotonic() < deadline):
            url = next(databases)
            failures = _race(url)
            assert not failures, f"round {rounds}: concurrent upgrade failed: {failures}"
            assert _version(url) == head, f"round {rounds}: schema not at head"
            rounds += 1
    finally:
        databases.close()
    assert rounds >= 2


def test_upgrade_waits_for_the_lock_holder(database_url: str, tmp_path: Path) -> None:
    """A migrator that cannot get the lock in time reports it (UNAVAILABLE), not a crash."""
    url = database_url
    if url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'held.db'}"
    holder, waiter = make_engine(url), make_engine(url)
    try:
        with migration_lock(holder):
            started = time.monotonic()
            refused = pytest.raises(BackendUnavailableError, match="migrating")
            with refused, migration_lock(waiter, wait_seconds=0.3):
                pass
            assert time.monotonic() - started < 5
        with migration_lock(waiter, wait_seconds=1):  # released: free again
            pass
    finally:
        holder.dispose()
        waiter.dispose()
