"""``MetadataStore`` on SQL with SQLAlchemy 2 Core: SQLite (embedded) or PostgreSQL.

Times are stored in UTC. SQLite keeps no zone, so every datetime is converted to UTC
before it is written or compared and made UTC-aware again when it is read.
Database errors are translated here: unreachable or read-only (PostgreSQL standby,
``default_transaction_read_only``; an unwritable SQLite file) ->
``BackendUnavailableError`` naming the host (never a row's data), duplicate version ->
``RecordConflictError``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, Row

from storage import sqlite_guard, sqlite_text
from storage.errors import (
    BackendUnavailableError,
    DatabaseUnreachableError,
    InvalidRecordError,
    KekRetiredError,
    RecordConflictError,
    RecordNotFoundError,
    SchemaRevisionError,
    StorageError,
)
from storage.index import STUDY_UID, IndexEntry
from storage.interfaces import IndexFilter, ListCursor, StoredRecord
from storage.migration_lock import migration_lock
from storage.model import RecordKind
from storage.row_values import RowValues
from storage.sqlite_text import StoredTime

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The newest revision in migrations/versions/, which a new migration replaces here (a
# unit test compares it with Alembic's head): a database already there needs no
# migration, and start-up then leaves Alembic unimported (upgrade).
SCHEMA_HEAD = "0014"
# SQLSTATE read_only_sql_transaction: a standby or default_transaction_read_only=on.
READ_ONLY_SQLSTATE = "25006"
_IN_BATCH = 500  # bound the IN (...) list; SQLite caps bound parameters per statement

T = TypeVar("T")

metadata = sa.MetaData()

# The schema as queries see it; storage/migrations/versions/ is how it came to be.
records = sa.Table(
    "records",
    metadata,
    sa.Column("id", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("content_type", sa.String(255), nullable=False),
    sa.Column("patient_index", sa.LargeBinary(32), nullable=False),
    sa.Column("sealed_meta", sa.LargeBinary, nullable=False),
    sa.Column("object_key", sa.String(255), nullable=False),
    sa.Column("kek_version", sa.Integer, nullable=False),
    sa.Column("wrapped_dek", sa.LargeBinary, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("stored_size", sa.BigInteger, nullable=False),
    sa.Column("ciphertext_sha256", sa.LargeBinary(32), nullable=False),
    sa.Column("segment_size", sa.Integer, nullable=False),
    sa.Column("created_at", StoredTime(), nullable=False),
    sa.Column("created_by", sa.String(255), nullable=False),
    sa.Column("supersedes_version", sa.Integer, nullable=True),
    sa.PrimaryKeyConstraint("id", "version", name="pk_records"),
    sa.UniqueConstraint("object_key", name="uq_records_object_key"),
    sa.Index("ix_records_patient_created", "patient_index", "created_at"),
    sa.Index("ix_records_kek_version", "kek_version"),
)


# Searchable fields of each record version (migration 0013; storage/index.py says what
# they are). Written with the record row, in its transaction. ``patient_index`` is the
# record's keyed blind index; the other columns are codes, UIDs, dates and modality in
# clear (docs/formats.md). Searches return only record rows that verify.
record_index = sa.Table(
    "record_index",
    metadata,
    sa.Column("record_id", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("patient_index", sa.LargeBinary(32), nullable=False),
    sa.Column("field", sa.String(32), nullable=False),
    sa.Column("value", sa.String(128), nullable=False),
    sa.Column("system", sa.String(255), nullable=True),
    sa.Column("quantity", sa.String(64), nullable=True),
    sa.Column("unit", sa.String(64), nullable=True),
    sa.Column("observed_at", sa.String(64), nullable=True),
    sa.ForeignKeyConstraint(
        ["record_id", "version"], ["records.id", "records.version"],
        name="fk_record_index_records",
    ),
    sa.Index("ix_record_index_record", "record_id", "version"),
    sa.Index("ix_record_index_field_value", "field", "value"),
    sa.Index("ix_record_index_patient_field", "patient_index", "field", "value"),
)  # fmt: skip


# Master-key versions and their state (migration 0005; storage/kek.py manages it). The
# records insert below checks it in the same transaction, so no row can reference a
# retired version.
kek_versions = sa.Table(
    "kek_versions",
    metadata,
    sa.Column("version", sa.Integer, nullable=False, autoincrement=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", StoredTime(), nullable=False),
    sa.Column("retired_at", StoredTime(), nullable=True),
    sa.PrimaryKeyConstraint("version", name="pk_kek_versions"),
    sa.CheckConstraint("state IN ('active', 'previous', 'retired')", name="ck_kek_versions_state"),
)


# The put's statements, built once and executed with parameters: built per call they
# cost the put SQLAlchemy's construction, coercion of each value and a new cache key
# (issue 12's GIL profile of 4 KiB puts). kek_state's lock is PostgreSQL's FOR SHARE.
_INSERT_RECORD = records.insert()
_INSERT_INDEX = record_index.insert()
_KEK_STATE = sa.select(kek_versions.c.state).where(
    kek_versions.c.version == sa.bindparam("version")
)
# FOR KEY SHARE, not FOR SHARE: it conflicts with a retirement's FOR UPDATE (below) but
# not with a rotation's plain UPDATE of the state (active to previous, the new version to
# active). With FOR SHARE an audit batch holding puts on both versions share-locked them
# in its own order while the rotation updated them in another: PostgreSQL's deadlock
# detector killed the batch and its puts answered UNAVAILABLE (session 9's CI run).
_KEK_STATE_SHARED = _KEK_STATE.with_for_update(read=True, key_share=True)
_KEK_INSERT_PG = postgresql.insert(kek_versions).on_conflict_do_nothing()
_KEK_INSERT_LITE = sqlite.insert(kek_versions).on_conflict_do_nothing()


def kek_insert_ignoring_duplicates(connection: Connection, version: int, state: str) -> None:
    """Register KEK ``version`` unless it is known already (a no-op then, never an error)."""
    values = {"version": version, "state": state, "created_at": datetime.now(UTC)}
    pg = connection.dialect.name == "postgresql"
    connection.execute(_KEK_INSERT_PG if pg else _KEK_INSERT_LITE, values)


def kek_state(connection: Connection, version: int) -> str | None:
    """State of KEK ``version``, key-share-locked on PostgreSQL until the transaction ends.

    The lock orders this insert with a concurrent retirement (which locks the row FOR
    UPDATE first, then counts the rows using it): whichever comes second sees the other.
    SQLite needs no lock: the insert before this holds the database's write lock.
    """
    query = _KEK_STATE_SHARED if connection.dialect.name == "postgresql" else _KEK_STATE
    state: str | None = connection.scalar(query, {"version": version})
    return state


def _insert_guarded(
    connection: Connection, values: dict[str, Any], entries: Sequence[IndexEntry] = ()
) -> None:
    """Insert a records row (and its index entries) unless its KEK version is retired
    (same transaction)."""
    connection.execute(_INSERT_RECORD, values)
    if entries:
        connection.execute(_INSERT_INDEX, [
            {"record_id": values["id"], "version": values["version"],
             "patient_index": values["patient_index"], "field": e.field, "value": e.value,
             "system": e.system, "quantity": e.quantity, "unit": e.unit,
             "observed_at": e.observed_at}
            for e in entries
        ])  # fmt: skip
    version = values["kek_version"]
    state = kek_state(connection, version)
    if state is None:  # first use of a version no rotation registered (e.g. KEK v1)
        kek_insert_ignoring_duplicates(connection, version, "previous")
        state = kek_state(connection, version)
    if state == "retired":
        raise KekRetiredError(
            f"master key version {version} was retired while this record was written; "
            "retry the write"
        )


def make_engine(url: str) -> Engine:
    """An engine for ``url``, tuned per dialect (SQLite pragmas, PostgreSQL pre-ping)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            private_sqlite_files(parsed.database)
        engine = sa.create_engine(parsed, hide_parameters=True)
        sqlite_guard.install(engine)  # a read-only file: UNAVAILABLE, never SIGBUS
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre-ping drops connections a database restart has killed; a short connect
    # timeout reports an outage in seconds.
    connect_args: dict[str, Any] = {"connect_timeout": 5}
    if parsed.get_backend_name() == "postgresql":
        connect_args["options"] = pinned_session_options(parsed.query.get("options"))
    engine = sa.create_engine(
        parsed, hide_parameters=True, pool_pre_ping=True, connect_args=connect_args
    )
    if parsed.get_backend_name() == "postgresql":
        event.listen(engine, "connect", _durable_commits)
    return engine


