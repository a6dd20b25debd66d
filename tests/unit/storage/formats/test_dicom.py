"""DICOM: pydicom reads a bounded prefix and stops before the pixel data."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

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
