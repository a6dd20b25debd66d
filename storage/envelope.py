"""Streaming AEAD with the wire format of Tink's AES-GCM-HKDF streaming AEAD (AES-256, SHA-256).

A record version's data key (DEK, 32 bytes) is the input keying material (IKM). Layout of
one ciphertext, with ``S`` the ciphertext segment size (default 1 MiB)::

    header     = 0x28 (header length, 40) || salt (32 random bytes) || nonce prefix (7 random)
    segment 0  = AES-256-GCM(first S - 40 - 16 plaintext bytes)  || tag (16)   -> S - 40 bytes
    segment i  = AES-256-GCM(next S - 16 plaintext bytes)         || tag (16)   -> S bytes
    last       = AES-256-GCM(remaining 0 .. full plaintext bytes) || tag (16)

    segment key = HKDF-SHA256(ikm=DEK, salt=salt, info=associated data, length=32)
    nonce(i)    = nonce prefix (7) || i as uint32 big-endian (4) || 0x01 if last else 0x00

The GCM associated data of every segment is empty: the record's associated data enters
through the key derivation. The header and segment 0 together fill exactly one segment, so
segment ``i >= 1`` starts at ciphertext offset ``i * S``. Plaintext that fills its last
segment exactly gets no extra empty segment; empty plaintext is one last segment of just a
tag (56 bytes in all). Any authentication failure is one opaque :class:`IntegrityError`.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, repeat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from storage.errors import IntegrityError

__all__ = ["DEFAULT_SEGMENT_SIZE", "KEY_SIZE", "StreamingAead"]

_log = logging.getLogger(__name__)

KEY_SIZE = 32  # IKM and derived AES-256 key, bytes
DEFAULT_SEGMENT_SIZE = 1 << 20
_NONCE_PREFIX_SIZE = 7
_TAG_SIZE = 16
_HEADER_SIZE = 1 + KEY_SIZE + _NONCE_PREFIX_SIZE
_MIN_SEGMENT_SIZE = _HEADER_SIZE + _TAG_SIZE + 1  # segment 0 must hold a plaintext byte
_MAX_SEGMENT_SIZE = 1 << 26  # memory holds about two segments
_MAX_SEGMENTS = 1 << 32  # the segment index is a uint32 in the nonce


def _blocks(chunks: Iterable[bytes], sizes: Iterator[int]) -> Iterator[tuple[bytes, bool]]:
    """Re-cut ``chunks`` into blocks of the next size from ``sizes``; the flag marks the final one.

    A full block is released only once a byte beyond it has arrived, so the final block is
    known to be final (it may be short, even empty). At most one block is buffered, as
    views of the incoming chunks: a block is copied once at most, and not at all when a
    chunk is exactly one block (the common case on the write path).
    """
    parts: list[memoryview] = []
    have = 0
    target = next(sizes)
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            if have == target:
                yield _join(parts), False
                parts, have, target = [], 0, next(sizes)
            take = min(target - have, len(view))
            parts.append(view[:take])
            have += take
            view = view[take:]
    yield _join(parts), True


def _join(parts: list[memoryview]) -> bytes:
    if len(parts) == 1 and isinstance(parts[0].obj, bytes) and len(parts[0]) == len(parts[0].obj):
        return parts[0].obj  # the whole chunk: no copy
    return b"".join(parts)


def _failure(reason: str) -> IntegrityError:
    """Log which check failed (no data, no key) and return the opaque error to raise."""
    _log.warning("envelope integrity check failed: %s", reason)
    return IntegrityError("ciphertext failed authentication")


class StreamingAead:
    """Encrypts and decrypts record streams segment by segment; see the module docstring."""

    def __init__(self, key: bytes, segment_size: int = DEFAULT_SEGMENT_SIZE) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise ValueError(f"key: must be {KEY_SIZE} bytes")
        if not _MIN_SEGMENT_SIZE <= segment_size <= _MAX_SEGMENT_SIZE:
            raise ValueError(
                f"segment_size: must be within [{_MIN_SEGMENT_SIZE}, {_MAX_SEGMENT_SIZE}]"
            )
        self._key = key
        self._segment_size = segment_size

    @property
    def header_size(self) -> int:
        """Bytes of header before segment 0 (40)."""
        return _HEADER_SIZE

    @property
    def segment_size(self) -> int:
        """Ciphertext bytes per full segment."""
        return self._segment_size

    def segment_plaintext_size(self, index: int) -> int:
        """Plaintext bytes a full segment ``index`` holds (segment 0 is shorter by the header)."""
        full = self._segment_size - _TAG_SIZE
        return full - _HEADER_SIZE if index == 0 else full

    def ciphertext_size(self, plaintext_size: int) -> int:
        """Exact ciphertext size, header included, for ``plaintext_size`` bytes (as Tink's)."""
        if plaintext_size < 0:
            raise ValueError("plaintext_size: must not be negative")
        full_segments, rest = divmod(plaintext_size + _HEADER_SIZE, self.segment_plaintext_size(1))
        if full_segments + (rest > 0) > _MAX_SEGMENTS:
            raise ValueError("plaintext_size: too large for this segment size")
        return full_segments * self._segment_size + (rest + _TAG_SIZE if rest else 0)

    def plaintext_size(self, ciphertext_size: int) -> int:
        """Exact plaintext size for ``ciphertext_size``; IntegrityError if no ciphertext has it."""
        return ciphertext_size - _HEADER_SIZE - _TAG_SIZE * self._segment_count(ciphertext_size)

    def _segment_count(self, ciphertext_size: int) -> int:
        count = max(1, -(-ciphertext_size // self._segment_size))
        last = ciphertext_size - max(_HEADER_SIZE, (count - 1) * self._segment_size)
        if last < _TAG_SIZE or count > _MAX_SEGMENTS:
            raise _failure("impossible ciphertext size")
        return count

    def encrypt(self, chunks: Iterable[bytes], associated_data: bytes) -> Iterator[bytes]:
        """Yield the header, then each ciphertext segment; chunks may have any sizes."""
        return self._encrypt(chunks, associated_data)

    def _encrypt(
        self,
        chunks: Iterable[bytes],
        associated_data: bytes,
        *,
        _salt_and_prefix: tuple[bytes, bytes] | None = None,
    ) -> Iterator[bytes]:
        # Tests inject salt and nonce prefix for fixed vectors; production never does.
        salt, prefix = _salt_and_prefix or (os.urandom(KEY_SIZE), os.urandom(_NONCE_PREFIX_SIZE))
        if len(salt) != KEY_SIZE or len(prefix) != _NONCE_PREFIX_SIZE:
            raise ValueError("salt and nonce prefix: wrong sizes")
        cipher = self._segment_cipher(salt, associated_data)
        yield bytes([_HEADER_SIZE]) + salt + prefix
        sizes = chain((self.segment_plaintext_size(0),), repeat(self.segment_plaintext_size(1)))
        for index, (block, last) in enumerate(_blocks(chunks, sizes)):
            if index >= _MAX_SEGMENTS:
                raise ValueError("plaintext: too large for this segment size")
            yield cipher.encrypt(self._nonce(prefix, index, last), block, None)

    def decrypt(
        self, ciphertext_chunks: Iterable[bytes], associated_data: bytes
    ) -> Iterator[bytes]:
        """Yield plaintext segment by segment, each only after its tag verified."""
        sizes = chain((_HEADER_SIZE, self._segment_size - _HEADER_SIZE), repeat(self._segment_size))
        blocks = _blocks(ciphertext_chunks, sizes)
        header, last = next(blocks)
        cipher, prefix = self._open_header(header, associated_data, more_follows=not last)
        for index, (segment, last) in enumerate(blocks):
            yield self._open(cipher, prefix, index, segment, last)

    def decrypt_range(
        self,
        read: Callable[[int, int], Iterable[bytes]],
        ciphertext_size: int,
        associated_data: bytes,
        offset: int,
        length: int,
    ) -> Iterator[bytes]:
        """Yield plaintext[offset:offset + length], reading and verifying only the segments needed.

        ``read(offset, length)`` returns that range of the stored ciphertext. The length is
        clipped at the end of the plaintext, as a slice is.
        """
        total = self.plaintext_size(ciphertext_size)
        if not 0 <= offset <= total:
            raise ValueError("offset: outside the plaintext")
        if length < 0:
            raise ValueError("length: must not be negative")
        end = min(offset + length, total)
        if end == offset:
            return iter(())
        return self._decrypt_range(read, ciphertext_size, associated_data, offset, end)

    def _decrypt_range(
        self,
        read: Callable[[int, int], Iterable[bytes]],
        ciphertext_size: int,
        associated_data: bytes,
        offset: int,
        end: int,
    ) -> Iterator[bytes]:
        header = b"".join(read(0, _HEADER_SIZE))
        cipher, prefix = self._open_header(header, associated_data, more_follows=True)
        final = self._segment_count(ciphertext_size) - 1
        first, last = self._segment_of(offset), self._segment_of(end - 1)
        start = self._segment_start(first)
        stop = ciphertext_size if last == final else self._segment_start(last + 1)
        sizes = chain((self._segment_start(first + 1) - start,), repeat(self._segment_size))
        blocks = _blocks(read(start, stop - start), sizes)
        for index in range(first, last + 1):
            segment, ended = next(blocks)
            if ended != (index == last):
                raise _failure("object store returned a range of the wrong size")
            plain = self._open(cipher, prefix, index, segment, index == final)
            base = self._plaintext_start(index)
            yield plain[max(offset - base, 0) : end - base]

    def _segment_of(self, position: int) -> int:
        first = self.segment_plaintext_size(0)
        return 0 if position < first else 1 + (position - first) // self.segment_plaintext_size(1)

    def _plaintext_start(self, index: int) -> int:
        if index == 0:
            return 0
        return self.segment_plaintext_size(0) + (index - 1) * self.segment_plaintext_size(1)

    def _segment_start(self, index: int) -> int:
        return _HEADER_SIZE if index == 0 else index * self._segment_size

    def _segment_cipher(self, salt: bytes, associated_data: bytes) -> AESGCM:
        hkdf = HKDF(algorithm=SHA256(), length=KEY_SIZE, salt=salt, info=associated_data)
        return AESGCM(hkdf.derive(self._key))

    @staticmethod
    def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
        return prefix + struct.pack(">IB", index, last)

    def _open_header(
        self, header: bytes, associated_data: bytes, *, more_follows: bool
    ) -> tuple[AESGCM, bytes]:
        if not more_follows or len(header) != _HEADER_SIZE or header[0] != _HEADER_SIZE:
            raise _failure("missing or malformed header")
        salt, prefix = header[1 : 1 + KEY_SIZE], header[1 + KEY_SIZE :]
        return self._segment_cipher(salt, associated_data), prefix

    def _open(self, cipher: AESGCM, prefix: bytes, index: int, segment: bytes, last: bool) -> bytes:
        if len(segment) < _TAG_SIZE or index >= _MAX_SEGMENTS:
            raise _failure(f"segment {index} too short or out of range")
        try:
            return cipher.decrypt(self._nonce(prefix, index, last), segment, None)
        except InvalidTag:
            raise _failure(f"segment {index} tag mismatch") from None
