"""Signatures stored with their record: several per record version (co-signing), sealed.

Table ``record_signatures`` (migration ``0004``). The ``.p7s`` names the signer and
binds the content digest, so it is sealed like the record's other metadata
(:func:`storage.sealing.seal_bytes`): AES-256-GCM under
``HKDF-SHA256(dek, info=b"medvault:signature:v1")``.

The associated data binds the row to its place and to what users are shown of it:
record id, version and signature id, so a sealed signature cannot be moved to another
record or swapped with a sibling; and the ``signer``, ``certificate_subject``,
``algorithm`` and ``signing_time`` columns (canonical JSON, :func:`signature_aad`), so
editing any of them in the database makes the signature fail to unseal
(``IntegrityError``) instead of being displayed, or used for validation, as authentic.

Layout: ``0x01 ‖ nonce (12) ‖ ciphertext ‖ tag (16)``.

Every access goes through ``RecordStore.open_with_key`` and so through its admit gate:
patient scope and the audit event come first, exactly as for reading the record. A new
row is stored by the change ``SignedRecord.prepare`` returns, which the service commits
with the signature's own audit event (``AuditTrail.record_change``).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row

from storage.audit_log import Change
from storage.errors import IntegrityError, InvalidRecordError, RecordNotFoundError
from storage.model import NewRecord, RecordInfo
from storage.pg_loads import lenient_loads
from storage.record_types import CommitGate, Gate, OpenRecord
from storage.records import RecordStore
from storage.row_auth import associated_data
from storage.row_values import RowValues
from storage.sealing import seal_bytes
from storage.sealing import unseal_bytes as _unseal
from storage.sql_metadata import (
    from_db_time,
    metadata,
    to_utc,
    translated,
    translated_change,
)
from storage.sqlite_text import StoredTime

_INFO = b"medvault:signature:v1"
_WHAT = "stored signature"
_SIGNATURE_ID = re.compile(r"^[0-9a-f]{32}\Z")
MAX_SUBJECT_LENGTH = 1024

# The schema as queries see it; storage/migrations/versions/0004_signatures.py made it.
record_signatures = sa.Table(
    "record_signatures",
    metadata,
    sa.Column("id", sa.String(32), nullable=False),
    sa.Column("record_id", sa.String(32), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("signer", sa.String(128), nullable=False),
    sa.Column("certificate_subject", sa.String(MAX_SUBJECT_LENGTH), nullable=False),
    sa.Column("algorithm", sa.String(32), nullable=False),
    sa.Column("signing_time", StoredTime(), nullable=False),
    sa.Column("created_at", StoredTime(), nullable=False),
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


def signature_aad(
    record_id: str,
    version: int,
    signature_id: str,
    *,
    signer: str,
    certificate_subject: str,
    algorithm: str,
    signing_time: datetime,
) -> bytes:
    """Associated data of a sealed ``.p7s``: its place, and the columns shown beside it.

    The shown columns are encoded canonically (JSON, sorted keys, ASCII, no spaces;
    ``signing_time`` as UTC ISO 8601 with microseconds), so the same row values give the
    same bytes on every backend.
    """
    shown = json.dumps(
        {
            "algorithm": algorithm,
            "certificate_subject": certificate_subject,
            "signer": signer,
            "signing_time": from_db_time(signing_time).isoformat(timespec="microseconds"),
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return (
        associated_data(record_id, version)
        + b":signature:"
        + signature_id.encode()
        + b":"
        + shown.encode()
    )


def _read(row: Row[Any]) -> tuple[Signature, bytes]:
    """A row's columns (its ``.p7s`` still sealed: ``b""``) and its sealed blob, read
    strictly (``storage.row_values``); ``IntegrityError``, as for a blob that does not
    unseal, if a column but ``created_at`` (which only orders the record's signatures, as
    ``StoredTime`` reads a time that does not parse) holds a value of another type."""
    v = RowValues(row._mapping)
    signature = Signature(
        id=v.text("id"), record_id=v.text("record_id"), version=v.version("version"),
        signer=v.text("signer"), certificate_subject=v.text("certificate_subject"),
        algorithm=v.text("algorithm"), signing_time=v.time("signing_time"),
        created_at=v.time("created_at"), p7s=b"",
    )  # fmt: skip
    sealed = v.binary("sealed_p7s")
    if any(name != "created_at" for name in v.malformed):
        raise IntegrityError(f"{_WHAT} failed authentication")
    return signature, sealed


def _unsealed(dek: bytes, row: Row[Any]) -> Signature:
    signature, sealed = _read(row)
    aad = signature_aad(
        signature.record_id, signature.version, signature.id, signer=signature.signer,
        certificate_subject=signature.certificate_subject, algorithm=signature.algorithm,
        signing_time=signature.signing_time,
    )  # fmt: skip
    return replace(signature, p7s=_unseal(dek, _INFO, aad, sealed, what=_WHAT))


def unseal_p7s(dek: bytes, row: Row[Any]) -> bytes:
    """The ``.p7s`` of a ``record_signatures`` row; ``IntegrityError`` if the sealed blob
    or any bound column (place, signer, subject, algorithm, signing time) was altered."""
    return _unsealed(dek, row).p7s


# Built once: a statement made per call with its values inlined costs SQLAlchemy a new
# cache key and coercion of every value, on the audit writer's thread, which every
# audited call of the process waits for (bench/sign.py's GIL profile, docs/performance.md).
_INSERT = record_signatures.insert()
_BY_ID = sa.select(record_signatures).where(record_signatures.c.id == sa.bindparam("sig_id"))


def _select_row(connection: Connection, signature_id: str) -> Row[Any]:
    row = connection.execute(_BY_ID, {"sig_id": signature_id}).first()
    if row is None:
        raise RecordNotFoundError(f"signature {signature_id} not found")
    return row


class SignedRecord:
    """One record version opened for signing or verifying: content, and its signatures."""

    def __init__(self, store: SignatureStore, opened: OpenRecord, dek: bytes) -> None:
        self._store = store
        self.info: RecordInfo = opened.info
        self.content: Iterator[bytes] = opened.content
        self._dek = dek

    def prepare(self, new: NewSignature) -> tuple[str, Change[Signature]]:
        """Seal ``new`` now; its id, and the change that stores it on a connection.

        The change is meant for the audit trail's ``record_change``: the signature row
        commits with its audit event in one transaction, or neither does. It reads the
        row back on that connection and unseals it, so a sealing mistake is caught
        before the transaction commits.
        """
        sig_id = secrets.token_hex(16)
        subject = new.certificate_subject[:MAX_SUBJECT_LENGTH]
        signing_time = to_utc(new.signing_time, "signing_time")
        aad = signature_aad(
            self.info.id, self.info.version, sig_id, signer=new.signer,
            certificate_subject=subject, algorithm=new.algorithm, signing_time=signing_time,
        )  # fmt: skip
        values = {
            "id": sig_id, "record_id": self.info.id, "version": self.info.version,
            "signer": new.signer, "certificate_subject": subject, "algorithm": new.algorithm,
            "signing_time": signing_time, "created_at": datetime.now(UTC),
            "sealed_p7s": seal_bytes(self._dek, _INFO, aad, new.p7s),
        }  # fmt: skip

        def insert(connection: Connection) -> Signature:
            connection.execute(_INSERT, values)
            return self.unseal(_select_row(connection, sig_id))

        return sig_id, translated_change(insert)

    def signatures(self) -> list[Signature]:
        """Every signature of this version, oldest first."""
        return [self.unseal(r) for r in self._store.rows_for(self.info.id, self.info.version)]

    def unseal(self, row: Row[Any]) -> Signature:
        """Decrypt one row of this record version."""
        return _unsealed(self._dek, row)


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

    def add_version(
        self,
        header: NewRecord,
        content: Iterable[bytes],
        creator: str,
        *,
        admit: Gate,
        on_commit: CommitGate,
    ) -> SignedRecord:
        """Store a new version (a PDF with an embedded signature) and open it, without
        content, to attach that signature's row.

        The write passes ``admit`` and commits with its own event through ``on_commit``,
        as a put does; the reopening is part of the same call and audits nothing more.
        """
        info = self._records.put(header, content, creator, admit=admit, on_commit=on_commit)
        opened, dek = self._records.open_with_key(info.id, info.version, content=False)
        return SignedRecord(self, opened, dek)

    def latest_version(self, record_id: str) -> int:
        """The record's latest version number (its row verified; no event: the caller
        has opened a version of this record through its gate already)."""
        return self._records.stat(record_id).version

    def get(self, signature_id: str, *, admit: Gate) -> tuple[RecordInfo, Signature]:
        """One signature by id, with the record it signs (``admit`` runs on that record)."""
        if not _SIGNATURE_ID.match(signature_id):
            raise InvalidRecordError("signature_id", "is not a signature id (32 hex digits)")
        row = self.row(signature_id)
        stored, _ = _read(row)  # the record it names, as medvault stores it, or refused
        signed = self.open(stored.record_id, stored.version, admit=admit, content=False)
        return signed.info, signed.unseal(row)

    def row(self, signature_id: str) -> Row[Any]:
        """The sealed row ``signature_id``; ``RecordNotFoundError`` when absent."""
        with (
            translated(self._engine),
            self._engine.connect() as connection,
            lenient_loads(connection),  # a value psycopg cannot load: a malformed row
        ):
            return _select_row(connection, signature_id)

    def rows_for(self, record_id: str, version: int) -> list[Row[Any]]:
        """The sealed rows of one record version, oldest first."""
        query = (
            sa.select(record_signatures)
            .where(record_signatures.c.record_id == record_id)
            .where(record_signatures.c.version == version)
            .order_by(record_signatures.c.created_at, record_signatures.c.id)
        )
        with (
            translated(self._engine),
            self._engine.connect() as connection,
            lenient_loads(connection),
        ):
            return list(connection.execute(query).all())
