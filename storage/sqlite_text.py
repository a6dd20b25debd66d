"""Text a SQLite file hands back, whatever a database writer put in it.

A database writer (write access to the file, no token) controls the bytes of every
text value, and can rebuild the file. What follows is handled here, so that a forged
value is a forged row (refused, named and reported by the store that reads it) rather
than an outage whose error carries the value into a log:

* **The file's encoding.** SQLite compares text in the file's encoding: a file rebuilt
  with ``PRAGMA encoding='UTF-16le'`` orders text otherwise than the UTF-8 medvault
  writes and pages by (a newest-first audit listing then pages forever). Every new
  connection checks ``PRAGMA encoding`` and refuses anything but UTF-8
  (:class:`DatabaseEncodingError`), so the service does not start on such a file and
  no operator command opens it. A new, empty file reports UTF-8 and is created so.
* **Text that is not UTF-8.** SQLite stores whatever bytes a writer casts to text;
  sqlite3's own decoding fails the whole fetch on the first it cannot decode, with the
  bytes in its message. Every connection decodes with replacement instead
  (:func:`decode_text`): such a value reads as other text, text a writer could have
  written anyway, and the stores check what they trust of a row (records' sealed
  columns, grants' MAC, signatures' associated data). Reads that must tell such text
  from genuine text run under :func:`text_as_read`, which reads it as
  :class:`Undecodable`: the audit trail's (a malformed field), the backup snapshot's
  (refused by table and column: it copies rows, and must not copy other bytes), and
  pagers that bind a row's value back as their cursor (:func:`bindable`; replaced
  text, bound back, compares otherwise than the stored bytes, and a page could start
  at the same row for ever).
* **Times that do not parse.** SQLite keeps times as text, parsed during the fetch:
  one that does not parse (not UTF-8, or any other text) would fail the fetch as above.
  :class:`StoredTime` reads it as :data:`UNREADABLE_TIME` (the epoch) instead, a time
  no genuine row holds, which fails the row's verification where the time is trusted.

PostgreSQL refuses text that is not UTF-8 when it is written, keeps the encoding of its
database, and returns times itself: there, all of this adds nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

from storage.errors import DatabaseUnreachableError

ENCODING: Final = "UTF-8"
# What a stored time that does not parse reads as (as an unreadable audit event's time,
# ``storage.audit_rows.UNREADABLE``): never written by medvault, which stores the time of
# the write.
UNREADABLE_TIME: Final = datetime(1970, 1, 1, tzinfo=UTC)


class DatabaseEncodingError(DatabaseUnreachableError):
    """The SQLite file is not encoded UTF-8 (rebuilt outside medvault): refused.

    Not transient, so it says what to do instead of "retry later"; no connection is
    handed out, so nothing was sent (a ``DatabaseUnreachableError``).
    """


def check_encoding(dbapi_connection: Any) -> None:
    """Refuse a connection to a file whose text encoding is not UTF-8 (closing it is the
    pool's: SQLAlchemy closes a connection whose connect listener raised)."""
    cursor = dbapi_connection.cursor()
    try:
        row = cursor.execute("PRAGMA encoding").fetchone()
    finally:
        cursor.close()
    found = row[0] if row else None
    if found != ENCODING:
        # SQLite's own names only (UTF-16le, UTF-16be): nothing else is put in the message.
        shown = found if found in {"UTF-16le", "UTF-16be"} else "in another encoding"
        raise DatabaseEncodingError(
            f"metadata database file is encoded {shown}, not {ENCODING} (rebuilt outside "
            "medvault); medvault does not open it: restore the database from a backup "
            "(docs/operations.md)"
        )


def decode_text(data: bytes) -> str:
    """A connection's ``text_factory``: UTF-8, bytes that are not UTF-8 replaced (U+FFFD).

    A function rather than ``str`` costs about 0.1 us per text value fetched (measured
    on CPython 3.11: 197 against 290 ns per value, fetch included).
    """
    return data.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a text value that is not UTF-8 reads as under :func:`text_as_read`: no check
    of a field accepts it. ``raw`` is kept only so a pager can go past such a value (it
    is bound back as the same text, :func:`bindable`); it is never shown, logged or
    hashed."""

    raw: bytes = field(repr=False)


@contextmanager
def text_as_read(connection: Connection) -> Iterator[None]:
    """On SQLite, text that is not UTF-8 reads as :class:`Undecodable` for this query.

    For reads that must tell such text from genuine text (see the module docstring):
    the audit's own (``storage.audit_rows`` names the field as malformed; a listing pages
    on from the same bytes), the backup snapshot's, and pagers that bind a row's value
    back. The connection's own decoding (:func:`decode_text`) is restored before it
    returns to the pool.

    Around such reads only, not around a transaction that runs other stores' changes
    (the audit writer's runs a record row, a grant): they read such text replaced, as
    they always do, rather than meet a marker they do not check for.
    """
    raw = connection.connection.dbapi_connection
    if not isinstance(raw, sqlite3.Connection):
        yield
        return
    before = raw.text_factory
    raw.text_factory = _decoded
    try:
        yield
    finally:
        raw.text_factory = before


def _decoded(data: bytes) -> object:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Undecodable(data)


def bindable(value: object) -> object:
    """``value`` as a query may compare it again: an ``Undecodable`` as the same text."""
    if isinstance(value, Undecodable):
        return sa.cast(sa.literal(value.raw, sa.LargeBinary), sa.Text)
    return value


class StoredTime(sa.types.TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` whose stored value, if it does not parse, reads as
    :data:`UNREADABLE_TIME` instead of failing the fetch (SQLite; PostgreSQL returns
    times itself, and this adds nothing there)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        """The dialect's parser, made total (see the class docstring)."""
        parse = super().result_processor(dialect, coltype)
        if parse is None:
            return None

        def process(value: object) -> object:
            try:
                return parse(value)
            except (ValueError, TypeError, OverflowError):
                return UNREADABLE_TIME

        return process
