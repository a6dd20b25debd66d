"""Sealing under the record's data key: small fields of a record, and what is attached to it.

One primitive, :func:`seal_bytes` / :func:`unseal_bytes`: AES-256-GCM under
``key = HKDF-SHA256(dek, salt=None, info)``, with caller-chosen associated data.

Layout: ``0x01 ‖ nonce (12) ‖ AES-256-GCM(key, nonce, data, aad) ‖ tag (16)``.

Record metadata (the patient identifier, title and plaintext digest) is sealed with
``info=b"medvault:sealed-meta:v1"`` and the record's associated data (id and version) as
``aad``, so the metadata database holds no plaintext patient data and no unkeyed digest
of plaintext, and a sealed blob cannot move between records.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from storage.errors import IntegrityError
from storage.model import PatientRef

_VERSION = b"\x01"
_NONCE_SIZE = 12
_MIN_SIZE = 1 + _NONCE_SIZE + 16
_META_INFO = b"medvault:sealed-meta:v1"


@dataclass(frozen=True, slots=True)
class SealedFields:
    """The fields of a record that are stored only as ciphertext."""

    patient: PatientRef
    title: str
    sha256: bytes


def _key(dek: bytes, info: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info)
    return AESGCM(hkdf.derive(dek))


def seal_bytes(dek: bytes, info: bytes, aad: bytes, data: bytes) -> bytes:
    """Encrypt ``data`` under ``HKDF(dek, info)``, authenticating ``aad`` with it."""
    nonce = os.urandom(_NONCE_SIZE)
    return _VERSION + nonce + _key(dek, info).encrypt(nonce, data, aad)


def unseal_bytes(dek: bytes, info: bytes, aad: bytes, blob: bytes, *, what: str) -> bytes:
    """Decrypt a :func:`seal_bytes` blob; ``IntegrityError`` naming ``what`` if it was
    altered, moved, or its associated data differs."""
    if len(blob) < _MIN_SIZE or blob[:1] != _VERSION:
        raise IntegrityError(f"{what} failed authentication")
    try:
        return _key(dek, info).decrypt(blob[1 : 1 + _NONCE_SIZE], blob[1 + _NONCE_SIZE :], aad)
    except InvalidTag as e:
        raise IntegrityError(f"{what} failed authentication") from e


def seal(dek: bytes, associated_data: bytes, fields: SealedFields) -> bytes:
    """Encrypt ``fields`` for storage in the metadata row."""
    body = json.dumps(
        {
            "id": fields.patient.id,
            "authority": fields.patient.authority,
            "title": fields.title,
            "sha256": fields.sha256.hex(),
        },
        separators=(",", ":"),
    ).encode()
    return seal_bytes(dek, _META_INFO, associated_data, body)


def unseal(dek: bytes, associated_data: bytes, blob: bytes) -> SealedFields:
    """Decrypt a sealed blob; ``IntegrityError`` if it was altered or moved."""
    body = unseal_bytes(dek, _META_INFO, associated_data, blob, what="stored record metadata")
    data = json.loads(body)
    return SealedFields(
        patient=PatientRef(id=data["id"], authority=data["authority"]),
        title=data["title"],
        sha256=bytes.fromhex(data["sha256"]),
    )
