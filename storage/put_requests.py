"""PutRecord idempotency: a retried put returns the version the first one stored.

A put whose reply was lost (its replica died after the commit, a network cut) is
retried by the client, maybe on another replica; without a key the retry stores a
second record. The client sends a request id (``NewRecord.request_id``); the table
``put_requests`` (migration 0012) maps ``(principal, request id)`` to the record version
the put made, written in the same transaction as the record row and its audit event, so
the key exists exactly when the record does. Keys are per principal: one caller can
neither hit nor probe another's.

A retry is checked against the stored record itself, not against anything in this
table (which holds no digest and no patient data): its header (patient, kind, content
type, title, what it amends) and the SHA-256 of its content must equal the record's
sealed, verified metadata, and the record must be the caller's. A forged row here can
therefore only return a record identical to what the caller sent and may write. The
same key with anything different is ``RequestReusedError`` (FAILED_PRECONDITION), and so
is a key whose row names no record version (read strictly: ``storage.row_values``).
Keys older than the retention are ignored and pruned by the elected sweeper.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection, Engine

from storage.errors import RequestReusedError, StorageError
from storage.model import NewRecord
from storage.row_auth import VerifiedRecord
from storage.row_values import RowValues
from storage.sql_metadata import metadata, run_in_transaction, to_utc, translated_change
from storage.sqlite_text import StoredTime

DEFAULT_RETENTION = timedelta(hours=24)
REUSED = (
    "request_id: already used for a different put (another header or content); "
    "use a new request id for a new record"
)

# The schema as queries see it; storage/migrations/versions/0012_replicas.py made it.
put_requests = sa.Table(
    "put_requests",
    metadata,
    sa.Column("principal", sa.String(255), nullable=False),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("record_id", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", StoredTime(), nullable=False),
    sa.PrimaryKeyConstraint("principal", "request_id", name="pk_put_requests"),
    sa.Index("ix_put_requests_created", "created_at"),
)


class RequestKeyTakenError(StorageError):
    """A concurrent put with the same key committed first (handled as a replay)."""


# On the path of every put with a request id: built once and executed with parameters
# (a statement built per call costs SQLAlchemy its construction and a new cache key).
_KEY = sa.and_(
    put_requests.c.principal == sa.bindparam("principal"),
    put_requests.c.request_id == sa.bindparam("request_id"),
)
_FIND = sa.select(put_requests.c.record_id, put_requests.c.version).where(
    _KEY, put_requests.c.created_at >= sa.bindparam("cutoff")
)
_DELETE_EXPIRED = put_requests.delete().where(
    _KEY, put_requests.c.created_at < sa.bindparam("cutoff")
)
_INSERT = put_requests.insert()


class SqlPutRequests:
    """``put_requests``: remember a put's result under its key; find it again."""

    def __init__(
        self,
        engine: Engine,
        retention: timedelta = DEFAULT_RETENTION,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._engine = engine
        self._retention = retention
        self._clock = clock

    def find(self, principal: str, request_id: str) -> tuple[str, int] | None:
        """The (record id, version) the key stored, unless older than the retention.

        ``RequestReusedError`` if the row names no record version (a value of a type
        medvault never stores, ``storage.row_values``): as for a key naming another put,
        the caller is told to use a new request id; nothing of the value is shown.
        """
        params = {"principal": principal, "request_id": request_id, "cutoff": self._cutoff()}
        row = run_in_transaction(self._engine, lambda c: c.execute(_FIND, params).first())
        if row is None:
            return None
        v = RowValues(row._mapping)
        found = v.text("record_id"), v.version("version")
        if v.malformed:
            raise RequestReusedError(REUSED)
        return found

    def remember_change(
        self, principal: str, request_id: str, record_id: str, version: int
    ) -> Callable[[Connection], None]:
        """Insert the key, as a function of the put's connection (same transaction).

        ``RequestKeyTakenError`` if a live key exists (a concurrent put won); an
        expired one is replaced.
        """
        values = {
            "principal": principal, "request_id": request_id, "record_id": record_id,
            "version": version, "created_at": to_utc(self._clock(), "now"),
        }  # fmt: skip
        expired = {"principal": principal, "request_id": request_id, "cutoff": self._cutoff()}

        def remember(connection: Connection) -> None:
            connection.execute(_DELETE_EXPIRED, expired)
            try:
                connection.execute(_INSERT, values)
            except exc.IntegrityError as e:
                raise RequestKeyTakenError("request id taken by a concurrent put") from e

        return translated_change(remember)

    def run(self, change: Callable[[Connection], None]) -> None:
        """Run ``change`` in a transaction of its own (a put without an audit gate)."""
        run_in_transaction(self._engine, change, write=True)

    def prune(self) -> int:
        """Delete keys older than the retention; how many."""
        query = put_requests.delete().where(put_requests.c.created_at < self._cutoff())
        removed = run_in_transaction(self._engine, lambda c: c.execute(query).rowcount, write=True)
        return int(removed)

    def _cutoff(self) -> datetime:
        return to_utc(self._clock() - self._retention, "cutoff")


def check_replay(
    header: NewRecord, creator: str, patient_index: bytes, earlier: VerifiedRecord, sha256: bytes
) -> None:
    """Raise ``RequestReusedError`` unless the retry asks for exactly the earlier put."""
    info = earlier.info()
    # An amendment retried must find an amendment (version > 1) of that record, never
    # the record's first version that a put under the same key created.
    amends = (
        info.id == header.supersedes and info.version > 1
        if header.supersedes
        else info.version == 1
    )
    same = (
        info.created_by == creator
        and secrets.compare_digest(earlier.patient_index, patient_index)
        and info.kind == header.kind
        and info.content_type == header.content_type
        and info.title == header.title
        and amends
        and header.supersedes_version in (None, info.supersedes_version)
        and secrets.compare_digest(info.sha256, sha256)
        and header.expected_sha256 in (None, info.sha256)
    )
    if not same:
        raise RequestReusedError(REUSED)
