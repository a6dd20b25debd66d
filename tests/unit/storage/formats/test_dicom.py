"""DICOM: pydicom reads a bounded prefix and stops before the pixel data."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import hl7.util
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from storage.errors import InvalidRecordError
from storage.formats import checked
from storage.formats.dicom import HEADER_CAP, DicomValidator
from storage.model import RecordKind
from tests import content
from tests.unit.storage.formats.helpers import PATIENT, refused, run

DICOM = RecordKind.DICOM


def _dicom(**attributes: object) -> bytes:
    return content.dicom(PATIENT.id, PATIENT.authority, **attributes)


def test_large_pixel_data_is_not_buffered() -> None:
    data = _dicom(pixels=bytes(32 << 20))
    validator = DicomValidator(PATIENT)
    chunk, most = 1 << 20, 0
    for start in range(0, len(data), chunk):
        validator.feed(data[start : start + chunk])
        most = max(most, validator.buffered)
    validator.finish()
    assert validator.buffered == 0, "the header was kept after it was checked"
    assert most <= chunk, f"{most} bytes buffered"


def test_a_file_without_pixel_data_is_read_to_its_end() -> None:
    run(DICOM, _dicom(Rows=None, Columns=None, BitsAllocated=None, pixels=None))


@pytest.mark.parametrize("missing", ["PatientID", "Modality", "SOPInstanceUID",
                                     "StudyInstanceUID", "StudyDate"])
def test_a_missing_attribute_is_named(missing: str) -> None:
    assert missing in refused(DICOM, _dicom(**{missing: None}))


def test_without_issuer_the_authority_cannot_match() -> None:
    assert "IssuerOfPatientID" in refused(DICOM, _dicom(IssuerOfPatientID=None))


def test_issuer_from_the_qualifiers_sequence() -> None:
    item = Dataset()
    item.UniversalEntityID, item.UniversalEntityIDType = "2.999.42.1", "ISO"
    run(DICOM, _dicom(IssuerOfPatientID=None, IssuerOfPatientIDQualifiersSequence=[item]))
    run(DICOM, _dicom(IssuerOfPatientID="urn:oid:2.999.42.1"))


def test_no_dicm_is_refused_at_once() -> None:
    data = bytearray(_dicom())
    data[128:132] = b"DICX"
    validator = DicomValidator(PATIENT)
    with pytest.raises(InvalidRecordError, match="DICM"):
        validator.feed(bytes(data[:200]))


def test_deflated_transfer_syntax_is_refused() -> None:
    ds = dcmread(io.BytesIO(_dicom()))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert "deflated" in refused(DICOM, out.getvalue())


def test_a_huge_declared_length_is_refused_within_the_cap() -> None:
    data = _dicom()
    meta_end = data.index(b"\x08\x00")  # first element after the file meta group
    huge = b"\x09\x00\x10\x10OB\x00\x00" + (0xFFFFFFF0).to_bytes(4, "little")
    forged = data[:meta_end] + huge + bytes(HEADER_CAP + (2 << 20))
    validator = DicomValidator(PATIENT)
    pieces = [forged[i : i + (1 << 20)] for i in range(0, len(forged), 1 << 20)]
    most = 0

    def watch() -> None:
        nonlocal most
        for _ in checked(pieces, validator):
            most = max(most, validator.buffered)

    with pytest.raises(InvalidRecordError, match="content"):
        watch()
    assert most <= HEADER_CAP + 1, f"{most} bytes buffered"


def test_truncated_header_is_refused() -> None:
    data = _dicom()
    cut = data.index(b"\x10\x00\x20\x00") + 6  # inside PatientID
    assert "DICOM" in refused(DICOM, data[:cut])


# --- hostile headers (attack review) ------------------------------------------------

def _insert_before_patient_id(data: bytes, extra: bytes) -> bytes:
    at = data.index(b"\x10\x00\x20\x00LO")  # (0010,0020) in explicit VR little endian
    return data[:at] + extra + data[at:]


def _private(count: int, size: int = 0) -> bytes:
    """``count`` private OB elements of ``size`` bytes in groups 0009, 000B, ... (ascending)."""
    return b"".join(
        (9 + 2 * (e >> 16)).to_bytes(2, "little") + (e & 0xFFFF).to_bytes(2, "little")
        + b"OB\0\0" + size.to_bytes(4, "little") + bytes(size)
        for e in range(0x1000, 0x1000 + count)
    )


def test_many_tiny_elements_are_refused_cheaply() -> None:
    """500k 8-byte elements in a 4 MiB prefix cost seconds and ~130 MiB per parse."""
    data = _insert_before_patient_id(_dicom(), _private(300_000)[: 12 * 300_000])
    assert "elements before the pixel data" in refused(DICOM, data)


@pytest.mark.parametrize("value", [b"T0418 ", b"T0417 "])
def test_a_repeated_patient_id_is_refused(value: bytes) -> None:
    """pydicom keeps the last of two (0010,0020); another reader may keep the first."""
    data = _dicom()
    second = b"\x10\x00\x20\x00LO" + len(value).to_bytes(2, "little") + value
    at = data.index(b"\x10\x00\x21\x00LO")  # before IssuerOfPatientID: out of order
    assert "out of order" in refused(DICOM, data[:at] + second + data[at:])


def test_a_header_between_half_the_cap_and_the_cap_is_read_in_any_chunking() -> None:
    """The prefix was parsed when it doubled; at the cap it was never parsed again, so a
    3 MiB header sent in 1.25 MiB chunks was refused, and junk was refused only at the
    end of the stream, after all of it had been uploaded."""
    chunk = 1280 << 10
    good = _insert_before_patient_id(_dicom(pixels=bytes(8 << 20)), _private(200, 15_000))
    run(DICOM, good, chunk=chunk)
    junk = _dicom()[:200] + bytes(12 << 20)
    validator = DicomValidator(PATIENT)

    def feed_all() -> None:  # feed only: the refusal comes at the cap, not at finish
        for start in range(0, len(junk), chunk):
            validator.feed(junk[start : start + chunk])

    with pytest.raises(InvalidRecordError):
        feed_all()


def _saved(ds: Dataset) -> bytes:
    out = io.BytesIO()
    syntax = ds.file_meta.TransferSyntaxUID
    dcmwrite(out, ds, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian,
             force_encoding=True)
    return out.getvalue()


def _with_syntax(syntax: str, *, encapsulated: bool = False) -> bytes:
    ds = dcmread(io.BytesIO(_dicom(pixels=bytes(64 << 10))))
    ds.file_meta.TransferSyntaxUID = syntax
    if encapsulated:
        ds.PixelData = encapsulate([b"\xff\xd8frame-one\xff\xd9", b"\xff\xd8frame-two\xff\xd9"])
        ds["PixelData"].is_undefined_length = True
    item = Dataset()
    item.CodeValue = "X"  # an undefined-length sequence after the pixel data
    ds.DataSetTrailingPadding = b"\0" * 8
    ds.add_new(0x00431010, "SQ", [item])  # (odd group: private), before pixel data order
    ds[0x00431010].is_undefined_length = True
    return _saved(ds)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 16])
@pytest.mark.parametrize(("syntax", "encapsulated"), [
    (ExplicitVRLittleEndian, False), (ImplicitVRLittleEndian, False),
    (ExplicitVRBigEndian, False), (JPEGBaseline8Bit, True),
])
def test_the_rest_of_the_file_is_walked_in_any_syntax(syntax: str, encapsulated: bool,
                                                      chunk: int) -> None:
    run(DICOM, _with_syntax(syntax, encapsulated=encapsulated), chunk=chunk)


@pytest.mark.parametrize("chunk", [5, 1 << 16])
def test_a_patient_id_after_the_pixel_data_is_refused(chunk: int) -> None:
    """pydicom's dcmread keeps the last of two (0010,0020): this file reads as T0418."""
    value = b"T0418 "
    data = _dicom(pixels=bytes(1 << 20)) + b"\x10\x00\x20\x00LO" + len(value).to_bytes(
        2, "little") + value
    assert dcmread(io.BytesIO(data)).PatientID == "T0418"
    assert "out of order" in refused(DICOM, data, chunk=chunk)