# The session settings the service's reads depend on, sent in the startup packet so that
# they hold from the first query (SQLAlchemy's dialect set-up runs before any "connect"
# listener) and override defaults a database writer may set with ALTER DATABASE or ALTER
# ROLE: psycopg refuses to load a timestamp under any DateStyle but ISO (its error,
# logged with a traceback, quotes the stored time), returns text as bytes under
# client_encoding SQL_ASCII (every row would read as altered), and renders times and
# intervals by these. Values are those of a stock PostgreSQL.
PINNED_SESSION = ("DateStyle=ISO", "IntervalStyle=postgres", "client_encoding=UTF8",
                  "TimeZone=UTC")  # fmt: skip


def pinned_session_options(operator: object = None) -> str:
    """libpq ``options`` pinning ``PINNED_SESSION``, followed by the operator's own
    ``options`` from the database URL (later ``-c`` settings win: the URL is config, a
    database default is not)."""
    pinned = " ".join(f"-c {setting}" for setting in PINNED_SESSION)
    if isinstance(operator, tuple):  # a URL may repeat a query key
        operator = " ".join(str(o) for o in operator)
    return f"{pinned} {operator}" if operator else pinned


def _durable_commits(dbapi_connection: Any, _record: Any) -> None:
    """Never ``synchronous_commit=off`` in the service's sessions.

    ``off`` (a database's or role's default, often set for speed) acknowledges a COMMIT
    before its WAL is flushed: a crash then loses commits already answered, i.e. audit
    events of reads whose data has left and rows of puts reported stored. A session
    setting overrides those defaults; ``local`` and the synchronous-replication levels
    flush before answering and are kept.
    """
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True  # a SET in a transaction would roll back with it
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            row = cursor.fetchone()
            if row is not None and row[0] == "off":
                cursor.execute("SET synchronous_commit = on")
    finally:
        dbapi_connection.autocommit = autocommit


