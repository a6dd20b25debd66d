"""Fixtures of the access-control and audit integration tests.

Each module starts its own servers (one per backend) on a database of its own, so
tampering with the trail or renaming a table never leaks into another module.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tests.fixtures.databases import PG_ADMIN_URL
from tests.fixtures.service import TlsFiles
from tests.integration.access.helpers import issue_client


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


@pytest.fixture(scope="module")
def fresh_database(
    request: pytest.FixtureRequest,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """An empty database of this module only, on the backend ``database_url`` names."""
    yield from new_database(request, database_url, tmp_path_factory)


def new_database(
    request: pytest.FixtureRequest, backend_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if is_sqlite(backend_url):
        yield f"sqlite:///{tmp_path_factory.mktemp('access-db') / 'metadata.db'}"
        return
    admin: Engine = request.getfixturevalue("postgres_admin")
    name = f"medvault_a_{secrets.token_hex(6)}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("certs")


@pytest.fixture(scope="module")
def issue(tls_files: TlsFiles, certs_dir: Path):  # type: ignore[no-untyped-def]
    """``issue(name, role)`` -> (cert, key) signed by the servers' client CA."""

    def make(name: str, role: str | None = None) -> tuple[Path, Path]:
        return issue_client(tls_files, certs_dir, name, role)

    return make
