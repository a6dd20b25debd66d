"""HL7 v2 acknowledgements for the MLLP listener (``service.mllp``): what an ACK needs
from an inbound message, the patient its PID-3 names, and the ACK itself.

Original acknowledgement mode (HL7 2.5 section 2.9.2): MSA-1 ``AA`` accepted, ``AE``
error in the content (resending it unchanged fails again), ``AR`` rejected for reasons
outside the content (not authorised, too large, MSH unreadable, a fault here: resend
later). A refusal carries an ERR segment: ERR-3 an HL7 table 0357 code, ERR-4 ``E``,
ERR-8 the reason in words of our own, and ERR-1 the same for receivers older than 2.5.

Only MSH and the first PID segment are read here, each bounded as the record validator
bounds them (``storage/formats/hl7v2.py`` checks the whole message again when it is
stored). Nothing read from PID goes into an ACK, a log or an error: an ACK echoes the
message's routing fields (MSH-3 to MSH-6, MSH-10, MSH-11, MSH-12, MSH-18) byte for
byte, in the message's own encoding characters.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import hl7

from service.errors import ServiceError
from storage import PatientRef

ACCEPT, ERROR, REJECT = "AA", "AE", "AR"
# HL7 table 0357 (message error condition codes) as used here.
SEGMENT_SEQUENCE, REQUIRED_MISSING, DATA_TYPE, TABLE_VALUE = 100, 101, 102, 103
DUPLICATE_KEY, INTERNAL = 205, 207
_CODE_TEXT = {
    SEGMENT_SEQUENCE: "Segment sequence error", REQUIRED_MISSING: "Required field missing",
    DATA_TYPE: "Data type error", TABLE_VALUE: "Table value not found",
    DUPLICATE_KEY: "Duplicate key identifier", INTERNAL: "Application internal error",
}  # fmt: skip
# As the record validator: the hl7 package makes an object per delimiter.
MAX_DELIMITERS = 2000
MAX_SEGMENT = 64 << 10
_MAX_CONTROL_ID = 199
_MAX_ROUTING = 227  # an HD (application, facility) at its longest
_SEGMENT_END = re.compile(rb"\r\n|\n|\r")
_MESSAGE_CODE = re.compile(r"[A-Z0-9]{3}\Z")
_CHARSETS = {"": "utf-8", "ASCII": "ascii", "UNICODE UTF-8": "utf-8", "8859/1": "latin-1"}
_DEFAULT_SEPARATORS = "|^~\\&"


class AckError(ServiceError):
    """A message answered AE or AR; ``text`` never quotes the message's content."""

    def __init__(self, ack: str, code: int, text: str, location: str = "") -> None:
        super().__init__(text)
        self.ack = ack
        self.code = code
        self.text = text
        self.location = location  # ERL: segment^sequence^field, e.g. "PID^1^3"


@dataclass(frozen=True, slots=True)
class Envelope:
    """The MSH of an inbound message: raw field texts (latin-1, so byte-transparent)."""

    separators: str  # MSH-1 then MSH-2, e.g. "|^~\\&"
    fields: tuple[str, ...]  # fields[n] is MSH-n for n >= 2 ("" when absent)

    def field(self, n: int) -> str:
        """MSH-``n`` as sent, or "" when absent."""
        return self.fields[n] if n < len(self.fields) else ""

    def component(self, n: int, c: int) -> str:
        """Component ``c`` (1-based) of the first repetition of MSH-``n``."""
        parts = self.field(n).split(self.separators[2])[0].split(self.separators[1])
        return parts[c - 1] if c <= len(parts) else ""

    @property
    def control_id(self) -> str:
        """MSH-10."""
        return self.field(10)

    @property
    def message_type(self) -> str:
        """MSH-9.1^MSH-9.2, e.g. ``ORU^R01``."""
        return f"{self.component(9, 1)}^{self.component(9, 2)}"


def _first_segment(frame: bytes) -> bytes:
    end = _SEGMENT_END.search(frame, 0, MAX_SEGMENT + 1)
    if end is None and len(frame) > MAX_SEGMENT:
        raise AckError(REJECT, SEGMENT_SEQUENCE, f"MSH segment longer than {MAX_SEGMENT} bytes",
                         "MSH^1")
    return frame[: end.start()] if end else frame


