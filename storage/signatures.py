"""Signatures stored with their record: several per record version (co-signing), sealed.

Table ``record_signatures`` (migration ``0004``). The ``.p7s`` names the signer and
binds the content digest, so it is sealed like the record's other metadata: AES-256-GCM
under ``HKDF-SHA256(dek, info=b"medvault:signature:v1")``, with associated data that
binds record id, version and signature id, so a sealed signature cannot be moved to
another record or swapped with a sibling.

Layout: ``0x01 ‖ nonce (12) ‖ ciphertext ‖ tag (16)``.

Every access goes through ``RecordStore.open_with_key`` and so through its admit gate:
patient scope and the audit event come first, exactly as for reading the record.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy.engine import Engine, Row

from storage.errors import IntegrityError, InvalidRecordError, RecordNotFoundError
from storage.model import RecordInfo
from storage.records import Gate, OpenRecord, RecordStore, associated_data
from storage.sql_metadata import _from_db, _translated, _utc, metadata

_VERSION = b"\x01"
_INFO = b"medvault:signature:v1"
_SIGNATURE_ID = re.compile(r"^[0-9a-f]{32}$")

# The schema as queries see it; storage/migrations/versions/0004_signatures.py made it.
record_signatures = sa.Table(
    "record_signatures",
    metadata,
    sa.Column("id", sa.String(32), nullable=False),
    sa.Column("record_id", sa.String(32), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("signer", sa.String(128), nullable=False),
    sa.Column("certificate_subject", sa.String(1024), nullable=False),
    sa.Column("algorithm", sa.String(32), nullable=False),
    sa.Column("signing_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("sealed_p7s", sa.LargeBinary, nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_record_signatures"),
    sa.ForeignKeyConstraint(
        ["record_id", "version"],
        ["records.id", "records.version"],
        name="fk_record_signatures_record",
    ),
    sa.Index("ix_record_signatures_record", "record_id", "version"),
)


@dataclass(frozen=True, slots=True)
class NewSignature:
    """A signature just made, before it is stored."""

    signer: str
    certificate_subject: str
    algorithm: str
    signing_time: datetime
    p7s: bytes


@dataclass(frozen=True, slots=True)
class Signature:
    """A stored signature of one record version, unsealed."""

    id: str
    record_id: str
    version: int
    signer: str
    certificate_subject: str
    algorithm: str
    signing_time: datetime
    created_at: datetime
    p7s: bytes


def _key(dek: bytes) -> AESGCM:
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(dek))


def _aad(record_id: str, version: int, signature_id: str) -> bytes:
    return associated_data(record_id, version) + b":signature:" + signature_id.encode()


def seal_bytes(dek: bytes, aad: bytes, data: bytes) -> bytes:
    """Encrypt ``data`` under a key derived from the record's data key."""
    nonce = os.urandom(12)
    return _VERSION + nonce + _key(dek).encrypt(nonce, data, aad)


def unseal_bytes(dek: bytes, aad: bytes, blob: bytes) -> bytes:
    """Decrypt a sealed blob; ``IntegrityError`` if it was altered or moved."""
    if len(blob) < 29 or blob[:1] != _VERSION:
        raise IntegrityError("stored signature failed authentication")
    try:
        return _key(dek).decrypt(blob[1:13], blob[13:], aad)
    except InvalidTag as e:
        raise IntegrityError("stored signature failed authentication") from e


class SignedRecord:
    """One record version opened for signing or verifying: content, and its signatures."""

    def __init__(self, store: SignatureStore, opened: OpenRecord, dek: bytes) -> None:
        self._store = store
        self.info: RecordInfo = opened.info
        self.content: Iterator[bytes] = opened.content
        self._dek = dek

    def add(self, new: NewSignature) -> Signature:
        """Seal and store ``new``; return it with its id."""
        sig_id = secrets.token_hex(16)
        sealed = seal_bytes(self._dek, _aad(self.info.id, self.info.version, sig_id), new.p7s)
        values = {
            "id": sig_id, "record_id": self.info.id, "version": self.info.version,
            "signer": new.signer, "certificate_subject": new.certificate_subject[:1024],
            "algorithm": new.algorithm, "signing_time": _utc(new.signing_time, "signing_time"),
            "created_at": datetime.now(UTC), "sealed_p7s": sealed,
        }  # fmt: skip
        self._store.insert(values)
        return self.unseal(self._store.row(sig_id))

    def signatures(self) -> list[Signature]:
        """Every signature of this version, oldest first."""
        return [self.unseal(r) for r in self._store.rows_for(self.info.id, self.info.version)]

    def unseal(self, row: Row[Any]) -> Signature:
        """Decrypt one row of this record version."""
        p7s = unseal_bytes(self._dek, _aad(row.record_id, row.version, row.id), row.sealed_p7s)
        return Signature(
            id=row.id, record_id=row.record_id, version=row.version, signer=row.signer,
            certificate_subject=row.certificate_subject, algorithm=row.algorithm,
            signing_time=_from_db(row.signing_time), created_at=_from_db(row.created_at),
            p7s=p7s,
        )  # fmt: skip


class SignatureStore:
    """Signatures on SQL beside the records, opened through the record store's gate."""

    def __init__(self, records: RecordStore, engine: Engine) -> None:
        self._records = records
        self._engine = engine

    def open(
        self, record_id: str, version: int | None, *, admit: Gate, content: bool = True
    ) -> SignedRecord:
        """Open a record version (``admit`` checks scope and audits first)."""
        opened, dek = self._records.open_with_key(record_id, version, admit=admit, content=content)
        return SignedRecord(self, opened, dek)

    def get(self, signature_id: str, *, admit: Gate) -> tuple[RecordInfo, Signature]:
        """One signature by id, with the record it signs (``admit`` runs on that record)."""
        if not _SIGNATURE_ID.match(signature_id):
            raise InvalidRecordError("signature_id", "is not a signature id (32 hex digits)")
        row = self.row(signature_id)
        signed = self.open(row.record_id, row.version, admit=admit, content=False)
        return signed.info, signed.unseal(row)

    def insert(self, values: dict[str, Any]) -> None:
        """Insert one sealed row."""
        with _translated(self._engine), self._engine.begin() as connection:
            connection.execute(record_signatures.insert().values(**values))

    def row(self, signature_id: str) -> Row[Any]:
        """The sealed row ``signature_id``; ``RecordNotFoundError`` when absent."""
        query = sa.select(record_signatures).where(record_signatures.c.id == signature_id)
        with _translated(self._engine), self._engine.connect() as connection:
            row = connection.execute(query).first()
        if row is None:
            raise RecordNotFoundError(f"signature {signature_id} not found")
        return row

    def rows_for(self, record_id: str, version: int) -> list[Row[Any]]:
        """The sealed rows of one record version, oldest first."""
        query = (
            sa.select(record_signatures)
            .where(record_signatures.c.record_id == record_id)
            .where(record_signatures.c.version == version)
            .order_by(record_signatures.c.created_at, record_signatures.c.id)
        )
        with _translated(self._engine), self._engine.connect() as connection:
            return list(connection.execute(query).all())
