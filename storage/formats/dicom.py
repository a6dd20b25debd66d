"""DICOM Part 10: preamble and ``DICM``, file meta, and the identifying attributes, read
by pydicom from a bounded prefix; parsing stops before the pixel data.

The prefix is parsed again each time it has doubled (so the work stays linear in the
prefix), until pydicom reaches an element past the last attribute we need (pixel data at
the latest), or the stream ends. Large values before that point (a private blob) are
skipped by pydicom (``defer_size``), not decoded; if the attributes are not found within
``HEADER_CAP`` bytes the record is refused.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from storage.errors import InvalidRecordError
from storage.formats.base import mismatch, refuse, same_patient
from storage.formats.dicom_tail import TailWalker
from storage.index import (
    DATE,
    MODALITY,
    SERIES_UID,
    SOP_CLASS,
    SOP_UID,
    STUDY_UID,
    IndexEntry,
    bounded,
    day,
    entry,
)
from storage.model import PatientRef

# pydicom reports a value that breaks its VR's rules by logging *and* warning with the
# value quoted (a malformed PatientID, say): patient data in the service's log. We check
# what we need ourselves, so its read-time validation is off (its logger is cut off from
# the service's log in storage/formats/__init__.py).
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

HEADER_CAP = 4 << 20
FIRST_TRY = 4 << 10
DEFER_SIZE = 16 << 10  # values longer than this are skipped, never decoded
# Every attribute we read is in groups 0008-0020; the first element of a later group
# (the image pixel module, 0028, or pixel data, 7FE0) ends the part we need.
_STOP_GROUP = 0x0021
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
             "Modality", "PatientID")
_TYPE2 = ("StudyDate",)  # must be present, may be empty (PS3.3 type 2)
# pydicom reads an element in about two reads and ~10 us: 4 MiB of 8-byte elements was
# 500k elements, seconds of CPU and ~130 MiB per parse. A header has hundreds.
MAX_READS = 20_000


class _Prefix(io.BytesIO):
    """The bytes received so far, noting whether a reader wanted more than is there.

    pydicom ends a dataset when the 8-byte read of the next element's tag finds nothing:
    that is a clean end. Any other short read, or a skip past the end, is an element cut
    short (more bytes are needed, or the file is truncated).
    """

    overrun = False
    reads = 0

    def read(self, size: int | None = -1, /) -> bytes:
        self.reads += 1
        if self.reads > MAX_READS:
            raise refuse(f"DICOM: more than {MAX_READS // 2} elements before the pixel data")
        data = super().read(size)
        if size is not None and size > len(data) and (data or size != 8):
            self.overrun = True
        return data

    def seek(self, offset: int, whence: int = 0, /) -> int:
        position = super().seek(offset, whence)
        if position > len(self.getbuffer()):
            self.overrun = True
        return position


@dataclass(frozen=True, slots=True)
class _Parsed:
    dataset: Dataset
    tail: TailWalker | None  # None: the file was read to its end
    stop_at: int  # where the element that stopped pydicom starts


class DicomValidator:
    """A DICOM Part 10 file whose PatientID and issuer are the header's patient."""

    def __init__(self, patient: PatientRef) -> None:
        self._patient = patient
        self._prefix = bytearray()
        self._next_try = FIRST_TRY
        self._done = False
        self._tail: TailWalker | None = None  # set when the header stopped before the end
        self._index: list[IndexEntry] = []

    @property
    def buffered(self) -> int:
        """Bytes held now (0 once the header has been checked)."""
        return len(self._prefix)

    def feed(self, chunk: bytes) -> None:
        """Buffer the header; parse it when it has doubled; then walk the rest."""
        if self._done:
            if self._tail is not None:
                self._tail.feed(chunk)
            return
        room = HEADER_CAP + 1 - len(self._prefix)
        self._prefix += chunk[:room]
        if len(self._prefix) >= 132 and self._prefix[128:132] != b"DICM":
            raise refuse("is not DICOM Part 10: no DICM prefix after the 128-byte preamble")
        if len(self._prefix) < self._next_try and len(self._prefix) <= HEADER_CAP:
            return  # (at the cap: parse now, whatever was tried last)
        self._next_try = 2 * len(self._prefix)
        parsed = self._parse(final=False)
        if parsed is not None:
            self._check(parsed, chunk[room:])
        elif len(self._prefix) > HEADER_CAP:
            raise refuse(f"DICOM: identifying attributes not found in the first {HEADER_CAP} "
                         "bytes")

    def finish(self) -> None:
        """A file that ended before the stop point (no pixel data) is parsed whole."""
        if not self._done:
            if len(self._prefix) > HEADER_CAP:
                raise refuse(f"DICOM: identifying attributes not found in the first "
                             f"{HEADER_CAP} bytes")
            parsed = self._parse(final=True)
            if parsed is None:
                raise refuse("DICOM: the file is truncated")
            self._check(parsed, b"")
        if self._tail is not None:
            self._tail.finish()

    def _parse(self, *, final: bool) -> _Parsed | None:
        """The dataset up to the stop point; None if more bytes are needed."""
        fp = _Prefix(bytes(self._prefix))
        reached, last = False, -1

        def stop(tag: BaseTag, _vr: str | None, _length: int) -> bool:
            # Tags ascend (PS3.5 7.1): a repeated PatientID is read as the first by one
            # reader and the last by another (pydicom), so it is refused, not chosen.
            nonlocal reached, last
            if tag <= last:
                raise refuse("DICOM: data elements are repeated or out of order")
            reached = tag.group >= _STOP_GROUP
            if not reached:
                last = int(tag)
            return reached

        try:
            read_preamble(fp, force=False)
            meta = read_dataset(fp, is_implicit_VR=False, is_little_endian=True,
                                stop_when=lambda tag, _vr, _n: tag.group != 2)
            implicit, little = _encoding(meta)
            dataset = read_dataset(fp, implicit, little, stop_when=stop, defer_size=DEFER_SIZE)
        except InvalidRecordError:
            raise
        except Exception as e:  # pydicom raises many types on malformed input
            if final or len(self._prefix) > HEADER_CAP:
                raise refuse("is not DICOM Part 10: the header does not parse") from e
            return None
        if fp.overrun and not reached:  # cut inside an element: need more, or truncated
            return None
        if not reached and not final:
            return None
        # pydicom leaves the file at the start of the element that stopped it.
        tail = TailWalker(implicit=implicit, little=little, last_tag=last) if reached else None
        return _Parsed(dataset, tail, fp.tell())

    def _check(self, parsed: _Parsed, beyond_cap: bytes) -> None:
        dataset = parsed.dataset
        self._done, self._tail = True, parsed.tail
        if self._tail is not None:  # the bytes from the stop point on are walked
            self._tail.feed(bytes(self._prefix[parsed.stop_at :]) + beyond_cap)
        self._prefix = bytearray()  # the header is checked; the rest streams past
        for keyword in _REQUIRED:
            if not _value(dataset, keyword):
                raise refuse(f"DICOM: {keyword} is missing or empty")
        for keyword in _TYPE2:
            if keyword not in dataset:
                raise refuse(f"DICOM: {keyword} is missing")
        issuers = [_value(dataset, "IssuerOfPatientID"), *_universal_ids(dataset)]
        if not any(issuers):
            raise refuse("DICOM: IssuerOfPatientID (0010,0021) is missing: the assigning "
                         "authority cannot be matched")
        if not same_patient(self._patient, _value(dataset, "PatientID"), issuers):
            raise mismatch("PatientID (0010,0020) + IssuerOfPatientID (0010,0021)")
        self._index = bounded([
            entry(STUDY_UID, _value(dataset, "StudyInstanceUID")),
            entry(SERIES_UID, _value(dataset, "SeriesInstanceUID")),
            entry(SOP_UID, _value(dataset, "SOPInstanceUID")),
            entry(SOP_CLASS, _value(dataset, "SOPClassUID")),
            entry(MODALITY, _value(dataset, "Modality")),
            entry(DATE, day(_value(dataset, "StudyDate"))),
        ])  # fmt: skip

    def index(self) -> list[IndexEntry]:
        """Study, series and SOP instance UIDs, SOP class, modality, study date."""
        return self._index


