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
* **Times that do not parse, or not in medvault's form.** SQLite keeps times as
  text, parsed during the fetch: one that does not parse (not UTF-8, or any other text)
  would fail the fetch as above. And SQL compares the stored text, while a row's MAC or
  seal covers the instant Python parses: ``fromisoformat`` accepts many spellings of
  one instant (a ``T`` separator, an ISO week date, another zone's offset), which sort
  otherwise, so a rewritten expiry or creation time would pass every check and still
  move the row in or out of a query's ``WHERE``. :func:`exact_time_parser` accepts only
  the text SQLAlchemy's SQLite ``DATETIME`` writes for the value (medvault binds UTC;
  the dialect writes ``YYYY-MM-DD HH:MM:SS.ffffff``, no offset): the parsed value is
  rendered again as on write and must give the stored text back. :class:`StoredTime`
  reads any other text as :data:`UNREADABLE_TIME` (the epoch), a time no genuine row
  holds, which fails the row's verification where the time is trusted, and logs the
  table and column (never the value). The audit trail's times are read by the same rule
  (``storage.audit_rows``: a malformed field).

PostgreSQL refuses text that is not UTF-8 when it is written, keeps the encoding of its
database, and returns times itself: there, all of this adds nothing.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect

from storage.errors import DatabaseUnreachableError

log = logging.getLogger(__name__)

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
            "(docs/operations.md, \"A SQLite file changed outside medvault\")"
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


# The text SQLAlchemy's SQLite DATETIME writes (its default storage format, which
# medvault keeps): fixed width, zero-padded, no offset.
_WRITTEN: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}")
_PROBES: Final = (
    (datetime(1, 2, 3, 4, 5, 6, 7), "0001-02-03 04:05:06.000007"),
    (datetime(2024, 12, 31, 23, 59, 59, 999999), "2024-12-31 23:59:59.999999"),
)


def exact_time_parser(
    time_type: sa.types.TypeEngine[Any], dialect: Dialect
) -> Callable[[Any], datetime] | None:
    """The dialect's parser of ``time_type``'s stored text, accepting only the exact text
    the same type writes for the value it parses to (see the module docstring); any other
    value raises ``ValueError`` or ``TypeError`` (no value in the message). None where
    the driver returns datetimes itself (PostgreSQL)."""
    impl = time_type.dialect_impl(dialect)
    parse = impl.result_processor(dialect, None)
    render = impl.bind_processor(dialect)
    if parse is None:
        return None
    if render is None:  # no dialect parses text it does not also render; refuse all
        raise TypeError("a stored time type without a text form")
    # Where the type writes ``_WRITTEN``'s form, text of that form that parses is exactly
    # what it writes for the parsed value (each field read and rendered back at the same
    # fixed width): the match alone decides, at a tenth of rendering's cost per value.
    shaped = all(render(value) == text for value, text in _PROBES)

    def exact(value: Any) -> datetime:
        if type(value) is not str:
            raise TypeError("a stored time is not text")
        if shaped and _WRITTEN.fullmatch(value) is None:
            raise ValueError("a stored time is not in the form medvault writes")
        parsed = parse(value)
        if not isinstance(parsed, datetime) or (not shaped and render(parsed) != value):
            raise ValueError("a stored time is not in the form medvault writes")
        return parsed

    return exact


class StoredTime(sa.types.TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` whose stored value, unless it is the exact text
    medvault writes, reads as :data:`UNREADABLE_TIME` instead of failing the fetch or
    being trusted (SQLite; PostgreSQL returns times itself, and this adds nothing there).

    ``where`` names the column (``table.column``) in the log line; it is set when the
    column joins its table (``_name_stored_time``)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True
    where = "a time column"

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        """The dialect's exact parser, made total (see the class docstring)."""
        parse = exact_time_parser(self.impl_instance, dialect)
        if parse is None:
            return None
        where = self.where

        def process(value: object) -> object:
            if value is None:
                return None
            try:
                return parse(value)
            except (ValueError, TypeError, OverflowError):
                # Table and column only: the value is the database writer's.
                log.warning(
                    "stored time on %s is not in the form medvault writes (written "
                    "outside medvault); read as the 1970 placeholder, the row does not "
                    "verify",
                    where,
                )
                return UNREADABLE_TIME

        return process


@sa.event.listens_for(sa.Column, "after_parent_attach")
def _name_stored_time(column: sa.Column[Any], table: object) -> None:
    """Let a ``StoredTime`` name its column in its log line."""
    if isinstance(column.type, StoredTime) and isinstance(table, sa.Table):
        column.type.where = f"{table.name}.{column.name}"
