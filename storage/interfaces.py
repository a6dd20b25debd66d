"""Storage Protocols, split by capability: blobs in an object store, rows in a database.

``RecordStore`` (``storage.records``) composes them with the keystore Protocols; the
concrete backends are chosen in ``service.bootstrap``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from storage.index import IndexEntry


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One metadata row: what the database holds about a stored version.

    No plaintext patient data: ``patient_index`` is a keyed blind index and
    ``sealed_meta`` is ciphertext (patient identifier, title, plaintext digest).
    ``malformed`` names the columns that held a value of a type medvault never stores
    (read as placeholders, ``storage.row_values``): such a row never verifies.
    """

    id: str
    version: int
    kind: str
    content_type: str
    patient_index: bytes
    sealed_meta: bytes
    object_key: str
    kek_version: int
    wrapped_dek: bytes
    size: int
    stored_size: int
    ciphertext_sha256: bytes
    segment_size: int
    created_at: datetime
    created_by: str
    supersedes_version: int | None
    malformed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ListCursor:
    """Position after the last row of a page (rows are ordered newest first)."""

    created_at: datetime
    id: str
    version: int


@dataclass(frozen=True, slots=True)
class IndexFilter:
    """A search condition on the record index: an entry of one of ``fields`` equal to
    ``value``, or (for dates) between ``low`` and ``high`` inclusive."""

    fields: frozenset[str]
    value: str | None = None
    low: str | None = None
    high: str | None = None


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """An object's key, size and last-modified time."""

    key: str
    size: int
    last_modified: datetime


class BlobStore(Protocol):
    """Opaque ciphertext objects in an object store."""

    def put(self, key: str, chunks: Iterable[bytes]) -> int:
        """Stream ``chunks`` into object ``key`` (multipart); return the bytes written.

        Memory stays bounded by the part size. On failure nothing is left visible
        under ``key`` (an incomplete multipart upload is aborted).
        """
        ...

    def read(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Yield the object's bytes from ``offset`` (``length`` bytes, or to the end)."""
        ...

    def stat(self, key: str) -> BlobInfo:
        """Return the object's size and time; ``RecordNotFoundError`` if absent."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; absent is not an error."""
        ...

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Every object under ``prefix``."""
        ...

    def mark_committed(self, key: str) -> None:
        """Mark the object as a committed record's: the sweeper never deletes it."""
        ...

    def committed(self, key: str) -> bool:
        """Whether the object is so marked; ``RecordNotFoundError`` if absent."""
        ...


class MetadataStore(Protocol):
    """Record rows in a SQL database."""

    def insert(self, row: StoredRecord, entries: Sequence[IndexEntry] = ()) -> None:
        """Add a version and its index entries; ``RecordConflictError`` if (id, version)
        exists already."""
        ...

    def insert_change(
        self, row: StoredRecord, entries: Sequence[IndexEntry] = ()
    ) -> Callable[[Connection], None]:
        """``insert`` as a function of a connection: it commits in the caller's
        transaction (the audit trail's, with the write's event)."""
        ...

    def get(self, record_id: str, version: int | None = None) -> StoredRecord:
        """Return that version, or the latest; ``RecordNotFoundError`` if absent."""
        ...

    def study_records(
        self, *, patient_index: bytes | None = None, study_uid: str | None = None, limit: int
    ) -> list[StoredRecord]:
        """Latest versions indexed with a study UID, the patient's or the study's."""
        ...

    def index_entries(
        self, keys: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], list[IndexEntry]]:
        """The index entries of each (record id, version)."""
        ...

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
        """A page of the patient's rows, newest first, starting after ``after``, each
        matching every filter."""
        ...

    def referenced(self, object_keys: Iterable[str]) -> set[str]:
        """Those of ``object_keys`` that some row references (for the orphan sweeper)."""
        ...

    def replace_sealed(self, record_id: str, version: int, old: bytes, new: bytes) -> bool:
        """Set a version's sealed metadata to ``new`` if it is still ``old``; True if set."""
        ...