def private_sqlite_files(path: str) -> None:
    """Create the SQLite file 0600 (and tighten it, and its -wal/-shm, if looser).

    SQLite creates ``-wal`` and ``-shm`` with the main file's permissions, so a main
    file made 0600 here keeps them owner-only too. The rows hold no plaintext patient
    data, but the file is still nobody else's to read or copy.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:
        return  # a missing directory: SQLite reports it on connect, with its own message
    for name in (path, f"{path}-wal", f"{path}-shm", f"{path}-journal"):
        with contextlib.suppress(OSError):  # absent, or not ours: leave it to the operator
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Refuse a file that is not UTF-8, decode text that is not UTF-8 with replacement
    (``storage.sqlite_text``); WAL lets readers run beside the writer; busy_timeout waits
    out a short lock."""
    sqlite_text.check_encoding(dbapi_connection)
    dbapi_connection.text_factory = sqlite_text.decode_text
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()


def alembic_config() -> Config:
    """An Alembic config for the packaged migrations (no alembic.ini needed)."""
    from alembic.config import Config  # noqa: PLC0415  (Alembic loads to migrate: upgrade)

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(
    engine: Engine, revision: str = "head", hooks: Mapping[str, object] | None = None
) -> None:
    """Migrate the database to ``revision``; a no-op when it is there already.

    ``hooks`` reach migrations through Alembic's ``config.attributes`` (migration 0009
    adopts legacy grant rows through one, in the migration's transaction). Concurrent
    calls (replicas starting together) run one after the other
    (``storage.migration_lock``); the later ones find the schema at head. A database
    found at head (read under the lock too: a reader beside a migration on a new SQLite
    file can meet its lock) is left without importing Alembic, which costs every start
    about 0.13 s of CPU for nothing.
    """
    with translated(engine), migration_lock(engine):
        if revision == "head" and at_head(engine):
            return
        from alembic import command  # noqa: PLC0415  (see above)

        config = alembic_config()
        config.attributes.update(hooks or {})
        with engine.begin() as connection:
            _check_stamp(connection, config)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)


def _check_stamp(connection: Connection, config: Config) -> None:
    """Refuse a database whose ``alembic_version`` names a revision this medvault does
    not have (edited by a database writer, or a newer medvault's): Alembic's own error
    would carry the stored value into the message and a logged traceback."""
    from alembic.script import ScriptDirectory  # noqa: PLC0415  (as upgrade's)

    if not sa.inspect(connection).has_table("alembic_version"):
        return
    stamped = connection.scalars(sa.text("SELECT version_num FROM alembic_version")).all()
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    if any(type(value) is not str or value not in known for value in stamped):
        raise SchemaRevisionError(
            "the metadata database's alembic_version table names a schema revision this "
            "medvault does not have (edited outside medvault, or written by a newer "
            "release); not started: run the release that wrote the database, or restore "
            "the database from a backup (docs/operations.md)"
        )


