"""Migrating the metadata database to the newest schema (Alembic), and knowing when there
is nothing to migrate, so that a start at head never imports Alembic.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage.errors import SchemaRevisionError
from storage.migration_lock import migration_lock
from storage.sql_engine import translated

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The newest revision in migrations/versions/, which a new migration replaces here (a
# unit test compares it with Alembic's head): a database already there needs no
# migration, and start-up then leaves Alembic unimported (upgrade).
SCHEMA_HEAD = "0016"


def alembic_config() -> Config:
    """An Alembic config for the packaged migrations (no alembic.ini needed)."""
    from alembic.config import Config  # noqa: PLC0415  (Alembic loads to migrate: upgrade)

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(
    engine: Engine, revision: str = "head", hooks: Mapping[str, object] | None = None
) -> None:
    """Migrate the database to ``revision``; a no-op when it is there already.

    ``hooks`` reach migrations through Alembic's ``config.attributes`` (migration 0009
    adopts legacy grant rows through one, in the migration's transaction). Concurrent
    calls (replicas starting together) run one after the other
    (``storage.migration_lock``); the later ones find the schema at head. A database
    found at head (read under the lock too: a reader beside a migration on a new SQLite
    file can meet its lock) is left without importing Alembic, which costs every start
    about 0.13 s of CPU for nothing.
    """
    with translated(engine), migration_lock(engine):
        if revision == "head" and at_head(engine):
            return
        from alembic import command  # noqa: PLC0415  (see above)

        config = alembic_config()
        config.attributes.update(hooks or {})
        with engine.begin() as connection:
            _check_stamp(connection, config)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)


def _check_stamp(connection: Connection, config: Config) -> None:
    """Refuse a database whose ``alembic_version`` names a revision this medvault does
    not have (edited by a database writer, or a newer medvault's): Alembic's own error
    would carry the stored value into the message and a logged traceback."""
    from alembic.script import ScriptDirectory  # noqa: PLC0415  (as upgrade's)

    if not sa.inspect(connection).has_table("alembic_version"):
        return
    stamped = connection.scalars(sa.text("SELECT version_num FROM alembic_version")).all()
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    if any(type(value) is not str or value not in known for value in stamped):
        raise SchemaRevisionError(
            "the metadata database's alembic_version table names a schema revision this "
            "medvault does not have (edited outside medvault, or written by a newer "
            "release); not started: run the release that wrote the database, or restore "
            "the database from a backup (docs/operations.md)"
        )


def at_head(engine: Engine) -> bool:
    """Whether the schema is at the newest migration (:data:`SCHEMA_HEAD`)."""
    with translated(engine), engine.connect() as connection:
        if not sa.inspect(connection).has_table("alembic_version"):
            return False
        versions = connection.scalars(sa.text("SELECT version_num FROM alembic_version")).all()
    return versions == [SCHEMA_HEAD]
