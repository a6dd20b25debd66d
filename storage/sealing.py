"""Small sealed fields: the patient identifier, title and plaintext digest of a record.

They are encrypted under a key derived from the record's data key, so the metadata
database holds no plaintext patient data and no unkeyed digest of plaintext.

Layout: ``0x01 ‖ nonce (12) ‖ AES-256-GCM(key, nonce, json, aad) ‖ tag (16)`` where
``key = HKDF-SHA256(dek, salt=None, info=b"medvault:sealed-meta:v1")`` and ``aad`` is the
record's associated data (id and version), so a sealed blob cannot move between records.
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
_INFO = b"medvault:sealed-meta:v1"


@dataclass(frozen=True, slots=True)
class SealedFields:
    """The fields of a record that are stored only as ciphertext."""

    patient: PatientRef
    title: str
    sha256: bytes


def _key(dek: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO)
    return AESGCM(hkdf.derive(dek))


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
    nonce = os.urandom(12)
    return _VERSION + nonce + _key(dek).encrypt(nonce, body, associated_data)


def unseal(dek: bytes, associated_data: bytes, blob: bytes) -> SealedFields:
    """Decrypt a sealed blob; ``IntegrityError`` if it was altered or moved."""
    if len(blob) < 29 or blob[:1] != _VERSION:
        raise IntegrityError("stored record metadata failed authentication")
    try:
        body = _key(dek).decrypt(blob[1:13], blob[13:], associated_data)
    except InvalidTag as e:
        raise IntegrityError("stored record metadata failed authentication") from e
    data = json.loads(body)
    return SealedFields(
        patient=PatientRef(id=data["id"], authority=data["authority"]),
        title=data["title"],
        sha256=bytes.fromhex(data["sha256"]),
    )
