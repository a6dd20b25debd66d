"""HL7 v2 (ER7, pipe-delimited): MSH encoding characters, message type, control id, and
the PID-3 patient identifiers, parsed by the ``hl7`` package.

Only the prefix up to the end of the first PID segment is kept (an ORU can carry a
large OBX-5 attachment after it); it must fit in ``HEADER_CAP`` bytes. Segments end in
CR (HL7 2.x section 2.5.5); LF and CRLF, which files often have, are read as CR.
"""

from __future__ import annotations

import re

import hl7

from storage.errors import InvalidRecordError
from storage.formats.base import mismatch, names_other, refuse, same_patient
from storage.index import (
    CONTROL_ID,
    DATE,
    MAX_ENTRIES,
    MESSAGE_TYPE,
    OBSERVATION,
    IndexEntry,
    bounded,
    day,
    entry,
    instant,
    number,
)
from storage.model import PatientRef

HEADER_CAP = 1 << 20
# Of each segment after PID, only this prefix is kept to index OBR/OBX (an OBX-5 can be
# a large attachment); fields cut by it are not indexed.
SEGMENT_CAP = 64 << 10
# MSH-18 values (HL7 table 0211) we decode; absent means ASCII, which UTF-8 covers.
_CHARSETS = {"": "utf-8", "ASCII": "ascii", "UNICODE UTF-8": "utf-8", "8859/1": "latin-1"}
_SEGMENT_END = re.compile(rb"\r\n|\n|\r")
_PID_START = re.compile(rb"[\r\n]PID")
# After the first PID: the segment starts looked for, by (OBR wanted, OBX wanted).
_WANTED = {
    (True, True): re.compile(rb"[\r\n](PID|OBR|OBX)"),
    (True, False): re.compile(rb"[\r\n](PID|OBR)"),
    (False, True): re.compile(rb"[\r\n](PID|OBX)"),
    (False, False): re.compile(rb"[\r\n](PID)"),
}
_LINE_END = re.compile(rb"[\r\n]")
_MESSAGE_CODE = re.compile(r"[A-Z0-9]{3}\Z")
_MAX_CONTROL_ID = 199
# The hl7 package makes an object per field, repetition and component: a 1 MiB segment
# of separators cost ~430 MiB and seconds to parse. MSH and PID have far fewer.
MAX_DELIMITERS = 2000


