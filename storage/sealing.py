"""Sealing under the record's data key: small fields of a record, and what is attached to it.

One primitive, :func:`seal_bytes` / :func:`unseal_bytes`: AES-256-GCM under
``key = HKDF-SHA256(dek, salt=None, info)``, with caller-chosen associated data.

Layout: ``version (1) ‖ nonce (12) ‖ AES-256-GCM(key, nonce, data, aad) ‖ tag (16)``;
the version byte is ``0x01`` except for sealed record metadata v2 (``0x02``).

Record metadata is sealed with the record's associated data (id and version) as ``aad``,
so a sealed blob cannot move between records, and the metadata database holds no
plaintext patient data and no unkeyed digest of plaintext:

- v1 (``0x01``, ``info=b"medvault:sealed-meta:v1"``): patient identifier, title and
  plaintext digest. Records written before v2 (legacy; see docs/encryption.md).
- v2 (``0x02``, ``info=b"medvault:sealed-meta:v2"``): the same, plus every row column a
  read or list trusts (:class:`RowFields`). The version byte and the HKDF info both
  change, so neither layout can be passed off as the other.

The body is canonical JSON (sorted keys, no spaces, ASCII): :func:`row_binding` gives the
same bytes for the sealed copy and for the row, which are compared in one
constant-time comparison.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from storage.errors import IntegrityError
from storage.interfaces import StoredRecord
from storage.model import PatientRef

_VERSION = b"\x01"
META_V1 = b"\x01"
META_V2 = b"\x02"
_NONCE_SIZE = 12
_MIN_SIZE = 1 + _NONCE_SIZE + 16
_META_INFO = {META_V1: b"medvault:sealed-meta:v1", META_V2: b"medvault:sealed-meta:v2"}
_WHAT = "stored record metadata"


@dataclass(frozen=True, slots=True)
class RowFields:
    """The row columns a read or list trusts, sealed in v2 so a database writer cannot
    change them unnoticed. ``kek_version`` and ``wrapped_dek`` are not here: the rewrap
    changes them, and the unwrap authenticates them (bound to id and version)."""

    patient_index: bytes
    kind: str
    content_type: str
    object_key: str
    size: int
    stored_size: int
    ciphertext_sha256: bytes
    segment_size: int
    created_at: datetime
    created_by: str
    supersedes_version: int | None

    @classmethod
    def of(cls, row: StoredRecord) -> RowFields:
        """The trusted columns of ``row``, as the database returned them."""
        return cls(
            patient_index=row.patient_index, kind=row.kind, content_type=row.content_type,
            object_key=row.object_key, size=row.size, stored_size=row.stored_size,
            ciphertext_sha256=row.ciphertext_sha256, segment_size=row.segment_size,
            created_at=row.created_at, created_by=row.created_by,
            supersedes_version=row.supersedes_version,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """Canonical JSON values (bytes as hex, the time as UTC ISO 8601 in microseconds)."""
        return {
            "patient_index": self.patient_index.hex(), "kind": self.kind,
            "content_type": self.content_type, "object_key": self.object_key,
            "size": self.size, "stored_size": self.stored_size,
            "ciphertext_sha256": self.ciphertext_sha256.hex(),
            "segment_size": self.segment_size,
            "created_at": self.created_at.astimezone(UTC).isoformat(timespec="microseconds"),
            "created_by": self.created_by, "supersedes_version": self.supersedes_version,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RowFields:
        """Inverse of :meth:`to_json`."""
        supersedes = data["supersedes_version"]
        return cls(
            patient_index=bytes.fromhex(data["patient_index"]), kind=str(data["kind"]),
            content_type=str(data["content_type"]), object_key=str(data["object_key"]),
            size=int(data["size"]), stored_size=int(data["stored_size"]),
            ciphertext_sha256=bytes.fromhex(data["ciphertext_sha256"]),
            segment_size=int(data["segment_size"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            created_by=str(data["created_by"]),
            supersedes_version=None if supersedes is None else int(supersedes),
        )  # fmt: skip


def row_binding(fields: RowFields) -> bytes:
    """Canonical bytes of ``fields``: equal bytes if and only if equal columns."""
    return _canonical(fields.to_json())


@dataclass(frozen=True, slots=True)
class SealedFields:
    """The fields of a record that are stored only as ciphertext.

    ``row`` is the sealed copy of the trusted row columns (v2); ``None`` for a legacy v1
    blob, which sealed only the patient, title and digest.
    """

    patient: PatientRef
    title: str
    sha256: bytes
    row: RowFields | None = None


def _canonical(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _key(dek: bytes, info: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info)
    return AESGCM(hkdf.derive(dek))


def seal_bytes(
    dek: bytes, info: bytes, aad: bytes, data: bytes, *, version: bytes = _VERSION
) -> bytes:
    """Encrypt ``data`` under ``HKDF(dek, info)``, authenticating ``aad`` with it."""
    nonce = os.urandom(_NONCE_SIZE)
    return version + nonce + _key(dek, info).encrypt(nonce, data, aad)


def unseal_bytes(
    dek: bytes, info: bytes, aad: bytes, blob: bytes, *, what: str, version: bytes = _VERSION
) -> bytes:
    """Decrypt a :func:`seal_bytes` blob; ``IntegrityError`` naming ``what`` if it was
    altered, moved, or its associated data differs."""
    if len(blob) < _MIN_SIZE or blob[:1] != version:
        raise IntegrityError(f"{what} failed authentication")
    try:
        return _key(dek, info).decrypt(blob[1 : 1 + _NONCE_SIZE], blob[1 + _NONCE_SIZE :], aad)
    except InvalidTag as e:
        raise IntegrityError(f"{what} failed authentication") from e


def seal(dek: bytes, associated_data: bytes, fields: SealedFields) -> bytes:
    """Encrypt ``fields`` for the metadata row: v2 with ``fields.row``, v1 without
    (v1 is written only by tests that build legacy rows)."""
    body: dict[str, Any] = {
        "id": fields.patient.id,
        "authority": fields.patient.authority,
        "title": fields.title,
        "sha256": fields.sha256.hex(),
    }
    if fields.row is None:  # the legacy layout, byte for byte
        data = json.dumps(body, separators=(",", ":")).encode()
        return seal_bytes(dek, _META_INFO[META_V1], associated_data, data, version=META_V1)
    body["row"] = fields.row.to_json()
    data = _canonical(body)
    return seal_bytes(dek, _META_INFO[META_V2], associated_data, data, version=META_V2)


def is_legacy(blob: bytes) -> bool:
    """True for a v1 sealed-metadata blob (by its version byte, which is authenticated
    by the HKDF info: a flipped byte fails to unseal)."""
    return blob[:1] == META_V1


def unseal(dek: bytes, associated_data: bytes, blob: bytes) -> SealedFields:
    """Decrypt a sealed blob (v1 or v2); ``IntegrityError`` if it was altered or moved."""
    version = blob[:1]
    if version not in _META_INFO:
        raise IntegrityError(f"{_WHAT} failed authentication")
    body = unseal_bytes(
        dek, _META_INFO[version], associated_data, blob, what=_WHAT, version=version
    )
    try:
        data = json.loads(body)
        row = RowFields.from_json(data["row"]) if version == META_V2 else None
        return SealedFields(
            patient=PatientRef(id=data["id"], authority=data["authority"]),
            title=data["title"],
            sha256=bytes.fromhex(data["sha256"]),
            row=row,
        )
    except (KeyError, TypeError, ValueError) as e:  # authentic, yet not ours: a bug
        raise IntegrityError(f"{_WHAT} failed authentication") from e
