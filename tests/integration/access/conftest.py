"""Fixtures of the access-control and audit integration tests.

Each module starts its own servers (one per backend) on a database of its own, so
tampering with the trail or renaming a table never leaks into another module.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.databases import new_database
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




@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("certs")


@pytest.fixture(scope="module")
def issue(tls_files: TlsFiles, certs_dir: Path):  # type: ignore[no-untyped-def]
    """``issue(name, role)`` -> (cert, key) signed by the servers' client CA."""

    def make(name: str, role: str | None = None) -> tuple[Path, Path]:
        return issue_client(tls_files, certs_dir, name, role)

    return make
