"""A stream's size and SHA-256, counted as it passes, with a size limit.

Used by the write path (plaintext and ciphertext of a put) and by the re-seal of a
legacy row (``RecordStore.upgrade_sealed``), which proves the sizes and digests anew.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from storage.errors import InvalidRecordError


@dataclass
class Meter:
    """Counts and hashes a stream as it passes, enforcing the size limit."""

    limit: int
    size: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)

    def watch(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """``chunks`` unchanged, counted and hashed; ``InvalidRecordError`` past the limit."""
        for chunk in chunks:
            self.size += len(chunk)
            if self.size > self.limit:
                raise InvalidRecordError("content", f"exceeds the limit of {self.limit} bytes")
            self.digest.update(chunk)
            yield chunk
