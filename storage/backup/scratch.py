"""Scratch places for restore drills: a random bucket and a throw-away database.

:func:`s3_scratch` makes them; both are removed when the drill is done, whatever its
outcome. A scratch database is a SQLite file in a temporary directory, or a new database
``medvault_drill_<random>`` on a PostgreSQL server. A scratch bucket is emptied with
multi-object deletes (up to 1000 keys a request) rather than one request per object,
which at archive scale took as long as the restore itself.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import sqlalchemy as sa
from minio import Minio
from minio.deleteobjects import DeleteObject
from sqlalchemy.engine import Engine

from storage.backup.restore import Deployment
from storage.s3_blobs import S3BlobStore
from storage.sql_metadata import make_engine, translated, upgrade

log = logging.getLogger(__name__)

Scratch = Callable[[], AbstractContextManager[Deployment]]


@contextmanager
def scratch_database(postgres_url: str | None = None) -> Iterator[Engine]:
    """A migrated, empty scratch database, dropped afterwards.

    Default: a SQLite file in a temporary directory. With ``postgres_url`` (any database
    on the server, used to connect): a new database ``medvault_drill_<random>`` there.
    """
    if not postgres_url:
        with tempfile.TemporaryDirectory(prefix="medvault-drill-") as directory:
            engine = make_engine(f"sqlite:///{Path(directory) / 'scratch.db'}")
            try:
                upgrade(engine)
                yield engine
            finally:
                engine.dispose()
        return
    name = f"medvault_drill_{secrets.token_hex(6)}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT", hide_parameters=True)
    try:
        with translated(admin), admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))  # random hex: no injection
        engine = make_engine(
            sa.make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
        )
        try:
            upgrade(engine)
            yield engine
        finally:
            engine.dispose()
            _drop_database(admin, name)
    finally:
        admin.dispose()


def _drop_database(admin: Engine, name: str) -> None:
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    except sa.exc.SQLAlchemyError:  # the drill's result stands; the operator drops it
        log.exception("scratch database not dropped", extra={"database": name})


@contextmanager
def scratch_bucket(client: Minio) -> Iterator[S3BlobStore]:
    """A new bucket with a random name on ``client``'s S3, emptied and removed afterwards."""
    blobs = S3BlobStore(client, f"medvault-drill-{secrets.token_hex(6)}")
    blobs.ensure_bucket()
    try:
        yield blobs
    finally:
        _remove_bucket(client, blobs)


def _remove_bucket(client: Minio, blobs: S3BlobStore) -> None:
    try:
        keys = (DeleteObject(info.key) for info in blobs.list())
        errors = list(client.remove_objects(blobs.bucket, keys))  # lazy: must be drained
        if errors:
            log.error("scratch objects not removed", extra={"bucket": blobs.bucket,
                                                             "objects": len(errors)})  # fmt: skip
        client.remove_bucket(blobs.bucket)
    except Exception:  # the drill's result stands; the operator removes the leftover
        log.exception("scratch bucket not removed", extra={"bucket": blobs.bucket})


def s3_scratch(client: Minio, postgres_url: str | None = None) -> Scratch:
    """Scratch deployments: a random bucket on ``client``'s S3 and a scratch database."""

    @contextmanager
    def make() -> Iterator[Deployment]:
        with scratch_bucket(client) as blobs, scratch_database(postgres_url) as engine:
            yield Deployment(engine=engine, blobs=blobs)

    return make