class Hl7v2Validator:
    """An HL7 v2 message whose PID-3 names the header's patient."""

    def __init__(self, patient: PatientRef) -> None:
        self._patient = patient
        self._prefix = bytearray()
        self._done = False
        self._pid: int | None = None  # where the first PID segment starts
        self._carry = b""  # the last bytes seen after the check, to find a second PID
        # The OBR/OBX segment being received after PID (its prefix), if any.
        self._line: bytearray | None = None
        self._cut = False  # that segment is longer than SEGMENT_CAP
        self._obr_seen = False
        # field, component, repetition (from MSH); None: not ASCII, OBR/OBX not indexed
        self._separators: tuple[str, str, str] | None = None
        self._codec = "utf-8"
        self._index: list[IndexEntry | None] = []
        self._obx_read = 0  # OBX segments read after PID (indexed or not)
        self._msh_date: str | None = None
        self._obr_date: str | None = None

    def feed(self, chunk: bytes) -> None:
        """Keep the prefix until a whole PID segment is in it, then check it.

        Each byte is scanned once (a stream of tiny chunks costs no more than one).
        After the check the rest is scanned for a second PID segment: one record names
        one patient (an ORU may carry several patients' results)."""
        if self._done:
            self._after_pid(chunk)
            return
        if not self._prefix and chunk and not chunk.startswith(b"MSH"[: len(chunk)]):
            raise refuse("is not HL7 v2: does not start with an MSH segment")
        seen = len(self._prefix)
        self._prefix += chunk
        if self._pid is None:
            start = _PID_START.search(self._prefix, max(0, seen - 3))
            self._pid = None if start is None else start.start() + 1
        if self._pid is not None:
            end = _LINE_END.search(self._prefix, max(self._pid, seen))
            if end is not None and end.start() <= HEADER_CAP:
                rest = bytes(self._prefix[end.start() :])
                self._check(_SEGMENT_END.split(bytes(self._prefix[: end.start()])))
                self._after_pid(rest)
                return
        if len(self._prefix) > HEADER_CAP:
            raise refuse(f"HL7 v2: no complete PID segment in the first {HEADER_CAP} bytes")

    def _after_pid(self, chunk: bytes) -> None:
        """Scan what follows the first PID: a second PID is refused; OBR/OBX segments
        (their first ``SEGMENT_CAP`` bytes) are indexed. One regex finds the segment
        starts that matter; the bytes between stream past unread, and once no more OBR
        or OBX is wanted only PID is looked for, as before indexing."""
        data = self._carry + chunk
        pos = 0
        while True:
            if self._line is not None:  # inside an OBR/OBX segment
                end = _LINE_END.search(data, pos)
                stop = len(data) if end is None else end.start()
                room = SEGMENT_CAP - len(self._line)
                if room > 0:  # only the kept prefix is copied (an attachment streams past)
                    self._line += data[pos : min(stop, pos + room)]
                self._cut = self._cut or stop - pos > room
                if end is None:
                    self._carry = b""  # no segment starts before this one's end
                    return
                self._segment(bytes(self._line), cut=self._cut)
                self._line, self._cut = None, False
                pos = stop  # the line end may start the next segment
            start = self._starts().search(data, pos)
            if start is None:
                self._carry = data[-3:]  # shorter than a match: none is found twice
                return
            if start.group(1) == b"PID":
                raise refuse("HL7 v2: more than one PID segment (a record names one patient)")
            # Counted when found, valid or not: a stream of bogus "OBX" lines is read at
            # most MAX_ENTRIES times, then passes at the speed of the PID search.
            if start.group(1) == b"OBR":
                self._obr_seen = True
            else:
                self._obx_read += 1
            self._line = bytearray()
            pos = start.start() + 1

    def _starts(self) -> re.Pattern[bytes]:
        """The segment starts still wanted: PID always, OBR until one was read, OBX
        until ``MAX_ENTRIES`` were (none if the separators are not ASCII)."""
        obr = self._separators is not None and not self._obr_seen
        obx = self._separators is not None and self._obx_read < MAX_ENTRIES
        return _WANTED[obr, obx]

    def finish(self) -> None:
        """Check what came if the message ended before a PID was complete."""
        if not self._done:
            self._check(_SEGMENT_END.split(bytes(self._prefix)))
        elif self._line is not None:
            self._segment(bytes(self._line), cut=self._cut)
            self._line = None

    def index(self) -> list[IndexEntry]:
        """MSH-9 message type, MSH-10 control id, each OBX-3 observation code (with its
        OBX-5 value, OBX-6 unit and OBX-14 time) and the date (OBR-7, else MSH-7)."""
        return bounded([*self._index, entry(DATE, self._obr_date or self._msh_date)])

    def _segment(self, raw: bytes, *, cut: bool) -> None:
        """Index an OBR or OBX segment after PID (others pass unread)."""
        if self._separators is None:
            return
        field_sep, component, repetition = self._separators
        name = raw[:4]
        if name not in (b"OBX" + field_sep.encode(), b"OBR" + field_sep.encode()):
            return
        try:
            fields = raw.decode(self._codec).split(field_sep)
        except UnicodeDecodeError:
            return  # not indexed; the validator does not read segments past PID
        if cut:
            fields = fields[:-1]  # the last field was cut short

        def part(n: int, c: int = 0) -> str:
            if n >= len(fields):
                return ""
            pieces = fields[n].split(repetition)[0].split(component)
            return pieces[c] if c < len(pieces) else ""

        if name.startswith(b"OBR"):
            self._obr_date = self._obr_date or day(part(7))
            return
        if not part(3):
            return
        # Value and time only as a number and a timestamp: an ST result or a note is
        # free text, never stored in clear (storage.index.number, instant).
        details = {"quantity": number(part(5)), "unit": part(6),
                   "observed_at": instant(part(14))}
        self._index.append(entry(OBSERVATION, part(3), part(3, 2), **details))
        if part(3, 2) == "MDC" and part(3, 1).startswith("MDC_"):  # ISO/IEEE 11073-10101
            self._index.append(entry(OBSERVATION, part(3, 1), "MDC", **details))

    def _check(self, segments: list[bytes]) -> None:
        self._done = True
        self._prefix = bytearray()  # checked once; the rest streams past
        segments = [s for s in segments if s]
        if not segments or not segments[0].startswith(b"MSH"):
            raise refuse("is not HL7 v2: does not start with an MSH segment")
        pid = b"PID" + segments[0][3:4]
        end = next((i for i, s in enumerate(segments) if s.startswith(pid)), None)
        if end is None:
            raise refuse("HL7 v2: no PID segment (PID-3 names the patient)")
        if any(_PID_START.match(b"\r" + s) for s in segments[end + 1 :]):
            raise refuse("HL7 v2: more than one PID segment (a record names one patient)")
        for name, segment in (("MSH", segments[0]), ("PID", segments[end])):
            if sum(segment.count(c) for c in set(segments[0][3:9])) > MAX_DELIMITERS:
                raise refuse(f"HL7 v2: {name} has more than {MAX_DELIMITERS} delimiters")
        # Only MSH and PID are parsed: the segments between are skipped, not objects.
        text = _decode([segments[0], segments[end]])
        _check_encoding(text[0])
        try:
            message = hl7.parse("\r".join(text) + "\r")
            _check_msh(message)
            self._check_pid(message)
        except InvalidRecordError:
            raise
        except Exception as e:  # hl7 raises several types; its messages quote content
            raise refuse("is not HL7 v2: the MSH/PID segments do not parse") from e
        self._index_msh(message, text[0])
        for segment in segments[end + 1 :]:  # the rest, when the message was short
            self._segment(segment, cut=False)

    def _index_msh(self, message: hl7.Message, msh: str) -> None:
        separators = (msh[3], msh[4], msh[5])
        self._separators = separators if "".join(separators).isascii() else None
        self._codec = _codec_of(msh)
        code, event = _component(message, "MSH", 9, 1, 1), _component(message, "MSH", 9, 1, 2)
        self._index.append(entry(MESSAGE_TYPE, f"{code}^{event}"))
        self._index.append(entry(CONTROL_ID, str(message.segment("MSH")[10])))
        self._msh_date = day(_component(message, "MSH", 7, 1, 1))

    def _check_pid(self, message: hl7.Message) -> None:
        pid = message.segment("PID")
        if len(pid) <= 3 or not str(pid[3]):
            raise refuse("HL7 v2: PID-3 (patient identifier list) is empty")
        matched = False
        for r in range(1, len(pid[3]) + 1):
            cx1 = _component(message, "PID", 3, r, 1)
            cx4 = [_component(message, "PID", 3, r, 4, s) for s in (1, 2)]  # HD.1, HD.2
            if not cx1 or not any(cx4):
                raise refuse("HL7 v2: a PID-3 identifier has no CX.1 or no CX.4 "
                             "(assigning authority)")
            if names_other(self._patient, cx1, cx4):
                raise mismatch("PID-3 (CX.1 + CX.4)")
            matched = matched or same_patient(self._patient, cx1, cx4)
        if not matched:
            raise mismatch("PID-3 (CX.1 + CX.4)")


