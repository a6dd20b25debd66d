"""DICOM after the stop point: a streaming walk of the top-level data elements.

pydicom reads the header up to the first element past group 0020; the rest (pixel data,
overlays, padding) streams past. Without a look at it, a file could repeat PatientID
after the pixel data: pydicom's ``dcmread`` keeps the last of two equal tags, so a
reader built on it would file the record under another patient than the one checked.
The walk reads element headers only (a value of defined length is skipped, not kept),
follows undefined-length sequences and encapsulated pixel data through their items and
delimiters, and refuses a top-level tag that does not ascend, a misplaced delimiter, or
a file that ends inside an element. Memory: one element header; CPU: per element.
"""

from __future__ import annotations

from struct import unpack_from

from storage.formats.base import refuse

UNDEFINED = 0xFFFFFFFF
MAX_ELEMENTS = 500_000  # headers walked after the stop point (items): ~1 us each
MAX_DEPTH = 32
_ITEM, _ITEM_END, _SEQ_END = 0xE000, 0xE00D, 0xE0DD
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                   b"UR", b"UT", b"UV"})
_SEQ, _IN_ITEM = "sequence", "item"


class TailWalker:
    """Walks the top-level elements from the stop point to the end of the file."""

    def __init__(self, *, implicit: bool, little: bool, last_tag: int) -> None:
        self._implicit = implicit
        self._order = "<" if little else ">"
        self._last = last_tag
        self._buf = bytearray()  # an element header cut by a chunk boundary
        self._skip = 0  # bytes of a value still to pass
        self._stack: list[str] = []  # open sequences and items
        self._count = 0

    def feed(self, data: bytes) -> None:
        """Walk the next bytes."""
        if self._skip >= len(data):
            self._skip -= len(data)  # inside a large value (pixel data): nothing to copy
            return
        self._buf += memoryview(data)[self._skip :]
        self._skip, pos = 0, 0
        while True:
            used = self._header(pos)
            if not used:
                break
            pos += used
            passed = min(self._skip, len(self._buf) - pos)
            pos, self._skip = pos + passed, self._skip - passed
            if self._skip:
                break
        del self._buf[:pos]

    def finish(self) -> None:
        """The file must end between top-level elements."""
        if self._buf or self._skip or self._stack:
            raise refuse("DICOM: the file is truncated (it ends inside an element)")

    def _header(self, pos: int) -> int:
        """Read one header at ``pos``: its size, or 0 if more bytes are needed."""
        buf, order = self._buf, self._order
        if len(buf) - pos < 8:
            return 0
        group, element = unpack_from(order + "HH", buf, pos)
        self._count += 1
        if self._count > MAX_ELEMENTS:
            raise refuse(f"DICOM: more than {MAX_ELEMENTS} elements after the header")
        if group == 0xFFFE:
            self._delimiter(element, unpack_from(order + "I", buf, pos + 4)[0])
            return 8
        if self._stack and self._stack[-1] == _SEQ:
            raise refuse("DICOM: a data element outside an item in a sequence")
        header = self._length(pos)
        if header is None:
            return 0
        size, vr, length = header
        if not self._stack:
            tag = group << 16 | element
            if tag <= self._last:
                raise refuse("DICOM: data elements are repeated or out of order")
            self._last = tag
        if length == UNDEFINED:
            if vr and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                raise refuse("DICOM: an undefined length on an element that cannot have one")
            self._push(_SEQ)
        else:
            self._skip = length
        return size

    def _length(self, pos: int) -> tuple[int, bytes, int] | None:
        """(header size, explicit VR or b'', value length); None if more is needed."""
        buf, order = self._buf, self._order
        if self._implicit:
            return 8, b"", unpack_from(order + "I", buf, pos + 4)[0]
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr not in _LONG:
            return 8, vr, unpack_from(order + "H", buf, pos + 6)[0]
        if len(buf) - pos < 12:
            return None
        return 12, vr, unpack_from(order + "I", buf, pos + 8)[0]

    def _delimiter(self, element: int, length: int) -> None:
        top = self._stack[-1] if self._stack else None
        if element == _ITEM and top == _SEQ:
            if length == UNDEFINED:
                self._push(_IN_ITEM)
            else:
                self._skip = length
        elif (element, top) in ((_ITEM_END, _IN_ITEM), (_SEQ_END, _SEQ)):
            self._stack.pop()
        else:
            raise refuse("DICOM: an item or sequence delimiter is out of place")

    def _push(self, context: str) -> None:
        if len(self._stack) >= MAX_DEPTH:
            raise refuse(f"DICOM: sequences nested more than {MAX_DEPTH} deep")
        self._stack.append(context)
