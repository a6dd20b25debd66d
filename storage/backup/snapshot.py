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
from storage.audit_rows import TimeParser, Unloadable, read_head
from storage.audit_sql import rows_as_read, time_parser
from storage.backup import SnapshotLoadError, SourceIntegrityError
from storage.backup.manifest import ManifestObject
from storage.sql_metadata import metadata
from storage.sqlite_text import StoredTime, Undecodable

ALEMBIC = "alembic_version"
# Parents before children (record_signatures and record_index reference records).
_ORDER = (
    "kek_versions", "records", "record_index", "record_signatures", "access_grants",
    "audit_events", "audit_head", "audit_checkpoints",
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


def _check_read(table: str, row: dict[str, Any]) -> None:
    """Text that is not UTF-8 (SQLite stores any bytes a database writer casts to text)
    and a value psycopg cannot load (PostgreSQL stores ``infinity``, years past 9999,
    json deeper than ``json.loads`` goes) fail the backup by table and column: the
    drivers' own errors would carry the value into a logged traceback. Read by
    ``rows_as_read`` (``SnapshotExport``)."""
    for marker, what in ((Undecodable, "text that is not UTF-8"),
                         (Unloadable, "a value the driver cannot load")):  # fmt: skip
        bad = [name for name, value in row.items() if isinstance(value, marker)]
        if bad:
            raise SourceIntegrityError(
                f"a {table} row holds {what} ({', '.join(bad)}), backup not completed: "
                "the database was written outside medvault; run `medvault audit verify` "
                "and restore the row from an earlier backup (docs/operations.md)"
            )


def _is_time(column: sa.Column[Any]) -> bool:
    return isinstance(column.type, sa.DateTime | StoredTime)


def _select(table: sa.Table) -> sa.Select[Any]:
    """All of ``table``'s columns, its times untyped: each is parsed by ``_check_times``,
    so that one that does not parse fails the backup by column, neither failing the fetch
    (with the value in the error) nor read as ``StoredTime``'s placeholder, which the
    snapshot would then copy in place of what the database holds."""
    return sa.select(*(
        sa.type_coerce(c, sa.types.NullType()).label(c.name) if _is_time(c) else c
        for c in table.c
    )).order_by(*table.primary_key.columns)  # fmt: skip


def _check_times(table: sa.Table, row: dict[str, Any], parse: TimeParser) -> None:
    """Parse ``row``'s times in place (SQLite keeps text; PostgreSQL returns datetimes);
    one that is not a time fails the backup, naming table and columns only."""
    bad = []
    for column in table.c:
        value = row[column.name]
        if value is None or not _is_time(column):
            continue
        try:
            if isinstance(value, str) and parse is not None:
                value = parse(value)
        except (ValueError, TypeError, OverflowError):
            value = None
        if not isinstance(value, datetime):
            bad.append(column.name)
        row[column.name] = value
    if bad:
        raise SourceIntegrityError(
            f"a {table.name} row holds a time that does not parse or is not in the form "
            f"medvault writes ({', '.join(bad)}), "
            "backup not completed: the database was written outside medvault; run "
            "`medvault audit verify` and restore the row from an earlier backup "
            "(docs/operations.md)"
        )


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
        stats.objects.append(
            ManifestObject(object_key=key, sha256=bytes(digest).hex(), size=size)
        )
        stats.bytes += size
    elif table == "audit_head":
        sequence, head_hash = read_head(row["sequence"], row["hash"])
        stats.audit_head = {"sequence": sequence, "hash": head_hash.hex()}


def _lines(connection: Connection, stats: SnapshotStats) -> Iterator[bytes]:
    stats.revision = connection.scalar(sa.select(_alembic.c.version_num)) or ""
    yield _line(ALEMBIC, {"version_num": stats.revision})
    parse = time_parser(connection.dialect)
    for table in tables():
        result = connection.execution_options(stream_results=True, yield_per=_BATCH).execute(
            _select(table)
        )
        count = 0
        for row in result.mappings():
            values = dict(row)
            _check_read(table.name, values)
            _check_times(table, values, parse)
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
    except (ValueError, KeyError, TypeError) as e:
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


def load(engine: Engine, chunks: Iterable[bytes]) -> dict[str, int]:
    """Load a snapshot into an EMPTY database migrated to the snapshot's revision.

    One transaction: on any error nothing is loaded. Returns the rows per table.
    """
    known = {t.name: t for t in tables()}
    counts = {name: 0 for name in known}
    batch: list[dict[str, Any]] = []
    current: sa.Table | None = None
    with engine.begin() as connection:
        lines = decoded_lines(chunks)
        first = next(lines, None)
        if first is None or first[0] != ALEMBIC:
            raise SnapshotLoadError("snapshot does not start with its schema revision")
        _prepare(connection, str(first[1].get("version_num")))
        for name, row in lines:
            table = known.get(name)
            if table is None:
                raise SnapshotLoadError(f"snapshot holds unknown table {name!r}")
            if table is not current or len(batch) >= _BATCH:
                _flush(connection, current, batch)
                current = table
            batch.append(row)
            counts[name] += 1
        _flush(connection, current, batch)
    return counts


def _flush(connection: Connection, table: sa.Table | None, batch: list[dict[str, Any]]) -> None:
    if table is not None and batch:
        connection.execute(table.insert(), batch)
    batch.clear()