def at_head(engine: Engine) -> bool:
    """Whether the schema is at the newest migration (:data:`SCHEMA_HEAD`)."""
    with translated(engine), engine.connect() as connection:
        if not sa.inspect(connection).has_table("alembic_version"):
            return False
        versions = connection.scalars(sa.text("SELECT version_num FROM alembic_version")).all()
    return versions == [SCHEMA_HEAD]


def to_utc(value: datetime, field: str) -> datetime:
    """``value`` in UTC; a naive time is refused rather than guessed."""
    if value.tzinfo is None:
        raise InvalidRecordError(field, "must carry a time zone")
    return value.astimezone(UTC)


def from_db_time(value: datetime) -> datetime:
    """A UTC-aware datetime from a driver value (SQLite returns naive UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def to_stored_record(row: Row[Any]) -> StoredRecord:
    """The domain view of a ``records`` row (not yet verified: see ``storage.row_auth``).

    Read strictly (``storage.row_values``): a value of a type medvault never stores
    reads as a placeholder and is named in ``malformed``, and the row then fails
    verification, as any other edit does.
    """
    v = RowValues(row._mapping)
    return StoredRecord(
        id=v.text("id"),
        version=v.version("version"),
        kind=v.text("kind"),
        content_type=v.text("content_type"),
        patient_index=v.binary("patient_index"),
        sealed_meta=v.binary("sealed_meta"),
        object_key=v.text("object_key"),
        kek_version=v.integer("kek_version"),
        wrapped_dek=v.binary("wrapped_dek"),
        size=v.integer("size"),
        stored_size=v.integer("stored_size"),
        ciphertext_sha256=v.binary("ciphertext_sha256"),
        segment_size=v.integer("segment_size"),
        created_at=v.time("created_at"),
        created_by=v.text("created_by"),
        supersedes_version=v.optional_version("supersedes_version"),
        malformed=tuple(v.malformed),
    )


def _where_label(engine: Engine) -> str:
    """Where the database is, for messages: host and port, or 'local SQLite file'."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return "local SQLite file"
    return f"{url.host or 'localhost'}:{url.port or 'default port'}"


@contextmanager
def translated(engine: Engine) -> Iterator[None]:
    """Translate driver errors; the original stays chained, the message carries no data."""
    try:
        yield
    except exc.IntegrityError as e:
        raise RecordConflictError("that record version (or its object key) exists already") from e
    except (exc.OperationalError, exc.InterfaceError) as e:
        unwritable = isinstance(e.orig, sqlite_guard.UnwritableDatabaseError)
        raise BackendUnavailableError(
            f"metadata database unavailable at {_where_label(engine)} "
            f"({e.orig if unwritable else type(e.orig).__name__}); retry later"
        ) from e
    except exc.InternalError as e:
        # PostgreSQL reports a read-only transaction (a hot standby, or
        # default_transaction_read_only) and a broken transaction state as InternalError:
        # the database cannot take this now, which is an outage, not a bug.
        read_only = getattr(e.orig, "sqlstate", None) == READ_ONLY_SQLSTATE
        what = "is read-only" if read_only else "refused the transaction"
        raise BackendUnavailableError(
            f"metadata database at {_where_label(engine)} {what} "
            f"({type(e.orig).__name__}); retry later"
        ) from e
    except exc.TimeoutError as e:  # the pool's: every connection busy past its timeout
        raise BackendUnavailableError(
            f"metadata database at {_where_label(engine)} busy (no free connection); retry later"
        ) from e
    except exc.SQLAlchemyError as e:
        raise StorageError(f"metadata database error ({type(e).__name__})") from e


def connect(engine: Engine, what: str = "metadata database") -> Connection:
    """A connection from ``engine``; ``DatabaseUnreachableError`` if none can be made.

    Kept apart from the statements so that callers can tell "nothing was sent" (the
    write surely did not commit: its object can go at once) from a connection lost
    mid-transaction (the COMMIT may have taken effect).
    """
    try:
        return engine.connect()
    except (exc.OperationalError, exc.InterfaceError) as e:
        raise DatabaseUnreachableError(
            f"{what} unavailable at {_where_label(engine)} ({type(e.orig).__name__}); retry later"
        ) from e


