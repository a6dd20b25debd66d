"""Alembic migrations of the metadata database; run them with ``storage.sql_upgrade.upgrade``."""
