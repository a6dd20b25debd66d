"""A SQLite file as a database writer may leave it: its encoding, and text that is not UTF-8.

A writer who rebuilds the file in UTF-16 (dump, a new file with ``PRAGMA encoding``,
reload) changes how SQLite compares text: every connection refuses such a file, so
neither the service nor an operator command that opens the database (``make_engine``:
the service, ``medvault restore``, ``medvault keys``; backups and ``audit verify`` run
in the service) works on it. Text that is not UTF-8 reads with its bytes replaced,
except in the reads that must tell it apart (``text_as_read``). SQLite only: PostgreSQL
keeps its database's encoding and refuses such text when it is written.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage.audit_log import SqlAuditLog
from storage.errors import DatabaseUnreachableError
from storage.sql_metadata import SqlMetadataStore, make_engine, upgrade
from storage.sqlite_text import (
    UNREADABLE_TIME,
    DatabaseEncodingError,
    StoredTime,
    Undecodable,
    decode_text,
    text_as_read,
)

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


@pytest.fixture
def engine(medvault_file: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{medvault_file}")
    with engine.begin() as c:
        c.exec_driver_sql("CREATE TABLE forged (t TEXT, at TEXT)")
        c.exec_driver_sql("INSERT INTO forged VALUES (CAST(X'41FF42' AS TEXT), 'x')")
    yield engine
    engine.dispose()


def test_text_that_is_not_utf8_reads_replaced_not_as_the_drivers_error(engine: Engine) -> None:
    with engine.connect() as c:
        assert c.exec_driver_sql("SELECT t FROM forged").scalar_one() == "A\ufffdB"


def test_text_as_read_marks_such_text_and_restores_the_replacing_decoder(engine: Engine) -> None:
    """The audit's reads, the snapshot's and the pagers' see the marker; afterwards the
    connection decodes as every connection does (not sqlite3's default, which fails)."""
    with engine.connect() as c:
        raw = c.connection.dbapi_connection
        assert isinstance(raw, sqlite3.Connection)
        assert raw.text_factory is decode_text
        with text_as_read(c):
            marked = c.exec_driver_sql("SELECT t FROM forged").scalar_one()
        assert marked == Undecodable(b"A\xffB")
        assert raw.text_factory is decode_text
        assert c.exec_driver_sql("SELECT t FROM forged").scalar_one() == "A\ufffdB"


@pytest.mark.parametrize("stored", ["CAST(X'32FF' AS TEXT)", "'garbage'", "7"])
def test_a_stored_time_that_does_not_parse_reads_as_the_placeholder(
    engine: Engine, stored: str
) -> None:
    """Not sqlite3's or the parser's error (whose text carries the value): a time no
    genuine row holds, which fails verification where the time is trusted."""
    forged = sa.table("forged", sa.column("at", StoredTime()))
    with engine.begin() as c:
        c.exec_driver_sql(f"UPDATE forged SET at = {stored}")
    with engine.connect() as c:
        assert c.execute(sa.select(forged.c.at)).scalar_one() == UNREADABLE_TIME