def _latest_only() -> sa.ColumnElement[bool]:
    """Rows that are the newest version of their record (over all of its versions)."""
    newer = sa.alias(records, "newer")
    latest = sa.select(sa.func.max(newer.c.version)).where(newer.c.id == records.c.id)
    return records.c.version == latest.scalar_subquery()


def _indexed(f: IndexFilter) -> sa.ColumnElement[bool]:
    """The row has an index entry of one of ``f.fields`` matching ``f``."""
    match = sa.and_(
        record_index.c.record_id == records.c.id,
        record_index.c.version == records.c.version,
        record_index.c.patient_index == records.c.patient_index,
        record_index.c.field.in_(sorted(f.fields)),
    )
    if f.value is not None:
        match = sa.and_(match, record_index.c.value == f.value)
    if f.low is not None:
        match = sa.and_(match, record_index.c.value >= f.low)
    if f.high is not None:
        match = sa.and_(match, record_index.c.value <= f.high)
    return sa.exists().where(match)


def _entries_of(ids: Sequence[str]) -> Callable[[Connection], Sequence[Row[Any]]]:
    query = sa.select(record_index).where(record_index.c.record_id.in_(ids))
    return lambda c: c.execute(query).all()


def run_in_transaction(engine: Engine, fn: Callable[[Connection], T], *, write: bool = False) -> T:
    """Run ``fn`` in one transaction (committed if ``write``), translating driver errors."""
    with translated(engine), connect(engine) as connection:
        if write:
            with connection.begin():
                return fn(connection)
        return fn(connection)


def translated_change(fn: Callable[[Connection], T]) -> Callable[[Connection], T]:
    """``fn`` reporting driver errors as ``run_in_transaction`` does, for a change that
    runs in another component's transaction (the audit trail's, with its event)."""

    def change(connection: Connection) -> T:
        with translated(connection.engine):
            return fn(connection)

    return change


# The statements on every read's path, built once: a statement built per call costs
# SQLAlchemy a new cache key each time (bench/sign.py's GIL profile).
_LATEST = (
    sa.select(records).where(records.c.id == sa.bindparam("record_id"))
    .order_by(records.c.version.desc()).limit(1)
)  # fmt: skip
_VERSION = sa.select(records).where(
    records.c.id == sa.bindparam("record_id"), records.c.version == sa.bindparam("version")
)


