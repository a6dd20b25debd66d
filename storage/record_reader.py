"""The record store's read path: stat, open (whole or a range), list a patient's
records, their imaging studies, and re-seal a legacy row.

Every row is verified (``storage.row_auth``) before any of it is trusted, and only
then does the caller's gate run, so its audit event names the sealed patient. Content
is released segment by segment, each only after it authenticates.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

from keystore import BlindIndexer
from storage.envelope import StreamingAead
from storage.errors import IntegrityError, InvalidRecordError
from storage.index import (
    DATE,
    MODALITY,
    SERIES_UID,
    SOP_CLASS,
    SOP_UID,
    STUDY_UID,
    IndexEntry,
)
from storage.interfaces import BlobStore, MetadataStore, StoredRecord
from storage.meter import Meter
from storage.model import PatientRef, RecordInfo, RecordQuery, StudySummary
from storage.paging import decode_page_token, encode_page_token, first_out_of_place
from storage.pipeline import read_ahead
from storage.record_search import check_uid, search_filters
from storage.record_types import Gate, OpenRecord, RecordRef, StudyMember, pass_gate
from storage.row_auth import RowVerifier, VerifiedRecord
from storage.sealing import RowFields, seal
from storage.validation import check_header_patient, check_record_id

MAX_PAGE_SIZE = 500
# ListStudies and GetStudy read at most this many instances (each row is verified).
MAX_STUDY_INSTANCES = 5000


class RecordReader:
    """``RecordStore``'s read path (a mixin: ``storage.records`` builds the state)."""

    _blobs: BlobStore
    _metadata: MetadataStore
    _indexer: BlindIndexer
    verifier: RowVerifier

    def _verified(self, record_id: str, version: int | None, admit: Gate | None) -> VerifiedRecord:
        """The row, verified first; only then the gate, so its audit event names the
        sealed patient, never one a database writer chose."""
        check_record_id("id", record_id)
        verified = self.verifier.verify(self._metadata.get(record_id, version))
        row = verified.row
        pass_gate(admit, RecordRef(row.id, row.version, verified.patient_index))
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
        cipher, plain = Meter(row.stored_size), Meter(row.size)
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
        pass_gate(admit, RecordRef(None, None, patient_index))
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
        pass_gate(admit, RecordRef(None, None, patient_index))
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