def _codec_of(msh: str) -> str:
    """The codec MSH-18 names (read from MSH decoded as latin-1 or as itself)."""
    sep = msh[3:4]
    fields = msh.split(sep) if sep else []
    charset = fields[17].split(msh[4:5])[0].strip() if len(fields) > 17 and msh[4:5] else ""
    codec = _CHARSETS.get(charset)
    if codec is None:
        raise refuse("HL7 v2: MSH-18 character set is not one of ASCII, UNICODE UTF-8, 8859/1")
    return codec


def _decode(segments: list[bytes]) -> list[str]:
    codec = _codec_of(segments[0].decode("latin-1"))  # ASCII-compatible, to read MSH-18
    try:
        return [s.decode(codec) for s in segments]
    except UnicodeDecodeError as e:
        raise refuse(f"HL7 v2: MSH and PID segments are not valid {codec} text") from e


def _check_encoding(msh: str) -> None:
    """MSH-1 and MSH-2: five (2.7: six) distinct punctuation characters."""
    field_sep = msh[3:4]
    chars = field_sep + msh[4:].split(field_sep, 1)[0] if field_sep else ""
    if len(chars) not in (5, 6) or len(set(chars)) != len(chars) or not chars.isprintable() \
            or any(c.isalnum() or c.isspace() for c in chars):
        raise refuse("HL7 v2: MSH-1/MSH-2 encoding characters are not valid")


def _check_msh(message: hl7.Message) -> None:
    msh = message.segment("MSH")
    code, event = _component(message, "MSH", 9, 1, 1), _component(message, "MSH", 9, 1, 2)
    if not _MESSAGE_CODE.match(code) or not _MESSAGE_CODE.match(event):
        raise refuse("HL7 v2: MSH-9 message type needs a message code and trigger event")
    control = str(msh[10]) if len(msh) > 10 else ""
    if not control or len(control) > _MAX_CONTROL_ID:
        raise refuse("HL7 v2: MSH-10 message control id is missing or too long")


def _component(message: hl7.Message, seg: str, field: int, rep: int, comp: int,  # noqa: PLR0917  (HL7's own address: segment, field, repetition, component, subcomponent)
               sub: int = 1) -> str:
    """One (sub)component as text; '' when absent."""
    try:
        return str(message.extract_field(seg, 1, field, rep, comp, sub)).strip()
    except (IndexError, KeyError, ValueError):
        return ""
