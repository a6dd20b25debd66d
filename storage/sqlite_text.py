"""Text a SQLite file hands back, whatever a database writer put in it.

A database writer (write access to the file, no token) controls the bytes of every
text value, and can rebuild the file.

* **The file's encoding.** SQLite compares text in the file's encoding: a file rebuilt
  with ``PRAGMA encoding='UTF-16le'`` orders text otherwise than the UTF-8 medvault
  writes and pages by (a newest-first audit listing then pages forever). Every new
  connection checks ``PRAGMA encoding`` and refuses anything but UTF-8
  (:class:`DatabaseEncodingError`), so the service does not start on such a file and
  no operator command opens it. A new, empty file reports UTF-8 and is created so.

PostgreSQL keeps its database's encoding: there, this adds nothing.
"""

from __future__ import annotations

from typing import Any, Final

from storage.errors import DatabaseUnreachableError

ENCODING: Final = "UTF-8"


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
