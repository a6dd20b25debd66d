"""Synthetic content for the record tests: deterministic bytes and small documents.

Nothing here is patient data; identifiers are random per test so that no test can see
another's records and nothing identifying is ever printed.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Iterator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from service._gen.medvault.v1 import records_pb2 as pb
from tests import content

# Plaintext per segment with the default 1 MiB ciphertext segment (storage/envelope.py):
# segment 0 also carries the 40-byte header; every segment carries a 16-byte tag.
SEGMENT = 1 << 20
FIRST_PLAIN = SEGMENT - 56
PLAIN = SEGMENT - 16
AUTHORITY = "urn:oid:2.999.42.1"


def new_patient() -> pb.PatientId:
    """A patient identifier no other test uses."""
    return pb.PatientId(id=f"T{uuid.uuid4().hex}", assigning_authority=AUTHORITY)


def data(size: int, seed: int = 0) -> bytes:
    """``size`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def stream(size: int, seed: int = 0, chunk: int = 1 << 20) -> Iterator[bytes]:
    """``size`` reproducible pseudo-random bytes in chunks, without holding them all.

    AES-CTR over zeros is a fast keyed generator: hundreds of MiB/s in pure Python.
    """
    key = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(chunk)
    left = size
    while left > 0:
        n = min(chunk, left)
        yield encryptor.update(zeros[:n])
        left -= n


def stream_sha256(size: int, seed: int = 0) -> bytes:
    """SHA-256 of ``stream(size, seed)``."""
    digest = hashlib.sha256()
    for block in stream(size, seed):
        digest.update(block)
    return digest.digest()


def pdf(marker: str = "", *, filler: bytes = b"") -> bytes:
    """A minimal synthetic PDF document (``tests.content.pdf``), distinct per marker."""
    return content.pdf(f"synthetic {marker or uuid.uuid4().hex}", filler=filler)


def hl7v2(patient: pb.PatientId, control_id: str = "") -> bytes:
    """A synthetic HL7 v2 ORU message about ``patient`` (``tests.content.hl7v2``)."""
    return content.hl7v2(patient.id, patient.assigning_authority,
                         control_id=control_id or uuid.uuid4().hex[:20])