class SqlMetadataStore:
    """Record rows in one SQL table; every statement is parameterised."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def insert(self, row: StoredRecord, entries: Sequence[IndexEntry] = ()) -> None:
        """Add a version (and its index entries); ``RecordConflictError`` if (id, version)
        exists already, ``KekRetiredError`` if its KEK version was retired (nothing is
        stored)."""
        self._run(self.insert_change(row, entries), write=True)

    def insert_change(
        self, row: StoredRecord, entries: Sequence[IndexEntry] = ()
    ) -> Callable[[Connection], None]:
        """``insert`` as a function of a connection, to commit in the caller's transaction
        (with the write's audit event); the same errors, nothing stored if it raises."""
        values = {column.name: getattr(row, column.name) for column in records.columns}
        values["created_at"] = to_utc(row.created_at, "created_at")
        return translated_change(lambda c: _insert_guarded(c, values, entries))

    def get(self, record_id: str, version: int | None = None) -> StoredRecord:
        """That version, or the latest; ``RecordNotFoundError`` if absent."""
        params: dict[str, object]
        if version is None:
            query, params = _LATEST, {"record_id": record_id}
        else:
            query, params = _VERSION, {"record_id": record_id, "version": version}
        row = self._run(lambda c: c.execute(query, params).first())
        if row is None:
            raise RecordNotFoundError("no such record" if version is None else "no such version")
        return to_stored_record(row)

    def study_records(
        self, *, patient_index: bytes | None = None, study_uid: str | None = None, limit: int
    ) -> list[StoredRecord]:
        """Latest DICOM versions with a study UID entry: the patient's (``patient_index``)
        or the study's (``study_uid``), oldest first. Unverified: the caller verifies each."""
        match = sa.and_(
            record_index.c.record_id == records.c.id,
            record_index.c.version == records.c.version,
            record_index.c.field == STUDY_UID,
        )
        if study_uid is not None:
            match = sa.and_(match, record_index.c.value == study_uid)
        # DICOM records only: an index row a writer adds can file any record under a
        # study UID, but the kind column is part of the verified row (a row whose kind
        # was edited fails verification when opened).
        query = (
            sa.select(records).where(records.c.kind == RecordKind.DICOM.value)
            .where(sa.exists().where(match)).where(_latest_only())
        )  # fmt: skip
        if patient_index is not None:
            query = query.where(records.c.patient_index == patient_index)
        query = query.order_by(records.c.created_at, records.c.id).limit(limit)
        rows = self._run(lambda c: c.execute(query).all())
        return [to_stored_record(r) for r in rows]

    def index_entries(
        self, keys: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], list[IndexEntry]]:
        """The index entries of each (record id, version) in ``keys``; an entry holding
        a value of a type medvault never stores is left out (the index is a search aid,
        not an authority: ``storage.index``)."""
        found: dict[tuple[str, int], list[IndexEntry]] = {k: [] for k in keys}
        ids = sorted({k[0] for k in keys})
        for start in range(0, len(ids), _IN_BATCH):
            for r in self._run(_entries_of(ids[start : start + _IN_BATCH])):
                v = RowValues(r._mapping)
                key = (v.text("record_id"), v.version("version"))
                entry = IndexEntry(
                    v.text("field"), v.text("value"), v.optional_text("system"),
                    v.optional_text("quantity"), v.optional_text("unit"),
                    v.optional_text("observed_at"),
                )  # fmt: skip
                if key in found and not v.malformed:
                    found[key].append(entry)
        return found

    def list(
        self,
        patient_index: bytes,
        *,
        kind: str | None,
        created_after: datetime | None,
        created_before: datetime | None,
        all_versions: bool,
        after: ListCursor | None,
        limit: int,
        filters: Sequence[IndexFilter] = (),
    ) -> list[StoredRecord]:
        """A page of the patient's rows, newest first, starting after ``after``; with
        ``filters``, only rows that have a matching index entry for each."""
        if limit < 1:
            raise InvalidRecordError("limit", "must be at least 1")
        query = sa.select(records).where(records.c.patient_index == patient_index)
        for f in filters:
            query = query.where(_indexed(f))
        if kind is not None:
            query = query.where(records.c.kind == kind)
        if created_after is not None:
            query = query.where(records.c.created_at >= to_utc(created_after, "created_after"))
        if created_before is not None:
            query = query.where(records.c.created_at < to_utc(created_before, "created_before"))
        if not all_versions:
            query = query.where(_latest_only())
        if after is not None:
            # Keyset pagination: rows strictly after the cursor in the same order.
            key = sa.tuple_(records.c.created_at, records.c.id, records.c.version)
            query = query.where(
                key < sa.tuple_(to_utc(after.created_at, "after"), after.id, after.version)
            )
        query = query.order_by(
            records.c.created_at.desc(), records.c.id.desc(), records.c.version.desc()
        ).limit(limit)
        rows = self._run(lambda c: c.execute(query).all())
        return [to_stored_record(r) for r in rows]

    def referenced(self, object_keys: Iterable[str]) -> set[str]:
        """Those of ``object_keys`` that some row references (for the orphan sweeper)."""
        keys = list(dict.fromkeys(object_keys))
        found: set[str] = set()
        for start in range(0, len(keys), _IN_BATCH):
            found.update(self._referenced_batch(keys[start : start + _IN_BATCH]))
        return found

    def replace_sealed(self, record_id: str, version: int, old: bytes, new: bytes) -> bool:
        """Set a version's sealed metadata to ``new`` if it is still ``old``; True if set."""
        update = (
            records.update()
            .where(records.c.id == record_id, records.c.version == version)
            .where(records.c.sealed_meta == old)
            .values(sealed_meta=new)
        )
        return bool(self._run(lambda c: c.execute(update).rowcount, write=True))

    def _referenced_batch(self, keys: Sequence[str]) -> Sequence[str]:
        query = sa.select(records.c.object_key).where(records.c.object_key.in_(keys))
        return self._run(lambda c: c.scalars(query).all())

    def _run(self, fn: Callable[[Connection], T], *, write: bool = False) -> T:
        return run_in_transaction(self._engine, fn, write=write)