def envelope(frame: bytes) -> Envelope:
    """The MSH of ``frame``; AR when there is none or its encoding characters are bad."""
    if not frame.startswith(b"MSH"):
        raise AckError(REJECT, SEGMENT_SEQUENCE, "message does not start with an MSH segment",
                         "MSH^1")
    msh = _first_segment(frame).decode("latin-1")
    field_sep = msh[3:4]
    encoding = msh[4:].split(field_sep, 1)[0] if field_sep else ""
    chars = field_sep + encoding
    if len(chars) not in (5, 6) or len(set(chars)) != len(chars) or not chars.isprintable() \
            or any(c.isalnum() or c.isspace() for c in chars):
        raise AckError(REJECT, DATA_TYPE, "MSH-1/MSH-2 encoding characters are not valid",
                         "MSH^1^2")
    if sum(msh.count(c) for c in set(chars)) > MAX_DELIMITERS:
        raise AckError(REJECT, DATA_TYPE, f"MSH has more than {MAX_DELIMITERS} delimiters",
                         "MSH^1")
    parts = msh.split(field_sep)
    return Envelope(chars, ("MSH", field_sep, *parts[1:]))


def check_envelope(env: Envelope) -> None:
    """AR unless MSH-9 names a message code and trigger event and MSH-10 is usable."""
    if not (_MESSAGE_CODE.match(env.component(9, 1)) and _MESSAGE_CODE.match(env.component(9, 2))):
        raise AckError(REJECT, REQUIRED_MISSING,
                         "MSH-9 message type needs a message code and trigger event", "MSH^1^9")
    control = env.control_id
    if not control or len(control) > _MAX_CONTROL_ID or not control.isprintable():
        raise AckError(REJECT, REQUIRED_MISSING,
                         "MSH-10 message control id is missing or too long", "MSH^1^10")


def codec(env: Envelope) -> str:
    """The codec MSH-18 names; AE when it is not one the store accepts."""
    charset = env.field(18).split(env.separators[2])[0].split(env.separators[1])[0].strip()
    name = _CHARSETS.get(charset)
    if name is None:
        raise AckError(ERROR, TABLE_VALUE,
                         "MSH-18 character set is not one of ASCII, UNICODE UTF-8, 8859/1",
                         "MSH^1^18")
    return name


def authority(namespace: str, universal: str, kind: str, prefer: str) -> str:
    """The assigning authority a PID-3 CX.4 (HD) gives the record header.

    ``oid`` (default): ``urn:oid:<HD.2>`` when HD.3 is ``ISO``, else HD.1, else HD.2;
    ``namespace``: HD.1, else the OID form, else HD.2 (docs/formats.md, MLLP).
    """
    oid = f"urn:oid:{universal}" if universal and kind.upper() == "ISO" else ""
    if prefer == "namespace":
        return namespace or oid or universal
    return oid or namespace or universal


def patient(frame: bytes, env: Envelope, prefer: str = "oid") -> PatientRef:
    """The patient of the first PID-3 repetition (CX.1 and CX.4); AE naming the field."""
    name = f"PID{env.separators[0]}".encode("latin-1")
    segments = _SEGMENT_END.split(frame[: (1 << 20) + 1])
    pid = next((s for s in segments if s.startswith(name)), None)
    if pid is None:
        raise AckError(ERROR, REQUIRED_MISSING,
                         "no PID segment in the first 1 MiB (PID-3 names the patient)", "PID")
    if len(pid) > MAX_SEGMENT or sum(pid.count(c.encode()) for c in env.separators) \
            > MAX_DELIMITERS:
        raise AckError(ERROR, DATA_TYPE, "PID segment is too long or has too many delimiters",
                         "PID^1")
    text = codec(env)
    try:
        decoded = [_first_segment(frame).decode(text), pid.decode(text)]
        message = hl7.parse("\r".join(decoded) + "\r")

        def part(c: int, s: int = 1) -> str:
            return str(message.extract_field("PID", 1, 3, 1, c, s)).strip()

        cx1, hd = part(1), (part(4, 1), part(4, 2), part(4, 3))
    except UnicodeDecodeError as e:
        raise AckError(ERROR, DATA_TYPE, f"MSH and PID are not valid {text} text",
                         "PID^1") from e
    except (IndexError, KeyError, ValueError):  # absent components
        cx1, hd = "", ("", "", "")
    except Exception as e:  # the parser's other errors quote content: dropped
        raise AckError(ERROR, DATA_TYPE, "MSH/PID segments do not parse", "PID^1") from e
    ref = PatientRef(cx1, authority(*hd, prefer))
    if not ref.id or not ref.authority:
        raise AckError(ERROR, REQUIRED_MISSING,
                         "PID-3 needs CX.1 (identifier) and CX.4 (assigning authority)",
                         "PID^1^3")
    return ref


