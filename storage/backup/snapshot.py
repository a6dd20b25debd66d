"""A consistent logical snapshot of the metadata database: gzip'd JSON lines.

Format (one JSON object per line, the first being the schema revision)::

    {"table": "alembic_version", "row": {"version_num": "0005"}}
    {"table": "records", "row": {"id": "...", "wrapped_dek": {"$b64": "..."},
                                 "created_at": {"$dt": "2026-01-31T02:00:00+00:00"}, ...}}

Bytes are ``{"$b64": ...}``, datetimes ``{"$dt": ISO-8601 with offset}`` (UTC). Every
table is read in ONE read transaction, REPEATABLE READ on PostgreSQL and a deferred
transaction on SQLite (WAL: a reader sees one snapshot from its first read to its end),
so the rows agree with each other: every records row's object exists (objects are
written before their row and never changed), the audit head matches the events. Rows
are streamed (a server-side cursor on PostgreSQL), so memory stays bounded. The same
code path runs on both backends, and a snapshot of either loads into either.

Each row is checked as it is read, and a row medvault never writes fails the backup by
table and columns or constraint, never by value: each value against its column's type
(:mod:`storage.backup.column_types`), then the row against the schema's constraints as
PostgreSQL and SQLite enforce them (:mod:`storage.backup.constraints`), so that a backup
that completes also loads into either. A restore checks every row the same way first.

No plaintext: the rows are what the database holds (wrapped keys, blind indexes,
sealed fields, audit events that carry no patient data).
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

# Registers their tables on the shared MetaData.
import storage.audit_log
import storage.grants
import storage.signatures  # noqa: F401
from storage.audit_rows import TimeParser, read_head
from storage.audit_sql import rows_as_read, time_parser
from storage.backup import SnapshotLoadError, SourceIntegrityError
from storage.backup.column_types import column_kind, columns, holds
from storage.backup.constraints import RowConstraints, Violation, load_refusal
from storage.backup.manifest import ManifestObject
from storage.pg_loads import Unloadable
from storage.sql_metadata import metadata
from storage.sqlite_text import Undecodable

ALEMBIC = "alembic_version"
# Parents before children (record_signatures and record_index reference records).
_ORDER = (
    "kek_versions",
    "records",
    "record_index",
    "record_signatures",
    "access_grants",
    "audit_events",
    "audit_head",
    "audit_checkpoints",
)
# Rows a freshly migrated database already has, replaced by the snapshot's.
_REPLACED = frozenset({"audit_head", "kek_versions"})
_BATCH = 500
_FLUSH = 256 * 1024
_alembic = sa.table(ALEMBIC, sa.column("version_num", sa.String))


def tables() -> list[sa.Table]:
    """The backed-up tables in load order (the design's list; a new table is added here
    on purpose, never picked up by accident: ``backup_runs`` is scheduler state)."""
    return [metadata.tables[name] for name in _ORDER]


@dataclass
class SnapshotStats:
    """What an export saw, filled in as it streams: counts, audit head, record objects."""

    tables: dict[str, int] = field(default_factory=dict)
    revision: str = ""
    audit_head: dict[str, Any] = field(default_factory=dict)
    objects: list[ManifestObject] = field(default_factory=list)
    bytes: int = 0


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite: naive UTC
        return {"$dt": aware.astimezone(UTC).isoformat()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "$b64" in value:
            return base64.b64decode(value["$b64"], validate=True)
        if "$dt" in value:
            return datetime.fromisoformat(value["$dt"]).astimezone(UTC)
        raise ValueError("unknown encoded value")
    return value


def _line(table: str, row: dict[str, Any]) -> bytes:
    doc = {"table": table, "row": {k: _encode(v) for k, v in row.items()}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _begin_snapshot(connection: Connection) -> None:
    """Start the one read transaction (the only per-dialect step)."""
    if connection.dialect.name == "sqlite":
        # pysqlite opens no transaction for SELECTs; without BEGIN each query would
        # read its own snapshot.
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")


def _refuse(table: str, what: str, columns: list[str]) -> SourceIntegrityError:
    return _refused(Violation(table, what, tuple(columns)))


def _refused(violation: Violation) -> SourceIntegrityError:
    return SourceIntegrityError(
        f"{violation}, backup not completed: the database was written outside medvault; run "
        "`medvault audit verify` and restore the row from an earlier backup (docs/operations.md)"
    )


def _check_read(table: sa.Table, row: dict[str, Any], parse: TimeParser) -> None:
    """Fail the backup by table and columns, never by value, on a row medvault never
    writes; parse its times and make its booleans ``bool`` in place (SQLite keeps times
    as text and booleans as 0/1).

    In this order: text that is not UTF-8 (SQLite stores any bytes a database writer
    casts to text) and a value psycopg cannot load (PostgreSQL stores ``infinity``, years
    past 9999, json deeper than ``json.loads`` goes), read by ``rows_as_read``
    (``SnapshotExport``): the drivers' own errors would carry the value into a logged
    traceback; then a time that does not parse; then a value of another type than its
    column's declared one (SQLite keeps any type in any column, and a PostgreSQL writer
    can ``ALTER COLUMN ... TYPE``), which the snapshot would otherwise copy as it is,
    for the restore to fail on it with the value in the error.
    """
    for marker, what in ((Undecodable, "text that is not UTF-8"),
                         (Unloadable, "a value the driver cannot load")):  # fmt: skip
        bad = [name for name, value in row.items() if isinstance(value, marker)]
        if bad:
            raise _refuse(table.name, what, bad)
    times, other = [], []
    for name, kind, nullable in columns(table):
        value = row[name]
        if kind == "time" and value is not None:
            value = _parsed(value, parse)
            if value is None:
                times.append(name)
                continue
        elif kind == "boolean" and type(value) is int and value in {0, 1}:
            value = bool(value)  # SQLite's storage of a boolean
        row[name] = value
        if not holds(kind, nullable, value):
            other.append(name)
    if times:
        raise _refuse(
            table.name, "a time that does not parse or is not in the form medvault writes", times
        )
    if other:
        raise _refuse(table.name, "a value of another type than its column's", other)


def _parsed(value: object, parse: TimeParser) -> datetime | None:
    try:
        if isinstance(value, str) and parse is not None:
            value = parse(value)
    except (ValueError, TypeError, OverflowError):
        return None
    return value if isinstance(value, datetime) else None


def _untyped(column: sa.Column[Any]) -> bool:
    return column_kind(column) in {"time", "boolean"}


def _select(table: sa.Table) -> sa.Select[Any]:
    """All of ``table``'s columns, its times and booleans untyped: each is checked by
    ``_check_read``, so that a time that does not parse fails the backup by column,
    neither failing the fetch (with the value in the error) nor read as ``StoredTime``'s
    placeholder, and a boolean is seen as stored (SQLAlchemy makes any value a bool on
    SQLite): the snapshot must not copy another value than the database holds."""
    return sa.select(*(
        sa.type_coerce(c, sa.types.NullType()).label(c.name) if _untyped(c) else c
        for c in table.c
    )).order_by(*table.primary_key.columns)  # fmt: skip


def _observe(stats: SnapshotStats, table: str, row: dict[str, Any]) -> None:
    """Note what the manifest needs from ``row``, read as strictly as the service reads it.

    A database writer's row is not coerced: ``bytes(n)`` of an integer would allocate n
    bytes, and ``int()`` would truncate. A records row that no writer stores fails the
    backup (``SourceIntegrityError``, as a corrupt object does), and so does a malformed
    audit head (``AuditHeadMalformedError``); messages name fields, never values.
    """
    if table == "records":
        key, digest, size = row["object_key"], row["ciphertext_sha256"], row["stored_size"]
        bad = [
            name for name, ok in (
                ("object_key", type(key) is str and key != ""),
                ("ciphertext_sha256",
                 isinstance(digest, bytes | bytearray | memoryview) and len(digest) == 32),
                ("stored_size", type(size) is int and size >= 0),
            ) if not ok
        ]  # fmt: skip
        if bad:
            raise SourceIntegrityError(
                f"a records row is malformed ({', '.join(bad)}), backup not completed; "
                "restore the row from an earlier backup (docs/operations.md)"
            )
        stats.objects.append(ManifestObject(object_key=key, sha256=bytes(digest).hex(), size=size))
        stats.bytes += size
    elif table == "audit_head":
        sequence, head_hash = read_head(row["sequence"], row["hash"])
        stats.audit_head = {"sequence": sequence, "hash": head_hash.hex()}


def _lines(connection: Connection, stats: SnapshotStats) -> Iterator[bytes]:
    revision = connection.scalar(sa.select(_alembic.c.version_num))
    if revision is not None and type(revision) is not str:
        raise _refuse(ALEMBIC, "a value of another type than its column's", ["version_num"])
    stats.revision = revision or ""
    yield _line(ALEMBIC, {"version_num": stats.revision})
    parse = time_parser(connection.dialect)
    with RowConstraints(tables()) as constraints:
        for table in tables():
            result = connection.execution_options(stream_results=True, yield_per=_BATCH).execute(
                _select(table)
            )
            count = 0
            for row in result.mappings():
                values = dict(row)
                _check_read(table, values, parse)
                if violation := constraints.check(table, values):
                    raise _refused(violation)
                _observe(stats, table.name, values)
                count += 1
                yield _line(table.name, values)
            stats.tables[table.name] = count


class SnapshotExport:
    """Iterate to get the gzip bytes; ``stats`` is complete once iteration ends."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.stats = SnapshotStats()

    def __iter__(self) -> Iterator[bytes]:
        gz = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: the gzip container
        buffer = bytearray()
        # pysqlite knows no REPEATABLE READ; SQLite is serializable anyway.
        sqlite = self._engine.dialect.name == "sqlite"
        level = "SERIALIZABLE" if sqlite else "REPEATABLE READ"
        connection = self._engine.connect().execution_options(isolation_level=level)
        with connection, connection.begin(), rows_as_read(connection):
            _begin_snapshot(connection)
            for line in _lines(connection, self.stats):
                buffer += gz.compress(line)
                if len(buffer) >= _FLUSH:
                    yield bytes(buffer)
                    buffer.clear()
        buffer += gz.flush()
        yield bytes(buffer)


