"""The record store use cases: put, open (read), stat and list encrypted records.

Write order (docs/architecture.md): wrap a fresh data key in the token, stream the ciphertext into
an object under an opaque key, then insert the metadata row last. Before the row
commits the record does not exist; a crash in between leaves only an unreferenced
object, which ``storage.sweeper`` removes after a grace period. Once the row has
committed, the object is tagged as committed, and the sweeper never deletes a tagged
object (a row a database writer deleted must not take the ciphertext with it).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from sqlalchemy.engine import Connection

from keystore import BlindIndexer, KeyWrapper
from storage.commit_tags import CommitTagger
from storage.deadlines import check_deadline, grace
from storage.envelope import StreamingAead
from storage.errors import (
    DeadlineExceededError,
    IntegrityError,
    InvalidRecordError,
    KekRetiredError,
    RecordConflictError,
    RecordNotFoundError,
    StorageError,
    never_reached_database,
)
from storage.formats import ContentValidator, checked, validator_for
from storage.index import (
    DATE,
    DOCUMENT_CODE,
    MAX_VALUE,
    MODALITY,
    OBSERVATION,
    SERIES_UID,
    SOP_CLASS,
    SOP_UID,
    STUDY_UID,
    IndexEntry,
)
from storage.interfaces import BlobStore, IndexFilter, MetadataStore, StoredRecord
from storage.model import NewRecord, PatientRef, RecordInfo, RecordQuery, StudySummary
from storage.paging import decode_page_token, encode_page_token, first_out_of_place
from storage.pipeline import read_ahead
from storage.put_requests import RequestKeyTakenError, SqlPutRequests, check_replay
from storage.row_auth import RowVerifier, Tampered, VerifiedRecord, associated_data
from storage.sealing import RowFields, SealedFields, seal
from storage.validation import check_header, check_header_patient, check_record_id

OBJECT_PREFIX = "objects/"
# The write path's named fault points, in the order a put passes them (RecordStore's
# ``fault`` seam; MEDVAULT_FAULT in service.bootstrap, docs/reliability.md).
WRITE_FAULT_POINTS = (
    "after-key-wrap", "after-upload", "before-commit", "during-audit-write", "after-commit",
)
MAX_PAGE_SIZE = 500
# ListStudies and GetStudy read at most this many instances (each row is verified).
MAX_STUDY_INSTANCES = 5000
_UID = re.compile(r"[0-9]+(\.[0-9]+)*\Z")
_DAY = re.compile(r"(\d{4})-?(\d{2})-?(\d{2})\Z")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Configured limits of the record store."""

    max_record_size: int = 4 << 30
    segment_size: int = 1 << 20
    # Segments encrypted ahead of the upload (memory per put: this many segments).
    read_ahead_segments: int = 4


@dataclass(frozen=True, slots=True)
class RecordRef:
    """What access control sees of a record before any key or content is touched."""

    id: str | None
    version: int | None
    patient_index: bytes


# Called with the record about to be written or read; raises to refuse. The service
# checks patient scope and commits the audit event here, before any byte moves.
Gate = Callable[[RecordRef], None]
# Commits a new row: called with the record and the insert (a function of a database
# connection), it must run the insert in the same transaction as the write's audit
# event (docs/architecture.md, write path step 5), and raise what the insert raised.
CommitGate = Callable[[RecordRef, Callable[[Connection], None]], None]