def _encoding(meta: Dataset) -> tuple[bool, bool]:
    """(implicit VR, little endian) of the dataset after the file meta."""
    syntax = meta.get("TransferSyntaxUID")
    if not syntax:
        raise refuse("DICOM: the file meta has no TransferSyntaxUID")
    uid = UID(str(syntax))
    # Deflate would inflate a bounded prefix into an unbounded dataset (a zip bomb).
    if uid == DeflatedExplicitVRLittleEndian:
        raise refuse("DICOM: the deflated transfer syntax is not accepted")
    if not uid.is_transfer_syntax:
        return False, True  # encapsulated or private: explicit VR little endian (PS3.5 A.4)
    return uid.is_implicit_VR, uid.is_little_endian


def _value(dataset: Dataset, keyword: str) -> str:
    """An attribute's value as stripped text ('' when absent or empty)."""
    try:
        value: Any = dataset.get(keyword)
        return "" if value is None else str(value).strip()
    except Exception as e:  # a value that does not decode (or was deferred as too long)
        raise refuse(f"DICOM: {keyword} does not decode") from e


def _universal_ids(dataset: Dataset) -> list[str]:
    """UniversalEntityID of the IssuerOfPatientIDQualifiersSequence (0010,0024), if any."""
    try:
        qualifiers = dataset.get("IssuerOfPatientIDQualifiersSequence") or []
        items = list(qualifiers)
    except Exception as e:  # malformed or over-long sequence
        raise refuse("DICOM: IssuerOfPatientIDQualifiersSequence does not decode") from e
    return [_value(item, "UniversalEntityID") for item in items]
