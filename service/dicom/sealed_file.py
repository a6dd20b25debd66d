"""A temporary file that only this process can read: nameless, sealed with a key in memory.

The DICOM spool (``service.dicom.spool``) keeps a received data set here while it
arrives. Nothing of it reaches the disk in clear, and nothing outlives the process:

* The file is created in the spool folder and unlinked at once: it has no name while it
  is written and read, and the kernel frees it when its descriptor closes, which a
  killed process's does too. (A crash between the create and the unlink leaves an empty
  file, which the next start removes.)
* What is written is sealed first. Layout: the plaintext is cut into chunks of
  ``CHUNK`` bytes (the last one shorter); chunk ``i`` is at offset ``i * (CHUNK + 16)``
  as AES-256-GCM(key, nonce_i, chunk), the ciphertext followed by its 16-byte tag, with
  ``nonce_i`` = the file's 8 random bytes followed by ``i`` (4 bytes, big endian). No
  header: the key (32 random bytes, fresh per file), the nonce prefix and the plaintext
  length are held in memory only and never written anywhere, so the blocks the file
  leaves on the disk are ciphertext under a key that died with the process. A chunk
  altered, moved or cut off fails its tag or the length: ``SpoolIntegrityError``.

Until a chunk is full its bytes are held in memory (at most ``CHUNK``).
"""

from __future__ import annotations

import io
import os
import secrets
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.errors import ServiceError

CHUNK = 64 << 10
TAG = 16
SUFFIX = ".spool"
_MAX_CHUNKS = 1 << 32  # the chunk index is 4 bytes of the nonce
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class SpoolIntegrityError(ServiceError):
    """A sealed temporary file failed its check (altered or cut off): opaque on purpose."""


class SealedFile:
    """An append-then-read temporary file in ``folder``, sealed with a key of its own."""

    def __init__(self, folder: Path) -> None:
        path = folder / (secrets.token_hex(16) + SUFFIX)
        self._fd = os.open(path, _FLAGS, 0o600)
        self._closer = weakref.finalize(self, os.close, self._fd)  # also when dropped
        try:
            path.unlink()
        except FileNotFoundError:  # another start emptied the folder meanwhile: as good
            pass
        except OSError:
            self._closer()
            raise
        self.name = str(path)
        # Held around every use of the descriptor and around its close: ``release`` may
        # close a spool from another thread as its handler starts reading, and a read or
        # write after the close would reach whatever file the number was reused for.
        self._lock = threading.Lock()
        self._cipher: AESGCM | None = AESGCM(AESGCM.generate_key(bit_length=256))
        self._prefix = os.urandom(8)
        self._pending = bytearray()
        self._chunks = 0  # chunks on the disk
        self.size = 0  # plaintext bytes appended

    @contextmanager
    def _descriptor(self) -> Iterator[int]:
        """The open descriptor, under the lock; ``ValueError`` once the file is closed."""
        with self._lock:
            if not self._closer.alive:
                raise ValueError("the sealed file is closed")
            yield self._fd

    def _seal(self, index: int, plain: bytes | bytearray | memoryview) -> bytes:
        if self._cipher is None:
            raise ValueError("the sealed file is closed")
        if index >= _MAX_CHUNKS:
            raise ValueError("the sealed file is full")
        return self._cipher.encrypt(self._prefix + index.to_bytes(4, "big"), bytes(plain), None)

    def _write_chunk(self, plain: bytes | bytearray | memoryview) -> None:
        sealed = memoryview(self._seal(self._chunks, plain))
        offset = self._chunks * (CHUNK + TAG)
        with self._descriptor() as fd:
            while sealed:
                done = os.pwrite(fd, sealed, offset)
                sealed, offset = sealed[done:], offset + done
        self._chunks += 1

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data`` at the end: full chunks are sealed and written, the rest waits."""
        view = memoryview(data).cast("B")
        self.size += len(view)
        if self._pending:
            take = CHUNK - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < CHUNK:
                return
            self._write_chunk(self._pending)
            self._pending.clear()
        while len(view) >= CHUNK:
            self._write_chunk(view[:CHUNK])
            view = view[CHUNK:]
        self._pending += view

    def flush(self) -> None:
        """Seal and write the last, partial chunk: the file then holds all of the data.

        Called once the data is complete (before reading); nothing may be appended after.
        """
        if self._pending:
            self._write_chunk(self._pending)
            self._pending.clear()

    def discard(self) -> None:
        """Forget everything appended so far and give the disk back."""
        self._pending.clear()
        self._chunks = 0
        self.size = 0
        with self._descriptor() as fd:
            os.ftruncate(fd, 0)

    def reader(self) -> BinaryIO:
        """A new reader of the plaintext from its start (seekable, one chunk held).

        Not an ``io.BufferedReader`` and without a ``name``: pydicom reopens such a file
        by its name to read a deferred value, and this one has none.
        """
        self.flush()
        return cast(BinaryIO, _Reader(self))

    def read_chunk(self, index: int) -> bytes:
        """The plaintext of chunk ``index``; ``SpoolIntegrityError`` if it fails its check."""
        cipher = self._cipher
        if cipher is None:
            raise ValueError("the sealed file is closed")
        length = min(CHUNK, self.size - index * CHUNK)
        if length <= 0 or index >= self._chunks:
            raise SpoolIntegrityError("the spooled data failed its integrity check")
        with self._descriptor() as fd:
            sealed = os.pread(fd, length + TAG, index * (CHUNK + TAG))
        if len(sealed) != length + TAG:
            raise SpoolIntegrityError("the spooled data failed its integrity check")
        try:
            return cipher.decrypt(self._prefix + index.to_bytes(4, "big"), sealed, None)
        except InvalidTag:
            raise SpoolIntegrityError("the spooled data failed its integrity check") from None

    @property
    def closed(self) -> bool:
        """True once ``close`` ran (or the file was collected)."""
        return not self._closer.alive

    def close(self) -> None:
        """Close the descriptor (the kernel frees the file) and drop the key."""
        with self._lock:
            self._cipher = None
            self._pending.clear()
            self._closer()


class _Reader(io.RawIOBase):
    """Reads a ``SealedFile``'s plaintext, one chunk opened at a time."""

    def __init__(self, file: SealedFile) -> None:
        super().__init__()
        self._file = file
        self._pos = 0
        self._index = -1
        self._chunk = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._file.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """``size`` bytes (fewer only at the end; all that is left if negative)."""
        if self.closed:
            raise ValueError("read of a closed file")
        total = self._file.size
        end = total if size is None or size < 0 else min(total, self._pos + size)
        parts = []
        while self._pos < end:
            index, start = divmod(self._pos, CHUNK)
            if index != self._index:
                self._chunk, self._index = self._file.read_chunk(index), index
            part = self._chunk[start : start + end - self._pos]
            parts.append(part)
            self._pos += len(part)
        return b"".join(parts)

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)
