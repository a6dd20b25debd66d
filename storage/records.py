"""The record store: put, open (read), stat and list encrypted records.

``RecordStore`` holds the stores and keys; its write path is ``storage.record_writer``
(write order, crash safety) and its read path ``storage.record_reader`` (verify, gate,
then release). Its vocabulary (limits, gates, ``OpenRecord``) is ``storage.record_types``,
re-exported here for the callers that import it with the store.
"""

from __future__ import annotations

from collections.abc import Callable

from keystore import BlindIndexer, KeyWrapper
from storage.commit_tags import CommitTagger
from storage.interfaces import BlobStore, MetadataStore
from storage.put_requests import SqlPutRequests
from storage.record_reader import RecordReader
from storage.record_types import (
    OBJECT_PREFIX,
    WRITE_FAULT_POINTS,
    CommitGate,
    Gate,
    OpenRecord,
    RecordRef,
    StoreLimits,
    StudyMember,
)
from storage.record_writer import RecordWriter
from storage.row_auth import RowVerifier, Tampered

__all__ = [
    "OBJECT_PREFIX",
    "WRITE_FAULT_POINTS",
    "CommitGate",
    "Gate",
    "OpenRecord",
    "RecordRef",
    "RecordStore",
    "StoreLimits",
    "StudyMember",
]


class RecordStore(RecordWriter, RecordReader):
    """Encrypted, versioned records over a blob store, a metadata store and a key store."""

    def __init__(
        self,
        blobs: BlobStore,
        metadata: MetadataStore,
        wrapper: KeyWrapper,
        indexer: BlindIndexer,
        limits: StoreLimits | None = None,
        *,
        before_commit: Callable[[], None] | None = None,
        fault: Callable[[str], None] | None = None,
        on_tampered: Tampered | None = None,
        accept_legacy: bool = True,
        requests: SqlPutRequests | None = None,
        tagger: CommitTagger | None = None,
    ) -> None:
        self._blobs = blobs
        # PutRecord idempotency keys (storage.put_requests); None: request ids are ignored.
        self._requests = requests
        self._tagger = tagger
        self._metadata = metadata
        self._wrapper = wrapper
        self._indexer = indexer
        self._limits = limits or StoreLimits()
        # Fault-injection seam for crash tests: runs after the upload, before the row.
        self._before_commit = before_commit
        # Named fault points of the write path (``WRITE_FAULT_POINTS``), for the
        # fault-injection suite: called with each point's name as the put passes it.
        self._fault = fault
        # Every row is verified here before any of it is trusted (storage.row_auth).
        self.verifier = RowVerifier(
            wrapper, indexer, accept_legacy=accept_legacy, on_tampered=on_tampered
        )
