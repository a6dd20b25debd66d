"""PDF: the header at the start, the trailer and cross-reference at the end.

PDF readers find a file's objects from its end: ``startxref``, the byte offset of the
last cross-reference section (an ``xref`` table or a cross-reference stream object), then
``%%EOF``. The validator keeps the first bytes and a bounded tail; no PDF library reads
a stream, so these are checked with patterns from ISO 32000 (7.5.2, 7.5.5). A PDF does not
name a patient: only the header's patient is recorded for it.
"""

from __future__ import annotations

import re

from storage.formats.base import refuse
from storage.index import IndexEntry

HEAD_BYTES = 16
# The end of file: startxref, its offset and %%EOF (plus any trailing whitespace a writer
# or a transfer left) lie in the last few hundred bytes; the cross-reference section the
# offset points at is verified when it lies in this tail too, as it does for most files.
TAIL_BYTES = 64 << 10
_HEADER = re.compile(rb"%PDF-(1\.[0-7]|2\.0)[\r\n \t%]")
_STARTXREF = re.compile(rb"startxref[\r\n \t]+(\d{1,15})[\r\n \t]+%%EOF[\r\n \t\x00]*\Z")
_XREF_AT = re.compile(rb"(xref[\r\n \t]|\d{1,10}[\r\n \t]+\d{1,5}[\r\n \t]+obj[\r\n \t<])")


class PdfValidator:
    """A PDF: ``%PDF-1.x`` header, and ``startxref``/``%%EOF`` at the end pointing at an
    ``xref`` table (followed by ``trailer``) or a cross-reference stream."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._tail = bytearray()
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        """Check the header once its bytes are in; keep the tail."""
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
            if len(self._head) == HEAD_BYTES:
                self._check_header()
        self._size += len(chunk)
        self._tail += chunk[-TAIL_BYTES:]
        if len(self._tail) > TAIL_BYTES:
            del self._tail[: len(self._tail) - TAIL_BYTES]

    def _check_header(self) -> None:
        if not _HEADER.match(self._head):
            raise refuse("is not a PDF: no %PDF-1.x header at the start")

    def finish(self) -> None:
        """Check the end of file and the cross-reference section it points at."""
        if len(self._head) < HEAD_BYTES:
            raise refuse("is not a PDF: too short")
        end = _STARTXREF.search(self._tail)
        if end is None:
            raise refuse("is not a complete PDF: no startxref and %%EOF at the end")
        offset = int(end.group(1))
        if not 0 < offset < self._size:
            raise refuse("is not a complete PDF: startxref points outside the file")
        tail_start = self._size - len(self._tail)
        if offset >= tail_start:
            section = bytes(self._tail[offset - tail_start : end.start()])
            if not _XREF_AT.match(section):
                raise refuse("is not a complete PDF: startxref does not point at a "
                             "cross-reference section")
            if section.startswith(b"xref") and b"trailer" not in section:
                raise refuse("is not a complete PDF: xref table without trailer")

    def index(self) -> list[IndexEntry]:
        """A PDF is not indexed (its header's patient is the record's)."""
        return []
