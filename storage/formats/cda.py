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

from typing import Any

from lxml import etree

from storage.formats.base import mismatch, refuse, same_patient
from storage.model import PatientRef

HEADER_CAP = 1 << 20
V3 = "{urn:hl7-org:v3}"
_DOC = V3 + "ClinicalDocument"
_CODE = (_DOC, V3 + "code")
_TIME = (_DOC, V3 + "effectiveTime")
_PATIENT_ID = (_DOC, V3 + "recordTarget", V3 + "patientRole", V3 + "id")
_RECORD_TARGET = (_DOC, V3 + "recordTarget")


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
        self._ids: list[tuple[str, str]] = []
        self._header_done = False

    def feed(self, chunk: bytes) -> None:
        """Parse the next bytes; check the header once recordTarget has ended."""
        self._seen += len(chunk)
        try:
            self._parser.feed(chunk)
        except etree.XMLSyntaxError as e:
            raise refuse("is not well-formed XML") from e
        self._events()
        if not self._header_done and self._seen > HEADER_CAP:
            raise refuse(f"CDA: code, effectiveTime and recordTarget not found in the first "
                         f"{HEADER_CAP} bytes")

    def finish(self) -> None:
        """The document must be complete and well-formed, its header checked."""
        try:
            self._parser.close()
        except etree.XMLSyntaxError as e:
            raise refuse("is not well-formed XML (or is truncated)") from e
        self._events()
        if not self._header_done:
            raise refuse("CDA: recordTarget/patientRole/id is missing")

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
        elif path == _TIME:
            self._time = bool(element.get("value"))
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
        if not any(same_patient(self._patient, ext, [root]) for ext, root in self._ids):
            raise mismatch("recordTarget/patientRole/id (@extension + @root)")
        self._ids = []
