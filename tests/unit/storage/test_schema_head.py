"""storage.sql_upgrade.SCHEMA_HEAD names the newest migration, as Alembic finds it: a
database at that revision is opened without importing Alembic (upgrade's fast path)."""

from __future__ import annotations

from alembic.script import ScriptDirectory

from storage.sql_metadata import SCHEMA_HEAD, alembic_config


def test_schema_head_is_alembics_head() -> None:
    assert ScriptDirectory.from_config(alembic_config()).get_heads() == [SCHEMA_HEAD]
