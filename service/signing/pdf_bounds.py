"""The size bound of a PDF held whole in memory, to sign it with PAdES or to find the
signatures it embeds (pyHanko needs the whole file, seekable).

Kept apart from :mod:`service.signing.pades` so that refusing a PDF too large needs
no pyHanko (which loads on first use: :mod:`service.signing.asn1_registry`).
"""

from __future__ import annotations

from collections.abc import Iterable

from storage import InvalidRecordError

# The largest PDF signed with PAdES: pyHanko holds the file (and its signed copy) in
# memory, so each concurrent PAdES signing costs about three times this at most.
MAX_PADES_BYTES = 64 << 20


def check_size(size: int) -> None:
    """Refuse a PDF too large to sign in memory (``InvalidRecordError`` naming the cap)."""
    if size > MAX_PADES_BYTES:
        raise InvalidRecordError(
            "format", f"PADES signs PDFs of at most {MAX_PADES_BYTES} bytes; "
            f"this version has {size} (sign it as CADES_DETACHED)",
        )  # fmt: skip


def read_bounded(chunks: Iterable[bytes]) -> bytes:
    """The whole stream, refused once it exceeds :data:`MAX_PADES_BYTES`."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        check_size(len(buffer))
    return bytes(buffer)
