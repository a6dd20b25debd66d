"""The record store's write path: put a new record or version, and clean up after a
put that did not commit.

Write order (docs/architecture.md): wrap a fresh data key in the token, stream the ciphertext into
an object under an opaque key, then insert the metadata row last. Before the row
commits the record does not exist; a crash in between leaves only an unreferenced
object, which ``storage.sweeper`` removes after a grace period. Once the row has
committed, the object is tagged as committed, and the sweeper never deletes a tagged
object (a row a database writer deleted must not take the ciphertext with it).
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from sqlalchemy.engine import Connection

from keystore import BlindIndexer, KeyWrapper
from storage.commit_tags import CommitTagger
from storage.deadlines import check_deadline, grace
from storage.envelope import StreamingAead
from storage.errors import (
    DeadlineExceededError,
    InvalidRecordError,
    KekRetiredError,
    RecordConflictError,
    RecordNotFoundError,
    StorageError,
    never_reached_database,
)
from storage.formats import ContentValidator, checked, validator_for
from storage.index import IndexEntry
from storage.interfaces import BlobStore, MetadataStore, StoredRecord
from storage.meter import Meter
from storage.model import NewRecord, RecordInfo
from storage.pipeline import read_ahead
from storage.put_requests import RequestKeyTakenError, SqlPutRequests, check_replay
from storage.record_types import (
    OBJECT_PREFIX,
    CommitGate,
    Gate,
    RecordRef,
    StoreLimits,
    pass_gate,
)
from storage.row_auth import RowVerifier, VerifiedRecord, associated_data
from storage.sealing import RowFields, SealedFields, seal
from storage.validation import check_header

# Under the store's name, as before the write path had a module of its own (the JSON
# log lines name their logger: service.logs).
log = logging.getLogger("storage.records")


def _ciphertext(
    chunks: Iterable[bytes],
    validator: ContentValidator,
    aead: StreamingAead,
    ad: bytes,
    meters: tuple[Meter, Meter],
    *,
    limits: StoreLimits,
) -> Iterator[bytes]:
    """``chunks`` checked against their kind, metered (plaintext, ciphertext) and
    encrypted; encrypted ahead in a thread while the upload sends, unless small."""
    plain, cipher = meters
    source, small = _peek_small(chunks, limits.segment_size)
    ciphertext = cipher.watch(aead.encrypt(checked(plain.watch(source), validator), ad))
    return ciphertext if small else read_ahead(ciphertext, limits.read_ahead_segments)


def _peek_small(chunks: Iterable[bytes], segment_size: int) -> tuple[Iterator[bytes], bool]:
    """The content (unchanged) and whether it is one chunk of at most one segment, read
    here to its end: nothing is left to overlap, and a read-ahead thread would cost a
    small put more (its start, two hand-offs) than it saves. Called after the gate."""
    source = iter(chunks)
    head = list(itertools.islice(source, 2))
    small = len(head) < 2 and sum(len(c) for c in head) <= segment_size
    return itertools.chain(head, source), small


@runtime_checkable
class RefreshableKeyWrapper(KeyWrapper, Protocol):
    """A wrapper whose current KEK version can be rescanned (after a retirement)."""

    def refresh(self) -> int:
        """Rescan the master-key versions; return the current one."""
        ...


class RecordWriter:
    """``RecordStore``'s write path (a mixin: ``storage.records`` builds the state)."""

    _blobs: BlobStore
    _metadata: MetadataStore
    _wrapper: KeyWrapper
    _indexer: BlindIndexer
    _limits: StoreLimits
    _requests: SqlPutRequests | None
    _tagger: CommitTagger | None
    _before_commit: Callable[[], None] | None
    _fault: Callable[[str], None] | None
    verifier: RowVerifier

    def put(
        self,
        header: NewRecord,
        chunks: Iterable[bytes],
        creator: str,
        *,
        admit: Gate | None = None,
        on_commit: CommitGate | None = None,
        on_replay: Gate | None = None,
    ) -> RecordInfo:
        """Store a new record, or a new version of ``header.supersedes``.

        ``admit`` runs before the upload; ``on_commit`` after it, committing the row
        with the write's audit event in one transaction (an error there deletes the
        object and stores nothing). Without it the row commits on its own. A retry
        of a put that stored a version under the same ``request_id`` returns that
        version, stores nothing, and passes ``on_replay`` (its audit event).
        """
        check_header(header)
        patient_index = self._indexer.blind_index(header.patient.canonical())
        pass_gate(admit, RecordRef(header.supersedes, None, patient_index))
        earlier = self._earlier(header, creator)
        if earlier is not None:  # a retry: read its content only to compare digests
            plain = Meter(self._limits.max_record_size)
            for _ in plain.watch(chunks):
                pass
            return self._replay(header, creator, patient_index, plain.digest.digest(), on_replay)
        record_id, version = self._next_version(header, patient_index)
        ad = associated_data(record_id, version)
        dek = secrets.token_bytes(32)
        wrapped = self._wrapper.wrap(dek, ad)
        self._at("after-key-wrap")
        aead = StreamingAead(dek, self._limits.segment_size)
        plain = Meter(self._limits.max_record_size)
        cipher = Meter(aead.ciphertext_size(self._limits.max_record_size))
        object_key = OBJECT_PREFIX + secrets.token_hex(16)  # opaque: nothing about the record
        # The content is checked against its kind and patient as it streams past; a
        # refusal aborts the upload (the delete covers a store that kept a part of it).
        validator = validator_for(header.kind, header.patient)
        ciphertext = _ciphertext(chunks, validator, aead, ad, (plain, cipher), limits=self._limits)
        try:
            stored = self._blobs.put(object_key, ciphertext)
        except (InvalidRecordError, DeadlineExceededError):
            self._drop(object_key)
            raise
        sha256 = plain.digest.digest()
        if header.expected_sha256 is not None and header.expected_sha256 != sha256:
            self._drop(object_key)
            raise InvalidRecordError("expected_sha256", "does not match the content received")
        self._at("after-upload")
        row = StoredRecord(
            id=record_id,
            version=version,
            kind=header.kind.value,
            content_type=header.content_type,
            patient_index=patient_index,
            sealed_meta=b"",  # sealed below, over the row's own columns
            object_key=object_key,
            kek_version=wrapped.kek_version,
            wrapped_dek=wrapped.blob,
            size=plain.size,
            stored_size=stored,
            ciphertext_sha256=cipher.digest.digest(),
            segment_size=self._limits.segment_size,
            created_at=datetime.now(UTC),
            created_by=creator,
            supersedes_version=version - 1 if version > 1 else None,
        )
        sealed = SealedFields(header.patient, header.title, sha256, RowFields.of(row))
        row = replace(row, sealed_meta=seal(dek, ad, sealed))
        entries = validator.index()  # committed with the row (storage.index)
        if self._before_commit is not None:
            self._before_commit()
        self._at("before-commit")
        check_deadline("committing the record")  # a caller who gave up gets no record
        try:
            self._insert(row, dek, ad, on_commit, self._remember(header, creator, row),
                         entries=entries)  # fmt: skip
        except RequestKeyTakenError:  # a concurrent retry committed first: its result
            self._drop(object_key)
            return self._replay(header, creator, patient_index, sha256, on_replay)
        except BaseException as e:
            self._discard(row, e)
            raise
        self._at("after-commit")
        self._mark_committed(object_key)
        return VerifiedRecord(row, dek, sealed).info()

    def _at(self, point: str) -> None:
        if self._fault is not None:
            self._fault(point)

    def close(self) -> None:
        """Finish the background work: tag the committed objects still queued."""
        if self._tagger is not None:
            self._tagger.close()

    def _drop(self, object_key: str) -> None:
        """Delete an object no row will reference, also after the call is over (a short
        grace of its own); if the store does not answer, the sweeper removes it later."""
        try:
            with grace():
                self._blobs.delete(object_key)
        except StorageError:
            log.warning("uncommitted object not deleted; the sweeper removes it",
                        extra={"object_key": object_key})  # fmt: skip

    def _discard(self, row: StoredRecord, error: BaseException) -> None:
        """After a failed commit, delete the object only if its row is known absent.

        The error may come after the row committed (a connection lost during COMMIT, a
        gate raising after its change ran): deleting then would leave a row without its
        content. When the database cannot tell, the object stays for the sweeper, which
        removes unreferenced, untagged objects after the grace period. A commit that
        never reached the database (no connection could be made: the usual failure
        while it is down) committed nothing, and its object goes at once.
        """
        if never_reached_database(error):
            self._drop(row.object_key)
            return
        try:
            with grace():  # the call may be over (cancelled, its deadline passed)
                stored = self._metadata.get(row.id, row.version)
        except RecordNotFoundError:
            self._drop(row.object_key)
            return
        except StorageError:
            log.warning("commit outcome unknown; the object is left for the sweeper",
                        extra={"object_key": row.object_key})  # fmt: skip
            return
        if stored.object_key == row.object_key:
            self._mark_committed(row.object_key)  # it did commit: the caller may retry
        else:
            self._drop(row.object_key)  # that version is another write's

    def _mark_committed(self, object_key: str) -> None:
        """Tag the object of a committed row; the record is stored whatever happens here.

        Only after the commit: a tagged object is never swept, so tagging earlier would
        keep a failed write's object for ever. An untagged committed object is
        referenced, hence safe, and the sweep tags it (``storage.sweeper``).
        """
        if self._tagger is not None:  # off the write path (storage.commit_tags)
            self._tagger.submit(object_key)
            return
        try:
            self._blobs.mark_committed(object_key)
        except StorageError:
            log.warning("object not tagged as committed; a later sweep tags it",
                        extra={"object_key": object_key})  # fmt: skip

    def _remember(
        self, header: NewRecord, creator: str, row: StoredRecord
    ) -> Callable[[Connection], None] | None:
        """The request key's insert, committed with the row; None without a key."""
        if header.request_id is None or self._requests is None:
            return None
        return self._requests.remember_change(creator, header.request_id, row.id, row.version)

    def _earlier(self, header: NewRecord, creator: str) -> tuple[str, int] | None:
        if header.request_id is None or self._requests is None:
            return None
        return self._requests.find(creator, header.request_id)

    def _replay(
        self,
        header: NewRecord,
        creator: str,
        patient_index: bytes,
        sha256: bytes,
        on_replay: Gate | None,
    ) -> RecordInfo:
        """The version an earlier put with this request id stored, if the retry matches."""
        earlier = self._earlier(header, creator)
        if earlier is None:  # its key expired between the two looks: too late to replay
            raise RecordConflictError("request_id: the earlier put's key expired; retry")
        verified = self.verifier.verify(self._metadata.get(*earlier))
        check_replay(header, creator, patient_index, verified, sha256)
        pass_gate(on_replay, RecordRef(verified.row.id, verified.row.version, patient_index))
        return verified.info()

    def _insert(
        self,
        row: StoredRecord,
        dek: bytes,
        ad: bytes,
        on_commit: CommitGate | None = None,
        remember: Callable[[Connection], None] | None = None,
        *,
        entries: Sequence[IndexEntry] = (),
    ) -> None:
        """Insert the row and its index entries (with its audit event, through
        ``on_commit``, and its request key); if its KEK version was retired meanwhile,
        wrap the same data key again with the (refreshed) current version and insert
        once more."""
        try:
            self._commit(row, on_commit, remember, entries)
        except KekRetiredError:
            if isinstance(self._wrapper, RefreshableKeyWrapper):
                self._wrapper.refresh()
            wrapped = self._wrapper.wrap(dek, ad)
            again = replace(row, kek_version=wrapped.kek_version, wrapped_dek=wrapped.blob)
            self._commit(again, on_commit, remember, entries)

    def _commit(
        self,
        row: StoredRecord,
        on_commit: CommitGate | None,
        remember: Callable[[Connection], None] | None,
        entries: Sequence[IndexEntry] = (),
    ) -> None:
        insert = self._metadata.insert_change(row, entries)
        if remember is not None or self._fault is not None:
            change = insert

            def insert(connection: Connection) -> None:
                change(connection)
                if remember is not None:
                    remember(connection)
                # Inside the audit batch's transaction: the row is written, its event
                # not yet chained, nothing committed.
                self._at("during-audit-write")

        if on_commit is not None:
            on_commit(RecordRef(row.id, row.version, row.patient_index), insert)
        elif self._requests is not None:
            self._requests.run(insert)
        else:
            self._metadata.insert(row, entries)

    def _next_version(self, header: NewRecord, patient_index: bytes) -> tuple[str, int]:
        if header.supersedes is None:
            return secrets.token_hex(16), 1
        base = self.verifier.verify(self._metadata.get(header.supersedes)).row
        if not secrets.compare_digest(base.patient_index, patient_index):
            raise InvalidRecordError("patient", "differs from the patient of the amended record")
        if header.supersedes_version is not None and header.supersedes_version != base.version:
            raise RecordConflictError(
                f"version {header.supersedes_version} is not the latest of the record "
                f"(latest is {base.version}); amend the latest version"
            )
        return base.id, base.version + 1
