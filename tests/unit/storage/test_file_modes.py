"""The SQLite database and its -wal/-shm files are created owner-only (0600)."""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa

from storage.sql_metadata import make_engine


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_new_database_and_its_wal_are_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a usual umask would give 0644
    try:
        db = tmp_path / "metadata.db"
        engine = make_engine(f"sqlite:///{db}")
        with engine.begin() as connection:
            connection.execute(sa.text("CREATE TABLE t (x INTEGER)"))
            connection.execute(sa.text("INSERT INTO t VALUES (1)"))
            files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
            assert all(f.exists() for f in files), "WAL mode did not create -wal/-shm"
            assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
        engine.dispose()
    finally:
        os.umask(old)


def test_existing_loose_database_is_tightened(tmp_path: Path) -> None:
    db = tmp_path / "metadata.db"
    db.touch()
    db.chmod(0o644)
    make_engine(f"sqlite:///{db}").dispose()
    assert _mode(db) == 0o600