def export(engine: Engine) -> SnapshotExport:
    """A snapshot of every medvault table (see the module docstring for the format)."""
    return SnapshotExport(engine)


def decoded_lines(chunks: Iterable[bytes]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (table, row) pairs of a gzipped snapshot, one line at a time.

    ``SnapshotLoadError`` names the first malformed line; a restore also reads a
    snapshot with this before loading it (the KEK versions its records need).
    """
    gz = zlib.decompressobj(31)
    pending = b""
    number = 0
    for chunk in chunks:
        pending += gz.decompress(chunk)
        *lines, pending = pending.split(b"\n")
        for line in lines:
            number += 1
            yield _parse(line, number)
    pending += gz.flush()
    if not gz.eof:
        raise SnapshotLoadError("snapshot is truncated (gzip stream incomplete)")
    if pending.strip():
        yield _parse(pending, number + 1)


def _parse(line: bytes, number: int) -> tuple[str, dict[str, Any]]:
    try:
        doc = json.loads(line)
        return str(doc["table"]), {k: _decode(v) for k, v in doc["row"].items()}
    except (ValueError, KeyError, TypeError, OverflowError) as e:  # Overflow: a time past 9999
        raise SnapshotLoadError(f"snapshot line {number} is malformed") from e


def _prepare(connection: Connection, revision: str) -> None:
    """Check the target: same schema revision, no data; drop the rows a migration seeds."""
    current = connection.scalar(sa.select(_alembic.c.version_num))
    if current != revision:
        raise SnapshotLoadError(
            f"snapshot is at schema revision {revision!r}, the database at {current!r}; "
            "migrate the database to the snapshot's revision first"
        )
    for table in tables():
        if table.name in _REPLACED:
            connection.execute(table.delete())
        elif connection.scalar(sa.select(sa.func.count()).select_from(table)):
            raise SnapshotLoadError(
                f"table {table.name} is not empty; a snapshot loads into an empty database"
            )


def checked_rows(
    lines: Iterable[tuple[str, dict[str, Any]]],
) -> Iterator[tuple[sa.Table, dict[str, Any]]]:
    """The (table, row) pairs of ``lines`` (after the revision line), each row checked
    against its table: its columns, the type of each value (``holds``), then the
    schema's constraints (``RowConstraints``, as the export checks them).

    A snapshot written before the export checked these can hold a database writer's
    value of another type or a row breaking a constraint; ``int()`` of it, or a
    PostgreSQL target refusing it, would put the value in the error.
    ``SnapshotLoadError`` names table and columns or constraint instead.
    """
    known = {t.name: t for t in tables()}
    with RowConstraints(tables()) as constraints:
        for name, row in lines:
            table = known.get(name)
            if table is None:
                raise SnapshotLoadError(f"snapshot holds unknown table {name!r}")
            if set(row) != set(table.c.keys()):
                raise SnapshotLoadError(
                    f"a {name} row of the snapshot has other columns than the table's"
                )
            wrong = tuple(name for name, kind, nullable in columns(table)
                          if not holds(kind, nullable, row[name]))  # fmt: skip
            violation = (Violation(name, "a value of another type than its column's", wrong)
                         if wrong else constraints.check(table, row))  # fmt: skip
            if violation:
                raise SnapshotLoadError(
                    f"{violation} in the snapshot, which cannot be restored: restore an "
                    "earlier backup (docs/operations.md)"
                )
            yield table, row


def load(engine: Engine, chunks: Iterable[bytes]) -> dict[str, int]:
    """Load a snapshot into an EMPTY database migrated to the snapshot's revision.

    One transaction: on any error nothing is loaded. Returns the rows per table.
    """
    counts = {t.name: 0 for t in tables()}
    batch: list[dict[str, Any]] = []
    current: sa.Table | None = None
    with engine.begin() as connection:
        lines = decoded_lines(chunks)
        first = next(lines, None)
        if first is None or first[0] != ALEMBIC or type(first[1].get("version_num")) is not str:
            raise SnapshotLoadError("snapshot does not start with its schema revision")
        _prepare(connection, first[1]["version_num"])
        for table, row in checked_rows(lines):
            if table is not current or len(batch) >= _BATCH:
                _flush(connection, current, batch)
                current = table
            batch.append(row)
            counts[table.name] += 1
        _flush(connection, current, batch)
    return counts


def _flush(connection: Connection, table: sa.Table | None, batch: list[dict[str, Any]]) -> None:
    """Insert ``batch``; the database's refusal is named without the rows' values (not
    chained: PostgreSQL's detail quotes them, and a logged traceback would show it)."""
    if table is not None and batch:
        try:
            connection.execute(table.insert(), batch)
        except (sa.exc.IntegrityError, sa.exc.DataError) as e:  # refused rows; not outages
            raise SnapshotLoadError(
                f"{load_refusal(table.name, e)}; nothing was loaded. The target's schema is "
                "not the snapshot's: restore into a database medvault migrated and nothing "
                "else changed, or restore an earlier backup (docs/operations.md)"
            ) from None
    batch.clear()