def request_key(env: Envelope) -> str:
    """The PutRecord request id of a message: its sender (MSH-3, MSH-4) and MSH-10.

    The store keeps request ids per principal, so a duplicate is one from the same
    certificate, sending application and facility, with the same control id.
    """
    digest = hashlib.sha256()
    for value in (env.field(3), env.field(4), env.control_id):
        raw = value.encode("latin-1")
        digest.update(len(raw).to_bytes(4, "big") + raw)
    return "mllp-" + digest.hexdigest()[:40]


def pieces(frame: bytes, size: int) -> Iterator[bytes]:
    """The message in chunks of at most ``size`` bytes (as PutRecord streams them)."""
    view = memoryview(frame)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])


def _routing(value: str, cap: int = _MAX_ROUTING) -> str:
    """An echoed field: as sent if short and printable, else left empty."""
    return value if len(value) <= cap and value.isprintable() else ""


def _escaped(text: str, separators: str) -> str:
    """``text`` with HL7 escape sequences for the message's own delimiters."""
    field, component, repetition, escape, sub = (separators[i] for i in range(5))
    out = text.replace(escape, f"{escape}E{escape}")
    for char, code in ((field, "F"), (component, "S"), (repetition, "R"), (sub, "T")):
        out = out.replace(char, f"{escape}{code}{escape}")
    return out


def ack(env: Envelope | None, refusal: AckError | None = None,
        now: datetime | None = None) -> bytes:
    """The ACK of a message: AA, or the refusal's AE/AR with its ERR segment.

    The ACK's MSH swaps the sender and receiver (MSH-3/4 <-> MSH-5/6) and keeps the
    message's encoding characters, processing id, version and character set.
    """
    seps = env.separators if env else _DEFAULT_SEPARATORS
    f, comp, sub = seps[0], seps[1], seps[4]
    get = env.field if env else (lambda _n: "")
    event = env.component(9, 2) if env else ""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S+0000")
    charset = get(18) if env and get(18).strip() in _CHARSETS else ""
    msh = ["MSH", seps[1:], _routing(get(5)), _routing(get(6)), _routing(get(3)),
           _routing(get(4)), stamp, "",
           f"ACK{comp}{event}{comp}ACK" if _MESSAGE_CODE.match(event) else "ACK",
           uuid.uuid4().hex[:20], _routing(get(11), 3) or "P", _routing(get(12), 60) or "2.5.1"]
    if charset:
        msh += [""] * 5 + [charset]
    code = refusal.ack if refusal else ACCEPT
    control = _routing(get(10), _MAX_CONTROL_ID)
    msa = ["MSA", code, control]
    segments = [f.join(msh), f.join(msa)]
    if refusal is not None:
        text = _escaped(refusal.text, seps)
        label = _CODE_TEXT.get(refusal.code, "")
        eld = [*[*refusal.location.split("^"), "", "", ""][:3],
               f"{refusal.code}{sub}{label}{sub}HL70357"]
        msa.append(text)  # MSA-3, read by pre-2.5 receivers
        segments[1] = f.join(msa)
        segments.append(f.join([
            "ERR", comp.join(eld), comp.join(refusal.location.split("^")) if refusal.location
            else "", f"{refusal.code}{comp}{label}{comp}HL70357", "E", "", "", "", text,
        ]))
    return ("\r".join(segments) + "\r").encode("latin-1", "replace")
