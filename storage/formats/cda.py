"""HL7 CDA R2: a well-formed ``ClinicalDocument`` in ``urn:hl7-org:v3`` with a document
code, an effectiveTime and recordTarget/patientRole/id naming the header's patient.

lxml's pull parser reads the stream with DTDs, entity expansion and network access
off; a document with a DOCTYPE is refused outright (CDA has none, and a DTD is where
XML bombs and external entities live). Elements are dropped as soon as they end, so
memory holds the open path only; libxml2's own limits (``huge_tree`` off) bound a
single text node and the nesting depth. The header fields come before the body in the
CDA schema and must be found within ``HEADER_CAP`` bytes.
"""

from __future__ import annotations

import re
from typing import Any

from lxml import etree

from storage.formats.base import mismatch, names_other, refuse, same_patient
from storage.index import DATE, DOCUMENT_CODE, IndexEntry, bounded, day, entry
from storage.model import PatientRef

HEADER_CAP = 1 << 20
V3 = "{urn:hl7-org:v3}"
_DOC = V3 + "ClinicalDocument"
_CODE = (_DOC, V3 + "code")
_TIME = (_DOC, V3 + "effectiveTime")
_PATIENT_ID = (_DOC, V3 + "recordTarget", V3 + "patientRole", V3 + "id")
_RECORD_TARGET = (_DOC, V3 + "recordTarget")
# libxml2 holds a whole start tag: 11 MiB of attributes (or xmlns declarations) on one
# element took ~400 MiB. '<' cannot occur in an attribute value, so a tag's attributes
# lie between its '<' and the next: their '="' (or "='"), counted there, bound them (a
# text node of '=' signs is not counted; one split by a chunk boundary may be missed).
MAX_ATTRIBUTES = 1000
_ATTRIBUTE = re.compile(rb"=[ \t\r\n]*[\"']")
# Encodings in which '<' and '=' are those bytes and every XML reader decodes alike: a
# document in UTF-7, EBCDIC or UTF-32 reads as other markup to a reader that does not
# decode it as libxml2 does (iconv), e.g. a recordTarget hidden in a comment; in UTF-16
# the bytes '<' and '=' also occur inside other characters (the attribute count above).
_ENCODINGS = frozenset({"utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin1"})
_HEAD = 256
_DECLARED = re.compile(r"\A\s*<\?xml[^>]*?encoding\s*=\s*[\"']([^\"']*)[\"']")


def _check_encoding(head: bytes) -> None:
    """The document is UTF-8 (or its subsets US-ASCII, or ISO-8859-1), by declaration."""
    text = head.removeprefix(b"\xef\xbb\xbf").decode("latin-1")
    declared = _DECLARED.match(text)
    encoding = declared.group(1).strip().lower() if declared else "utf-8"
    if not text.lstrip().startswith("<"):
        raise refuse("is not well-formed XML in UTF-8 (or US-ASCII, ISO-8859-1)")
    if encoding not in _ENCODINGS:
        raise refuse("CDA: the encoding must be UTF-8 (or US-ASCII, ISO-8859-1)")


class CdaValidator:
    """A CDA document for the header's patient."""

    def __init__(self, patient: PatientRef) -> None:
        self._patient = patient
        self._parser: Any = etree.XMLPullParser(
            events=("start", "end"),
            resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
            dtd_validation=False, remove_comments=True, remove_pis=True,
        )  # fmt: skip
        self._path: list[str] = []
        self._seen = 0
        self._code = self._time = False
        self._index: list[IndexEntry | None] = []
        self._ids: list[tuple[str, str]] = []
        self._header_done = False
        self._head = b""
        self._equals = 0  # attribute values begun since the last '<'

    def feed(self, chunk: bytes) -> None:
        """Parse the next bytes; check the header once recordTarget has ended."""
        if len(self._head) < _HEAD:
            self._head += chunk[: _HEAD - len(self._head)]
            if len(self._head) == _HEAD:
                _check_encoding(self._head)
        self._count_attributes(chunk)
        self._seen += len(chunk)
        try:
            self._parser.feed(chunk)
        except etree.XMLSyntaxError as e:
            raise refuse("is not well-formed XML") from e
        self._events()
        if not self._header_done and self._seen > HEADER_CAP:
            raise refuse(f"CDA: code, effectiveTime and recordTarget not found in the first "
                         f"{HEADER_CAP} bytes")

    def _count_attributes(self, chunk: bytes) -> None:
        pieces = chunk.split(b"<")
        counts = [len(_ATTRIBUTE.findall(p)) for p in pieces]
        counts[0] += self._equals
        if max(counts) > MAX_ATTRIBUTES:
            raise refuse(f"CDA: an element has more than {MAX_ATTRIBUTES} attributes")
        self._equals = counts[-1]

    def finish(self) -> None:
        """The document must be complete and well-formed, its header checked."""
        if len(self._head) < _HEAD:
            _check_encoding(self._head)
        try:
            self._parser.close()
        except etree.XMLSyntaxError as e:
            raise refuse("is not well-formed XML (or is truncated)") from e
        self._events()
        if not self._header_done:
            raise refuse("CDA: recordTarget/patientRole/id is missing")

    def index(self) -> list[IndexEntry]:
        """The document code (LOINC, with its code system) and the effectiveTime's day."""
        return bounded(self._index)

    def _events(self) -> None:
        for event, element in self._parser.read_events():
            if event == "start":
                self._start(element)
            else:
                self._end(element)

    def _start(self, element: Any) -> None:
        if not self._path:
            if element.getroottree().docinfo.internalDTD is not None:
                raise refuse("CDA: a DOCTYPE is not accepted (no DTDs or entities)")
            if element.tag != _DOC:
                raise refuse("is not CDA: the root is not ClinicalDocument in urn:hl7-org:v3")
        self._path.append(str(element.tag))
        path = tuple(self._path)
        if path == _CODE:
            self._code = bool(element.get("code")) and bool(element.get("codeSystem"))
            self._index.append(entry(DOCUMENT_CODE, element.get("code"),
                                     element.get("codeSystem")))
        elif path == _TIME:
            self._time = bool(element.get("value"))
            self._index.append(entry(DATE, day(element.get("value"))))
        elif path == _PATIENT_ID:
            self._ids.append((element.get("extension") or "", element.get("root") or ""))

    def _end(self, element: Any) -> None:
        if tuple(self._path) == _RECORD_TARGET:
            self._check_target()
        self._path.pop()
        element.clear()  # only the open path stays in memory
        while element.getprevious() is not None:
            del element.getparent()[0]

    def _check_target(self) -> None:
        """Each recordTarget (CDA allows several) must be the header's patient."""
        if not self._header_done:
            self._header_done = True
            if not self._code:
                raise refuse("CDA: ClinicalDocument/code (@code, @codeSystem) is missing")
            if not self._time:
                raise refuse("CDA: ClinicalDocument/effectiveTime/@value is missing")
        if not self._ids:
            raise refuse("CDA: recordTarget/patientRole/id is missing")
        if any(names_other(self._patient, ext, [root]) for ext, root in self._ids) or \
                not any(same_patient(self._patient, ext, [root]) for ext, root in self._ids):
            raise mismatch("recordTarget/patientRole/id (@extension + @root)")
        self._ids = []
