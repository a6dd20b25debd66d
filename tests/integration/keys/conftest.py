"""Fixtures of the key-lifecycle tests: a token of their own, a server per backend.

Retiring a KEK with destroy_key deletes it from the token, so these tests never touch the session's
shared token: each module initialises its own in the same SoftHSM2 directory (servers
are separate processes, so they see it), with KEK v1, the index key and the audit key.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.localstack.softhsm import init_token
from service.localstack.tokenkeys import ensure_token_keys
from tests.fixtures.databases import new_database
from tests.fixtures.service import RunningService, TlsFiles
from tests.fixtures.softhsm import SoftHsmToken
from tests.integration.access.helpers import issue_client


@pytest.fixture(scope="module")
def keys_token(softhsm_token: SoftHsmToken, keys_database: str) -> str:
    """Label of a fresh token with medvault's keys, for this module and backend only."""
    label = f"mv-keys-{secrets.token_hex(4)}"
    init_token(
        softhsm_token.conf_path,
        label,
        softhsm_token.pin_file.read_text().strip(),
        secrets.token_urlsafe(16),
    )
    ensure_token_keys(
        softhsm_token.module_path, label, softhsm_token.pin_file, softhsm_token.conf_path
    )
    return label


@pytest.fixture(scope="module")
def keys_database(
    request: pytest.FixtureRequest, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An empty database of this module, on the backend ``database_url`` names."""
    yield from new_database(request, database_url, tmp_path_factory)


@pytest.fixture(scope="module")
def start_keys_server(
    service_factory: Any, keys_token: str, keys_database: str
) -> Callable[..., RunningService]:
    """``start(bucket=...)``: a server on this module's token and database."""

    def start(**options: Any) -> RunningService:
        overrides = {"token_label": keys_token}
        server: RunningService = service_factory(
            keys_database, keystore_overrides=overrides, **options
        )
        return server

    return start


@pytest.fixture(scope="module")
def admin_cert(tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A key administrator's client certificate (role key_admin)."""
    return issue_client(tls_files, tmp_path_factory.mktemp("kadmin"), "kek-admin", "key_admin")
