"""A SQLite file as a database writer may leave it: its encoding.

A writer who rebuilds the file in UTF-16 (dump, a new file with ``PRAGMA encoding``,
reload) changes how SQLite compares text: every connection refuses such a file, so
neither the service nor an operator command that opens the database (``make_engine``:
the service, ``medvault restore``, ``medvault keys``; backups and ``audit verify`` run
in the service) works on it. SQLite only: PostgreSQL keeps its database's encoding.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from storage.audit_log import SqlAuditLog
from storage.errors import DatabaseUnreachableError
from storage.sql_metadata import SqlMetadataStore, make_engine, upgrade
from storage.sqlite_text import DatabaseEncodingError

pytestmark = pytest.mark.integration


def _encoding(path: Path) -> str:
    with sqlite3.connect(path) as raw:
        value: str = raw.execute("PRAGMA encoding").fetchone()[0]
    raw.close()
    return value


def _rebuilt(source: Path, target: Path, encoding: str) -> None:
    """What a writer does: dump the database, load it into a new file of ``encoding``."""
    with sqlite3.connect(source) as old:
        dump = list(old.iterdump())
    old.close()
    new = sqlite3.connect(target)
    new.execute(f"PRAGMA encoding = '{encoding}'")
    new.executescript("\n".join(dump))  # each statement of the dump ends with ";"
    new.close()


@pytest.fixture
def medvault_file(tmp_path: Path) -> Path:
    """A database medvault made (schema at head), its engine disposed."""
    path = tmp_path / "metadata.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


def test_a_new_file_is_created_utf8(medvault_file: Path) -> None:
    assert _encoding(medvault_file) == "UTF-8"


@pytest.mark.parametrize("encoding", ["UTF-16le", "UTF-16be"])
def test_a_file_rebuilt_in_utf16_is_refused_at_connect(
    medvault_file: Path, tmp_path: Path, encoding: str
) -> None:
    rebuilt = tmp_path / "rebuilt.db"
    _rebuilt(medvault_file, rebuilt, encoding)
    assert _encoding(rebuilt) == encoding
    engine = make_engine(f"sqlite:///{rebuilt}")
    try:
        # Start-up (the migration check), and any store's first statement.
        with pytest.raises(DatabaseEncodingError) as raised:
            upgrade(engine)
        message = str(raised.value)
        assert f"encoded {encoding}, not UTF-8" in message
        assert "restore the database from a backup" in message
        assert isinstance(raised.value, DatabaseUnreachableError)  # nothing was sent
        with pytest.raises(DatabaseEncodingError):
            SqlMetadataStore(engine).get("0" * 32)
        with pytest.raises(DatabaseEncodingError):
            SqlAuditLog(engine).head()
        assert engine.pool.checkedout() == 0  # the refused connection is not kept
    finally:
        engine.dispose()
    assert _encoding(rebuilt) == encoding  # refused, not converted or written


def test_the_same_file_rebuilt_in_utf8_opens(medvault_file: Path, tmp_path: Path) -> None:
    """The refusal is of the encoding, not of a rebuilt file."""
    rebuilt = tmp_path / "rebuilt.db"
    _rebuilt(medvault_file, rebuilt, "UTF-8")
    engine = make_engine(f"sqlite:///{rebuilt}")
    try:
        upgrade(engine)
        assert SqlAuditLog(engine).head()[0] == 0
    finally:
        engine.dispose()