def test_a_file_cut_inside_the_pixel_data_is_refused() -> None:
    data = _dicom(pixels=bytes(1 << 20))
    assert "truncated" in refused(DICOM, data[:-100])


class _RootRecords(logging.Handler):
    """What the service's log would receive: records that reach the root logger.

    (pytest's own capture also hooks non-propagating loggers, so ``caplog`` cannot
    show what stops short of the root.)
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def root_log() -> Iterator[_RootRecords]:
    root = logging.getLogger()
    handler, level = _RootRecords(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_pydicom_never_logs_or_warns_a_value_from_the_content(
    root_log: _RootRecords, recwarn: pytest.WarningsRecorder
) -> None:
    """Malformed values are quoted by pydicom's own validation: none may reach a log."""
    marker = "ZQXJ7731"
    bad_uid = f"1.2.{marker}"  # not a valid UI value: pydicom would quote it
    data = content.dicom(PATIENT.id, PATIENT.authority, SeriesInstanceUID=bad_uid,
                         StudyDescription=marker * 20)  # LO longer than 64
    recwarn.clear()
    outcome = ""
    try:
        run(RecordKind.DICOM, data)
    except InvalidRecordError as e:
        outcome = str(e)
    assert marker not in outcome
    assert not [m for m in root_log.messages if marker in m], "a value reached the log"
    assert not [w for w in recwarn if marker in str(w.message)], "pydicom warned with a value"


def test_hl7_parser_records_do_not_reach_the_service_log(root_log: _RootRecords) -> None:
    """The hl7 package logs stray segments verbatim (hl7.util): cut off like pydicom's."""
    hl7.util.logger.error("Segment received before message header [%s]", "PID|X")
    assert not [m for m in root_log.messages if "PID|X" in m]


def test_a_1_gib_instance_streams_through_in_bounded_memory() -> None:
    """Issue 11: a 1 GiB DICOM never sits in memory. The header is parsed from a bounded
    prefix and the pixel data is walked past by its length, chunk by chunk."""
    import struct  # noqa: PLC0415
    import tracemalloc  # noqa: PLC0415

    size = 1 << 30
    head = content.dicom(PATIENT.id, PATIENT.authority, pixels=None)
    # (7FE0,0010) OB, explicit VR little endian: tag, VR, 2 reserved bytes, 32-bit length.
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size)
    chunk = bytes(1 << 20)
    validator = DicomValidator(PATIENT)
    tracemalloc.start()
    try:
        passed = 0
        for piece in checked(iter([head + pixel_header, *([chunk] * (size // len(chunk)))]),
                             validator):  # fmt: skip
            passed += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert passed == len(head) + len(pixel_header) + size
    assert peak < 64 << 20, f"peak {peak >> 20} MiB while 1 GiB streamed through"
    assert validator.index()  # the header's fields were read (UIDs, modality)
