"""Values PostgreSQL holds that psycopg cannot load, read as a marker: :func:`lenient_loads`.

PostgreSQL stores values Python cannot hold: ``infinity`` and years up to 294276 (or
BC) in a ``timestamptz``, an interval past ``timedelta``, a json number of 5000 digits
or arrays nested 3000 deep (``json.loads`` raises ValueError, RecursionError). A
database writer may set a time column to such a value, or give any column such a type
(``ALTER TABLE ... ALTER COLUMN ... TYPE``). psycopg fails the whole fetch on the first
one, often with the value in its message: one forged row made every read that met it
an outage (a grant check, a listing, the officer's queue) and put the value into a
logged traceback. Under :func:`lenient_loads` such a value reads as :data:`UNLOADABLE`
instead, which no strict read accepts (``storage.row_values``, ``storage.audit_rows``):
its row takes its store's tampered path, and the other rows read.

Every value psycopg can load is still loaded by psycopg's own loader for its type, so
a genuine row reads exactly as before. The stores read their PostgreSQL rows under
this (``storage.sql_engine.run_in_transaction`` and ``translated_change``, and the
stores that connect themselves); the audit trail and the backup snapshot under
``storage.audit_sql.rows_as_read``, which adds SQLite's ``text_as_read``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import cache
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from psycopg.adapt import Loader


class Unloadable:
    """What a value PostgreSQL holds and psycopg cannot load reads as (a date or time
    outside years 1 to 9999 or ``infinity``, an interval past ``timedelta``, json too
    deep or with a number too long for ``json.loads``, ...), where psycopg would fail
    the whole fetch: no strict read accepts it, so its field is malformed. It keeps
    nothing of the value."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Unloadable()"


UNLOADABLE: Final = Unloadable()


def lenient_loads(connection: Connection) -> AbstractContextManager[None]:
    """On PostgreSQL, a value psycopg cannot load reads as :data:`UNLOADABLE` in the
    queries run on ``connection`` in this block; elsewhere (SQLite) nothing changes.

    Only the connection's cursor factories change, for the block (its loaders never
    do). A client-side cursor (every read but a streamed one) loads its rows with
    psycopg's own loaders and, only if one raises, loads the same result again through
    wrappers that read :data:`UNLOADABLE` where the loader raises (:func:`_lenient`):
    genuine rows cost one ``try`` per fetch, where wrapping every query's loaders up
    front (psycopg rebuilds the cursor's row loaders at each one) cost 60 to 300 us per
    query of a 16-column row: +54 % CPU on the grant check and record row read that
    every GetRecord runs (2,000 reads, session 10), against no difference measurable
    above noise this way. A server-side cursor (``stream_results``, whose
    rows are fetched from the server and loaded in one step) has its loaders wrapped as
    soon as its result's column types are known, once per query (psycopg >= 3.3 allows
    changing them then). psycopg's ``Cursor.stream`` is not covered; nothing here uses it.
    """
    raw = connection.connection.dbapi_connection
    # psycopg is imported only where it is the driver: a SQLite deployment (and every
    # process start) does not pay its import (~50 ms).
    if not type(raw).__module__.startswith("psycopg"):
        return _NOTHING
    return _LenientFactories(raw)


_NOTHING: Final = nullcontext()


class _LenientFactories:
    """The connection's cursor factories made lenient for a block, then restored.

    A class rather than a generator: ``run_in_transaction`` enters one per call, and
    ``contextmanager``'s machinery cost about 3 us of the 4 us it took there.
    """

    __slots__ = ("_before", "_raw")

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._before: tuple[Any, Any] = (raw.cursor_factory, raw.server_cursor_factory)

    def __enter__(self) -> None:
        client, server = self._before
        self._raw.cursor_factory = _lenient_cursor(client)
        self._raw.server_cursor_factory = _lenient_cursor(server)

    def __exit__(self, *_exc: object) -> None:
        self._raw.cursor_factory, self._raw.server_cursor_factory = self._before


