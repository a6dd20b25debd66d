"""The one place a metadata row becomes trusted: :class:`RowVerifier`.

The database may be written by someone without the token (docs/architecture.md, "Rows are not
trusted"). Before anything of a row is used (its patient for the access gate, its sizes,
object key and times for the read and the reply), the row is verified:

0. a row holding a value of another type than its column's (``StoredRecord.malformed``,
   ``storage.row_values``) fails at once, reported under its id and version as read
   (placeholders ``""`` and 0 if those are the malformed ones);
1. unwrap its data key in the token, bound to the row's id and version (an edited
   ``wrapped_dek``, ``kek_version``, ``id`` or ``version`` fails here);
2. unseal its metadata under that key, bound to id and version;
3. v2 metadata: compare every trusted column (:class:`storage.sealing.RowFields`) with
   the sealed copy, in one constant-time comparison of canonical bytes;
   legacy v1 metadata (no sealed copy): recompute the blind index of the sealed patient
   in the token and compare it with the row's ``patient_index``; the other columns are
   checked only for shape (see docs/encryption.md, "Legacy rows").

Any failure is :class:`RowTamperedError` (an ``IntegrityError``: DATA_LOSS), naming the
record and version only, and is reported to ``on_tampered`` (the service raises an
incident) before it is raised.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from keystore import BlindIndexer, KeyWrapper, UnwrapError, WrappedKey
from storage.errors import IntegrityError
from storage.interfaces import StoredRecord
from storage.model import RecordInfo, RecordKind
from storage.sealing import RowFields, SealedFields, row_binding, unseal

_KINDS = frozenset(k.value for k in RecordKind)


def associated_data(record_id: str, version: int) -> bytes:
    """Bind ciphertext and wrapped key to one record version (docs/encryption.md)."""
    return b"medvault:record:v1:" + record_id.encode() + b":" + version.to_bytes(4, "big")


class RowTamperedError(IntegrityError):
    """A metadata row does not verify: its key, its seal or a column was altered."""

    def __init__(self, record_id: str, version: int) -> None:
        super().__init__("stored record metadata failed authentication")
        self.record_id = record_id
        self.version = version

    @property
    def resource(self) -> str:
        """The audit resource of the record version (no patient data)."""
        return f"record/{self.record_id}/v{self.version}"


@dataclass(frozen=True, slots=True)
class VerifiedRecord:
    """A row that verified, with its data key and its unsealed metadata."""

    row: StoredRecord
    dek: bytes
    sealed: SealedFields

    @property
    def legacy(self) -> bool:
        """True for a v1 row, whose columns other than the patient are not sealed."""
        return self.sealed.row is None

    @property
    def patient_index(self) -> bytes:
        """The verified blind index of the record's patient."""
        return self.row.patient_index

    @property
    def ad(self) -> bytes:
        """The record version's associated data."""
        return associated_data(self.row.id, self.row.version)

    def info(self) -> RecordInfo:
        """What a caller may see of the record (decrypted, verified metadata)."""
        row = self.row
        return RecordInfo(
            id=row.id, version=row.version, patient=self.sealed.patient,
            kind=RecordKind(row.kind), content_type=row.content_type, title=self.sealed.title,
            size=row.size, stored_size=row.stored_size, sha256=self.sealed.sha256,
            created_at=row.created_at, created_by=row.created_by,
            supersedes_version=row.supersedes_version,
        )  # fmt: skip


Tampered = Callable[[RowTamperedError], None]


class RowVerifier:
    """Turns a :class:`StoredRecord` into a :class:`VerifiedRecord`, or refuses it."""

    def __init__(
        self,
        wrapper: KeyWrapper,
        indexer: BlindIndexer | None,
        *,
        accept_legacy: bool = True,
        on_tampered: Tampered | None = None,
    ) -> None:
        self._wrapper = wrapper
        # Only legacy rows need it (their patient is checked by recomputing the index).
        self._indexer = indexer
        self._accept_legacy = accept_legacy
        self._on_tampered = on_tampered

    def verify(self, row: StoredRecord, *, patient_index: bytes | None = None) -> VerifiedRecord:
        """Verify ``row`` (and, if given, that it is ``patient_index``'s record)."""
        try:
            verified = self._verified(row, patient_index)
        except IntegrityError as e:
            tampered = RowTamperedError(row.id, row.version)
            if self._on_tampered is not None:
                self._on_tampered(tampered)
            raise tampered from e
        return verified

    def refuse(self, row: StoredRecord) -> RowTamperedError:
        """Report ``row`` as tampered with (authentic, but returned where its verified
        values say it does not belong) and return the error to raise."""
        tampered = RowTamperedError(row.id, row.version)
        if self._on_tampered is not None:
            self._on_tampered(tampered)
        return tampered

    def _verified(self, row: StoredRecord, patient_index: bytes | None) -> VerifiedRecord:
        if row.malformed:  # a value of a type medvault never stores (storage.row_values)
            raise IntegrityError("row holds a value of another type than its column's")
        if patient_index is not None and not secrets.compare_digest(
            row.patient_index, patient_index
        ):
            raise IntegrityError("row listed under another patient")
        ad = associated_data(row.id, row.version)
        try:
            dek = self._wrapper.unwrap(WrappedKey(row.kek_version, row.wrapped_dek), ad)
        except UnwrapError as e:
            raise IntegrityError("stored record key failed authentication") from e
        sealed = unseal(dek, ad, row.sealed_meta)
        expected_supersedes = row.version - 1 if row.version > 1 else None
        if row.supersedes_version != expected_supersedes or row.kind not in _KINDS:
            raise IntegrityError("row columns are inconsistent")
        if sealed.row is not None:
            if not secrets.compare_digest(row_binding(RowFields.of(row)), row_binding(sealed.row)):
                raise IntegrityError("row differs from its sealed columns")
        else:
            self._check_legacy(row, sealed)
        return VerifiedRecord(row, dek, sealed)

    def _check_legacy(self, row: StoredRecord, sealed: SealedFields) -> None:
        if not self._accept_legacy or self._indexer is None:
            raise IntegrityError("legacy sealed metadata is not accepted here")
        index = self._indexer.blind_index(sealed.patient.canonical())
        if not secrets.compare_digest(index, row.patient_index):
            raise IntegrityError("row names another patient than its sealed one")
