"""Fixtures of the backup tests: a fresh source deployment and a fresh target per test."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from keystore import Pkcs11SessionPool
from storage.backup.targets import S3Target
from storage.s3_blobs import MIB, S3BlobStore
from storage.sql_metadata import make_engine, upgrade
from tests.fixtures.databases import new_database
from tests.integration.backup.helpers import Source


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend of a test that runs on both."""
    return str(request.param)


@pytest.fixture
def fresh_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """``fresh_url(kind)``: a new, empty database URL (dropped after the test);
    ``fresh_url(kind, migrated=True)``: one with the schema at head (a template's copy)."""
    opened: list[Iterator[str]] = []

    def make(kind: str, *, migrated: bool = False) -> str:
        gen = new_database(request, kind, tmp_path_factory, migrated=migrated)
        opened.append(gen)
        return next(gen)

    yield make
    for gen in opened:
        next(gen, None)


def _bucket(s3_server: Any) -> S3BlobStore:
    store = S3BlobStore(s3_server.client(), f"bk-{secrets.token_hex(8)}", part_size=5 * MIB)
    store.ensure_bucket()
    return store


@pytest.fixture
def make_source(
    fresh_url: Any, s3_server: Any, keystore_pool: Pkcs11SessionPool
) -> Iterator[Any]:
    """``make_source(kind)``: an empty migrated database and bucket on that backend."""
    engines = []

    def make(kind: str) -> Source:
        engine = make_engine(fresh_url(kind, migrated=True))
        upgrade(engine)
        engines.append(engine)
        return Source(engine, _bucket(s3_server), keystore_pool, s3_server.endpoint)

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def source(make_source: Any, backend: str) -> Source:
    """A source deployment on ``backend`` with 5 records and a row in every table."""
    src: Source = make_source(backend)
    src.add_records(5)
    src.add_other_rows()
    return src


@pytest.fixture
def s3_target(s3_server: Any) -> S3Target:
    """A fresh target bucket on the session's SeaweedFS (no Object Lock)."""
    target = S3Target(s3_server.client(), f"bkt-{secrets.token_hex(8)}", part_size=5 * MIB)
    target.ensure_bucket()
    return target


@pytest.fixture
def trusted_key(keystore_pool: Pkcs11SessionPool) -> bytes:
    """The token's backup public key (DER SPKI)."""
    from keystore.signing import Pkcs11Signer  # noqa: PLC0415

    return Pkcs11Signer(keystore_pool, "medvault-backup-v1").public_key_der()