def _ciphertext(
    chunks: Iterable[bytes],
    validator: ContentValidator,
    aead: StreamingAead,
    ad: bytes,
    meters: tuple[_Meter, _Meter],
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


def _admit(gate: Gate | None, ref: RecordRef) -> None:
    if gate is not None:
        gate(ref)


@dataclass(frozen=True, slots=True)
class OpenRecord:
    """A record being read: its metadata, and plaintext that is released segment by segment
    only after each segment authenticates."""

    info: RecordInfo
    content: Iterator[bytes]


@dataclass
class _Meter:
    """Counts and hashes a stream as it passes, enforcing the size limit."""

    limit: int
    size: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)

    def watch(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.size += len(chunk)
            if self.size > self.limit:
                raise InvalidRecordError("content", f"exceeds the limit of {self.limit} bytes")
            self.digest.update(chunk)
            yield chunk


@dataclass(frozen=True, slots=True)
class StudyMember:
    """A record version indexed as an instance of a study (its series and SOP instance
    UIDs as indexed: labels, the record itself is verified when opened).

    ``patient_index`` is the row's, unverified: GetStudy skips, without opening it, a
    member whose row names a patient already refused in the call (an edited row can
    only hide itself that way), so refusing a large study costs one token operation
    per patient, not one per instance.
    """

    id: str
    version: int
    series_uid: str
    sop_uid: str
    patient_index: bytes = b""
    # Indexed labels too (the DICOM service answers C-FIND from them).
    sop_class: str = ""
    modality: str = ""
    study_date: str = ""


@runtime_checkable
class RefreshableKeyWrapper(KeyWrapper, Protocol):
    """A wrapper whose current KEK version can be rescanned (after a retirement)."""

    def refresh(self) -> int:
        """Rescan the master-key versions; return the current one."""
        ...


class RecordStore:
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
        _admit(admit, RecordRef(header.supersedes, None, patient_index))
        earlier = self._earlier(header, creator)
        if earlier is not None:  # a retry: read its content only to compare digests
            plain = _Meter(self._limits.max_record_size)
            for _ in plain.watch(chunks):
                pass
            return self._replay(header, creator, patient_index, plain.digest.digest(), on_replay)
        record_id, version = self._next_version(header, patient_index)
        ad = associated_data(record_id, version)
        dek = secrets.token_bytes(32)
        wrapped = self._wrapper.wrap(dek, ad)
        self._at("after-key-wrap")
        aead = StreamingAead(dek, self._limits.segment_size)
        plain = _Meter(self._limits.max_record_size)
        cipher = _Meter(aead.ciphertext_size(self._limits.max_record_size))
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
        _admit(on_replay, RecordRef(verified.row.id, verified.row.version, patient_index))
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

    def _verified(self, record_id: str, version: int | None, admit: Gate | None) -> VerifiedRecord:
        """The row, verified first; only then the gate, so its audit event names the
        sealed patient, never one a database writer chose."""
        check_record_id("id", record_id)
        verified = self.verifier.verify(self._metadata.get(record_id, version))
        row = verified.row
        _admit(admit, RecordRef(row.id, row.version, verified.patient_index))
        return verified

    def stat(
        self, record_id: str, version: int | None = None, *, admit: Gate | None = None
    ) -> RecordInfo:
        """Metadata of one version (the latest by default)."""
        return self._verified(record_id, version, admit).info()

    def open(
        self,
        record_id: str,
        version: int | None = None,
        offset: int = 0,
        length: int = 0,
        *,
        admit: Gate | None = None,
    ) -> OpenRecord:
        """Metadata and authenticated plaintext; ``length`` 0 reads to the end."""
        verified = self._verified(record_id, version, admit)
        row, info = verified.row, verified.info()
        if offset < 0 or length < 0 or (offset > row.size) or (offset == row.size and offset):
            raise InvalidRecordError("range.offset", f"is beyond the record's {row.size} bytes")
        length = min(length or row.size - offset, row.size - offset)
        aead = StreamingAead(verified.dek, row.segment_size)
        if offset == 0 and length == row.size:
            return OpenRecord(info, self._read_whole(row, aead, verified.ad))
        if self._blobs.stat(row.object_key).size != row.stored_size:
            raise IntegrityError("stored record failed authentication")
        content = aead.decrypt_range(
            lambda o, n: self._blobs.read(row.object_key, o, n),
            row.stored_size, verified.ad, offset, length,
        )  # fmt: skip
        return OpenRecord(info, content)

    def open_with_key(
        self,
        record_id: str,
        version: int | None = None,
        *,
        admit: Gate | None = None,
        content: bool = True,
    ) -> tuple[OpenRecord, bytes]:
        """A whole-record ``open`` (content empty unless ``content``) plus the record's
        data key, for sealing what is attached to the record (``storage.signatures``)."""
        verified = self._verified(record_id, version, admit)
        row = verified.row
        stream = self._read_whole(row, StreamingAead(verified.dek, row.segment_size), verified.ad)
        return OpenRecord(verified.info(), stream if content else iter(())), verified.dek

    def _read_whole(self, row: StoredRecord, aead: StreamingAead, ad: bytes) -> Iterator[bytes]:
        # Every segment is authenticated under this record's key and position, and the
        # last-segment flag catches truncation, so the ciphertext SHA-256 is not
        # recomputed here (it costs a fifth of a large read); backups verify it.
        size = 0

        def counted(chunks: Iterable[bytes]) -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                size += len(chunk)
                if size > row.stored_size:  # the object grew past its recorded size
                    raise IntegrityError("stored record failed authentication")
                yield chunk

        blob = self._blobs.read(row.object_key)
        if row.stored_size > 2 * row.segment_size:  # a thread only pays off on long reads
            blob = read_ahead(blob, depth=4)
        yield from aead.decrypt(counted(blob), ad)
        if size != row.stored_size:
            raise IntegrityError("stored record failed authentication")

    def upgrade_sealed(self, record_id: str, version: int) -> bool:
        """Re-seal a legacy (v1) row as v2 once its content proves its sizes and digests
        (``storage.reseal``); False if it is v2 already. ``IntegrityError`` if it does
        not verify; nothing is changed then."""
        verified = self.verifier.verify(self._metadata.get(record_id, version))
        if not verified.legacy:
            return False
        row = verified.row
        cipher, plain = _Meter(row.stored_size), _Meter(row.size)
        aead = StreamingAead(verified.dek, row.segment_size)
        try:
            for _ in plain.watch(aead.decrypt(cipher.watch(self._blobs.read(row.object_key)),
                                              verified.ad)):  # fmt: skip
                pass
        except InvalidRecordError as e:  # longer than the row says
            raise IntegrityError("stored record differs from its row") from e
        if not (
            plain.size == row.size
            and cipher.size == row.stored_size
            and secrets.compare_digest(plain.digest.digest(), verified.sealed.sha256)
            and secrets.compare_digest(cipher.digest.digest(), row.ciphertext_sha256)
        ):
            raise IntegrityError("stored record differs from its row")
        sealed = replace(verified.sealed, row=RowFields.of(row))
        blob = seal(verified.dek, verified.ad, sealed)
        return self._metadata.replace_sealed(row.id, row.version, row.sealed_meta, blob)

    def studies(self, patient: PatientRef, *, admit: Gate | None = None) -> list[StudySummary]:
        """The patient's imaging studies, newest study date first, from the index of
        their DICOM records; every row read is verified as this patient's first."""
        patient_index = self.patient_index(patient)
        _admit(admit, RecordRef(None, None, patient_index))
        rows = self._metadata.study_records(
            patient_index=patient_index, limit=MAX_STUDY_INSTANCES + 1
        )
        _check_study_size(rows)
        verified = [self.verifier.verify(r, patient_index=patient_index).row for r in rows]
        entries = self._metadata.index_entries([(r.id, r.version) for r in verified])
        studies: dict[str, list[list[IndexEntry]]] = {}
        for r in verified:
            found = entries.get((r.id, r.version), [])
            for uid in {e.value for e in found if e.field == STUDY_UID}:
                studies.setdefault(uid, []).append(found)
        return sorted(
            (_summary(uid, instances) for uid, instances in studies.items()),
            key=lambda s: (s.study_date, s.study_uid), reverse=True,
        )  # fmt: skip

    def study_members(self, study_uid: str) -> list[StudyMember]:
        """The latest versions indexed under ``study_uid``, oldest first: candidates only,
        each to be opened (verified, scope-checked) on its own."""
        check_uid("study_uid", study_uid)
        rows = self._metadata.study_records(study_uid=study_uid, limit=MAX_STUDY_INSTANCES + 1)
        _check_study_size(rows)
        entries = self._metadata.index_entries([(r.id, r.version) for r in rows])

        def first(found: list[IndexEntry], field: str) -> str:
            return next((e.value for e in found if e.field == field), "")

        def member(row: StoredRecord) -> StudyMember:
            found = entries.get((row.id, row.version), [])
            return StudyMember(
                row.id, row.version, first(found, SERIES_UID), first(found, SOP_UID),
                patient_index=row.patient_index, sop_class=first(found, SOP_CLASS),
                modality=first(found, MODALITY), study_date=first(found, DATE),
            )  # fmt: skip

        return [member(r) for r in rows]

    def list(
        self, query: RecordQuery, *, admit: Gate | None = None
    ) -> tuple[list[RecordInfo], str]:
        """One page of the patient's records, newest first, and the next page token.

        Every row of the page is verified, and must be this patient's; one that does not
        verify fails the whole page (DATA_LOSS), so no page silently skips it, and so does
        one that does not meet the query in Python (``first_out_of_place``). The token
        is made from the last verified row, and the row fetched only to learn that a
        next page exists is verified when that page is read.
        """
        if not 0 < query.page_size <= MAX_PAGE_SIZE:
            raise InvalidRecordError("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
        filters = search_filters(query)
        patient_index = self.patient_index(query.patient)
        after = decode_page_token(query.page_token)
        _admit(admit, RecordRef(None, None, patient_index))
        rows = self._metadata.list(
            patient_index,
            kind=query.kind.value if query.kind else None,
            created_after=query.created_after,
            created_before=query.created_before,
            all_versions=query.all_versions,
            after=after,
            limit=query.page_size + 1,
            filters=filters,
        )
        page = [
            self.verifier.verify(r, patient_index=patient_index) for r in rows[: query.page_size]
        ]
        misplaced = first_out_of_place([v.row for v in page], query, after)
        if misplaced is not None:
            raise self.verifier.refuse(misplaced)
        token = encode_page_token(page[-1].row) if len(rows) > query.page_size else ""
        return [v.info() for v in page], token

    def patient_index(self, patient: PatientRef) -> bytes:
        """The keyed blind index of ``patient`` (for grants and audit queries)."""
        check_header_patient(patient)
        return self._indexer.blind_index(patient.canonical())


def check_uid(field: str, value: str) -> None:
    """A DICOM UID: digits and dots, at most 64 characters (PS3.5 9.1)."""
    if not value or len(value) > 64 or not _UID.match(value):
        raise InvalidRecordError(field, "is not a DICOM UID (digits and dots, at most 64)")


def _check_code(field: str, value: str) -> None:
    if not value.strip() or len(value) > MAX_VALUE or any(
        ord(c) < 0x20 or ord(c) == 0x7F for c in value
    ):
        raise InvalidRecordError(
            field, f"must be 1 to {MAX_VALUE} printable characters (a code)"
        )


def _check_day(field: str, value: str) -> str:
    """``YYYY-MM-DD`` or ``YYYYMMDD`` as ``YYYYMMDD``, a real calendar day."""
    match = _DAY.match(value)
    if match is not None:
        try:
            return datetime.strptime("".join(match.groups()), "%Y%m%d").strftime("%Y%m%d")
        except ValueError:
            pass
    raise InvalidRecordError(field, "is not a date (YYYY-MM-DD)")


def search_filters(query: RecordQuery) -> list[IndexFilter]:
    """The index filters of ``query``, each value checked (errors name the field)."""
    filters: list[IndexFilter] = []
    for name, value, fields in (
        ("document_code", query.document_code, {DOCUMENT_CODE}),
        ("modality", query.modality, {MODALITY}),
        ("observation_code", query.observation_code, {OBSERVATION}),
    ):
        if value is not None:
            _check_code(name, value)
            filters.append(IndexFilter(frozenset(fields), value=value))
    for name, value, fields in (("study_uid", query.study_uid, {STUDY_UID}),
                                ("series_uid", query.series_uid, {SERIES_UID})):
        if value is not None:
            check_uid(name, value)
            filters.append(IndexFilter(frozenset(fields), value=value))
    low = _check_day("date_from", query.date_from) if query.date_from is not None else None
    high = _check_day("date_to", query.date_to) if query.date_to is not None else None
    if low is not None and high is not None and low > high:
        raise InvalidRecordError("date_from", "is after date_to")
    if low is not None or high is not None:
        filters.append(IndexFilter(frozenset({DATE}), low=low, high=high))
    return filters


def _check_study_size(rows: Sequence[StoredRecord]) -> None:
    if len(rows) > MAX_STUDY_INSTANCES:
        raise InvalidRecordError(
            "study", f"has more than {MAX_STUDY_INSTANCES} instances; list its series "
            "with ListRecords (study_uid, series_uid filters) instead",
        )  # fmt: skip


def _summary(uid: str, instances: list[list[IndexEntry]]) -> StudySummary:
    def values(field: str) -> set[str]:
        return {e.value for found in instances for e in found if e.field == field}

    dates = sorted(values(DATE))
    return StudySummary(
        study_uid=uid,
        study_date=dates[0] if dates else "",
        modalities=tuple(sorted(values(MODALITY))),
        series_count=len(values(SERIES_UID)),
        instance_count=len(instances),
    )