@cache
def _lenient_cursor(base: type[Any]) -> type[Any]:
    """``base`` (the connection's cursor class), loading its results leniently; itself
    if it does already (a block inside another)."""
    from psycopg import ServerCursor  # noqa: PLC0415  (only on PostgreSQL: see lenient_loads)

    if getattr(base, "_medvault_lenient", False):
        return base
    lenient = _server_cursor(base) if issubclass(base, ServerCursor) else _client_cursor(base)
    lenient.__name__ = lenient.__qualname__ = f"Lenient{base.__name__}"
    return lenient


def _server_cursor(base: type[Any]) -> type[Any]:
    """A server-side cursor whose loaders are lenient as soon as its query has run (it
    fetches and loads rows in one step: a failed load cannot be tried again)."""

    class LenientServerCursor(base):  # type: ignore[misc]
        __slots__ = ()
        _medvault_lenient = True

        def execute(self, *args: Any, **kwargs: Any) -> Any:
            done = super().execute(*args, **kwargs)
            _load_leniently(self)
            return done

    return LenientServerCursor


def _client_cursor(base: type[Any]) -> type[Any]:
    """A client-side cursor (its result all received) whose fetches are psycopg's; if a
    loader raises, the same rows are fetched again with every loader lenient (psycopg
    moves its position only after loading). The first error is dropped, never chained:
    its message may hold the value. A fetch that failed for another reason (no result)
    fails again."""

    class LenientCursor(base):  # type: ignore[misc]
        __slots__ = ()
        _medvault_lenient = True

        def fetchone(self) -> Any:
            try:
                return super().fetchone()
            except Exception:  # noqa: BLE001, S110  (RecursionError too: json nested deep)
                pass
            _load_leniently(self)
            return super().fetchone()

        def fetchmany(self, size: int = 0) -> Any:
            try:
                return super().fetchmany(size)
            except Exception:  # noqa: BLE001, S110
                pass
            _load_leniently(self)
            return super().fetchmany(size)

        def fetchall(self) -> Any:
            try:
                return super().fetchall()
            except Exception:  # noqa: BLE001, S110
                pass
            _load_leniently(self)
            return super().fetchall()

        def __next__(self) -> Any:
            row = self.fetchone()  # psycopg's rows are never None
            if row is None:
                raise StopIteration
            return row

    return LenientCursor


def _load_leniently(cursor: Any) -> None:
    """Each type of ``cursor``'s result loaded by a lenient wrapper of its loader.

    Both formats: a server-side cursor's described result says text whatever it
    fetches in. A type with no loader gets psycopg's fallback (that of oid 0), wrapped.
    """
    from psycopg.pq import Format  # noqa: PLC0415  (only on PostgreSQL: see lenient_loads)

    result = cursor.pgresult
    if result is None or not result.nfields:
        return
    adapters = cursor.adapters
    for oid in {result.ftype(i) for i in range(result.nfields)}:
        for fmt in (Format.TEXT, Format.BINARY):
            base = adapters.get_loader(oid, fmt) or adapters.get_loader(_UNKNOWN_OID, fmt)
            if base is not None:
                adapters.register_loader(oid, _lenient(base))


_UNKNOWN_OID: Final = 0  # psycopg's INVALID_OID: its loaders of a type it does not know


@cache
def _lenient(base: type[Loader]) -> type[Loader]:
    """``base`` (psycopg's loader of a type, in one format), reading ``UNLOADABLE``
    where it raises (a DataError's message, dropped here, holds the value); itself if
    it is such a wrapper already."""

    from psycopg.abc import AdaptContext, Buffer  # noqa: PLC0415  (see lenient_loads)
    from psycopg.adapt import Loader  # noqa: PLC0415

    if getattr(base, "_medvault_lenient", False):
        return base

    class Lenient(Loader):
        format = base.format
        _medvault_lenient = True

        def __init__(self, oid: int, context: AdaptContext | None = None) -> None:
            super().__init__(oid, context)
            self._load = base(oid, context).load

        def load(self, data: Buffer) -> Any:
            try:
                return self._load(data)
            except Exception:  # noqa: BLE001  (RecursionError too: the value is the cause)
                return UNLOADABLE

    Lenient.__name__ = Lenient.__qualname__ = f"Lenient{base.__name__}"
    return Lenient
