"""Fuzz target: a stored ciphertext in Tink's AES-GCM-HKDF streaming format
(``storage.envelope``): the header (length byte, salt, nonce prefix) and the segments,
decrypted whole in random chunks and by a random byte range. Documented:
``IntegrityError``, and ``ValueError`` for a range outside the plaintext.
"""

from __future__ import annotations

from storage.envelope import StreamingAead
from storage.errors import IntegrityError
from tests.fuzz.chunks import cuts, rng_of

KEY = bytes(range(32))
AD = b"record-fuzz/1"
SEGMENT = 128  # small segments: many of them from short inputs


def target(data: bytes) -> None:
    """Decrypt ``data`` whole, then a range of it."""
    aead = StreamingAead(KEY, SEGMENT)
    try:
        for _ in aead.decrypt(cuts(data), AD):
            pass
    except IntegrityError:
        pass
    rng = rng_of(data)
    offset, length = rng.randrange(-2, len(data) + 2), rng.randrange(-2, len(data) + 2)

    def read(start: int, size: int) -> list[bytes]:
        return cuts(data[start : start + size])

    try:
        for _ in aead.decrypt_range(read, len(data), AD, offset, length):
            pass
    except (IntegrityError, ValueError):
        pass


def seeds() -> list[bytes]:
    """Valid ciphertexts of 0 to 300 bytes (one to three segments)."""
    aead = StreamingAead(KEY, SEGMENT)
    return [b"".join(aead.encrypt([bytes(n)], AD)) for n in (0, 1, 71, 72, 300)]
