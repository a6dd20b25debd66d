"""A row's values, accepted only as the types medvault writes: :class:`RowValues`.

A database writer chooses the type of a value, not only its content. SQLite keeps any
value in any column whatever the column's declared type (an integer in a BLOB column;
text, a blob or a real in an INTEGER one; a blob in a text one), and a PostgreSQL writer
can change a column's type (``ALTER TABLE ... ALTER COLUMN ... TYPE``). The drivers hand
such a value back as it is, and the usual conversions are unsafe on it: ``bytes(n)`` of
an integer allocates n zero bytes (``UPDATE records SET patient_index = 10000000000``
made one read of that row ask for 10 GB), ``int()`` of text raises with the text in its
message, and text used as a number, or a number as text, ends in an internal error.

So the stores read their rows through :class:`RowValues`: each accessor accepts only
what medvault stores (``bytes`` for a binary column, or the ``bytearray`` or
``memoryview`` some drivers return; an ``int`` that is not a ``bool`` for an integer
column; ``str`` for text; a ``datetime`` for a time) and otherwise notes the column in
``malformed`` (its name, never its value) and returns a placeholder: a value of the
right type that a writer could have stored anyway and that no genuine row holds
(``b""``, ``0``, ``""``, :data:`storage.sqlite_text.UNREADABLE_TIME`). Never ``None``,
which means something in a nullable column (a grant not revoked). Nothing is coerced,
so a genuine row reads as before, at the cost of one type check per value.

A row with a malformed value takes its store's tampered path: a record row fails
verification (``storage.row_auth``: DATA_LOSS, reported), a grant grants nothing and is
reported, a signature does not unseal, the rewrap counts the row as failed, a request
key names no earlier put, a ``kek_versions`` row names no KEK, a ``scheduled_work`` row
is no run, a ``backup_runs`` row is a failed run. On PostgreSQL a value psycopg cannot
load reads as ``storage.pg_loads.UNLOADABLE``, of no type accepted here: malformed too
(the stores read under ``pg_loads.lenient_loads``). The audit trail's rows are read as
strictly by ``storage.audit_rows``, and the backup snapshot refuses a row holding such a
value (``storage.backup.snapshot``: it copies rows, so it reads no placeholder).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from storage.sqlite_text import UNREADABLE_TIME

# A record version is a 4-byte integer: the column's type, and its width in a record's
# associated data (``storage.row_auth.associated_data``, ``int.to_bytes(4)``). A KEK
# version too (an Integer column; the token numbers from 1).
MAX_VERSION: Final = (1 << 31) - 1


class RowValues:
    """Reads one row's columns by name; ``malformed`` names those of another type."""

    __slots__ = ("_row", "malformed")

    def __init__(self, row: Mapping[Any, Any]) -> None:
        self._row = row
        self.malformed: list[str] = []

    def _bad(self, name: str) -> None:
        self.malformed.append(name)

    def binary(self, name: str) -> bytes:
        """A binary column: its bytes, or ``b""`` (malformed)."""
        value = self._row[name]
        if type(value) is bytes:
            return value
        if isinstance(value, bytearray | memoryview):  # a copy of the buffer's own size
            return bytes(value)
        self._bad(name)  # never bytes(value): of an integer n, n zero bytes
        return b""

    def optional_binary(self, name: str) -> bytes | None:
        """A nullable binary column: None, its bytes, or ``b""`` (malformed)."""
        return None if self._row[name] is None else self.binary(name)

    def integer(self, name: str) -> int:
        """An integer column: its value, or 0 (malformed). A bool is not an integer here
        (a PostgreSQL column altered to boolean)."""
        value = self._row[name]
        if type(value) is int:
            return value
        self._bad(name)
        return 0

    def optional_integer(self, name: str) -> int | None:
        """A nullable integer column: None, its value, or 0 (malformed)."""
        return None if self._row[name] is None else self.integer(name)

    def version(self, name: str) -> int:
        """A record or KEK version: 1 to :data:`MAX_VERSION`, or 0 (malformed). Another
        integer names no version: 0, a negative one, or one past 32 bits in a column a
        PostgreSQL writer retyped (a KEK version there was the token's "key not found")."""
        value = self._row[name]
        if type(value) is int and 0 < value <= MAX_VERSION:
            return value
        self._bad(name)
        return 0

    def optional_version(self, name: str) -> int | None:
        """A nullable record version (what a version supersedes): None, or as ``version``."""
        return None if self._row[name] is None else self.version(name)

    def text(self, name: str) -> str:
        """A text column: its value, or ``""`` (malformed). Text that is not UTF-8, read
        under ``storage.sqlite_text.text_as_read``, is not a ``str``: malformed too."""
        value = self._row[name]
        if type(value) is str:
            return value
        self._bad(name)
        return ""

    def optional_text(self, name: str) -> str | None:
        """A nullable text column: None, its value, or ``""`` (malformed)."""
        return None if self._row[name] is None else self.text(name)

    def time(self, name: str) -> datetime:
        """A time column, in UTC (SQLite returns naive UTC), or the placeholder
        ``UNREADABLE_TIME`` (malformed; ``StoredTime`` reads a time that does not parse
        as that placeholder too, without noting it)."""
        value = self._row[name]
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        self._bad(name)
        return UNREADABLE_TIME

    def optional_time(self, name: str) -> datetime | None:
        """A nullable time column: None, its time, or ``UNREADABLE_TIME`` (malformed)."""
        return None if self._row[name] is None else self.time(name)

    def boolean(self, name: str) -> bool:
        """A boolean column: its value, or False (malformed). SQLite's driver value is
        made a bool by SQLAlchemy whatever it was; PostgreSQL's is a bool unless the
        column's type was changed."""
        value = self._row[name]
        if type(value) is bool:
            return value
        self._bad(name)
        return False
