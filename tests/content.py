"""Synthetic content of each record kind, built here (never copied patient data).

``content(kind, patient_id, authority)`` gives a small valid record of ``kind`` for that
patient, for tests whose subject is not the format itself.
"""

from __future__ import annotations

import io
import json

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from storage.formats.base import authority_key

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def dicom(patient_id: str, authority: str, *, pixels: bytes | None = b"\0" * 64,
          issuer: str | None = None, **attributes: object) -> bytes:
    """A DICOM Part 10 CT instance; ``issuer`` defaults to the authority's bare OID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = "20260101"
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = authority_key(authority) if issuer is None else issuer
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.BitsAllocated = 16, 16, 16  # not checked against the pixels
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if pixels is not None:
        ds.PixelData = pixels
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def hl7v2(patient_id: str, authority: str, *, control_id: str = "MSG00001",
          message_type: str = "ORU^R01^ORU_R01", sep: str = "\r",
          observations: list[str] | None = None, obr_time: str = "") -> bytes:
    """An ORU^R01 with one OBX (or the OBX segments ``observations``); CX.4 carries the
    authority as HD namespace&OID&ISO."""
    hd = f"HOSP&{authority_key(authority)}&ISO"
    segments = [
        f"MSH|^~\\&|LAB|HOSP|EMR|HOSP|20260101120000||{message_type}|{control_id}|P|2.5.1",
        f"PID|1||{patient_id}^^^{hd}^MR||SYNTHETIC^PATIENT",
        f"OBR|1||ORD1|718-7^Hemoglobin^LN|||{obr_time}",
        *(observations if observations is not None
          else ["OBX|1|NM|718-7^Hemoglobin^LN||13.5|g/dL|||||F"]),
    ]
    return (sep.join(segments) + sep).encode()


# IHE PCD-01 device observations: ISO/IEEE 11073-10101 (MDC) codes in OBX-3.
PCD01_OBSERVATIONS = [
    "OBX|1|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC|1.0.1.1|97|262688^MDC_DIM_PERCENT^MDC|||||F"
    "|||20260102103000",
    "OBX|2|NM|149530^MDC_PULS_OXIM_PULS_RATE^MDC|1.0.1.2|72|264864^MDC_DIM_BEAT_PER_MIN^MDC"
    "|||||F|||20260102103000",
]


def cda(patient_id: str, authority: str, *, body: str = "", prolog: str = "",
        code: str = "18842-5", effective: str = "20260101120000") -> bytes:
    """A minimal CDA R2 document header (by default a discharge summary, LOINC 18842-5)."""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n{prolog}'
        '<ClinicalDocument xmlns="urn:hl7-org:v3">'
        '<typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>'
        '<id root="2.999.1" extension="doc-1"/>'
        f'<code code="{code}" codeSystem="2.16.840.1.113883.6.1"/>'
        '<title>Discharge summary</title>'
        f'<effectiveTime value="{effective}"/>'
        '<recordTarget><patientRole>'
        f'<id root="{authority_key(authority)}" extension="{patient_id}"/>'
        '</patientRole></recordTarget>'
        f'<component><structuredBody>{body}</structuredBody></component>'
        '</ClinicalDocument>'
    ).encode()


def fhir(patient_id: str, authority: str, *, system: str | None = None,
         code: str = "718-7") -> bytes:
    """A FHIR R4 Observation whose subject is given by identifier."""
    return json.dumps({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "effectiveDateTime": "2026-01-03T08:00:00Z",
        "subject": {"identifier": {"system": authority if system is None else system,
                                   "value": patient_id}},
        "valueQuantity": {"value": 13.5, "unit": "g/dL"},
    }).encode()


def pdf(text: str = "synthetic", *, filler: bytes = b"") -> bytes:
    """A one-page PDF with a correct cross-reference table; ``filler`` (any bytes) goes
    into an extra stream object, to make a large file."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] /Contents 4 0 R >>",
    ]
    stream = f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode()
    objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    if filler:
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(filler), filler))
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (n, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def content(kind: str, patient_id: str, authority: str) -> bytes:
    """Valid content of ``kind`` (a RecordKind name) for the patient."""
    makers = {
        "DICOM": lambda: dicom(patient_id, authority),
        "HL7V2": lambda: hl7v2(patient_id, authority),
        "CDA": lambda: cda(patient_id, authority),
        "FHIR": lambda: fhir(patient_id, authority),
        "PDF": pdf,
    }
    return makers[kind]()
