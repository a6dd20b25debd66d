"""PAdES for PDF records end to end: real server, SoftHSM2 signers, SQLite and PostgreSQL.

The signed PDFs are checked with pyHanko's PDF validator called here (not the service's
code path) and with ``openssl cms -verify`` over the signature's byte range.

PYTEST_DONT_REWRITE: failures name codes and fields, never record content.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from asn1crypto import pem
from asn1crypto import x509 as asn1_x509
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation.pdf_embedded import (
    EmbeddedPdfSignature,
    async_validate_pdf_signature,
)
from pyhanko.sign.validation.status import PdfSignatureStatus, SignatureCoverageLevel
from pyhanko_certvalidator import ValidationContext

from service._gen.medvault.v1 import audit_pb2 as aupb
from service._gen.medvault.v1 import records_pb2 as pb
from service._gen.medvault.v1 import signing_pb2 as spb
from service._gen.medvault.v1 import signing_pb2_grpc as spb_grpc
from service.signing.pdf_bounds import MAX_PADES_BYTES
from tests.content import pdf
from tests.integration.access.helpers import Client, code_of, events, grant, new_patient
from tests.integration.signing.conftest import SigningStack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
TIMEOUT = 30
PADES = spb.SIGNATURE_FORMAT_PADES


def _stub(c: Client) -> spb_grpc.SigningServiceStub:
    return spb_grpc.SigningServiceStub(c.channel)


def _put(c: Client, patient: pb.PatientId, content: bytes, kind: int) -> str:
    head = pb.RecordHeader(patient=patient, kind=kind, content_type="application/pdf")
    pieces = [content[i : i + (1 << 20)] for i in range(0, len(content), 1 << 20)]
    stream = iter([pb.PutRecordRequest(header=head)]
                  + [pb.PutRecordRequest(chunk=p) for p in pieces])  # fmt: skip
    return str(c.records.PutRecord(stream, timeout=120).id)


def _record(
    stack: SigningStack, *doctors: str, content: bytes, kind: int = pb.RECORD_KIND_PDF
) -> str:
    clerk = stack.clients["clerk-s"]
    patient = new_patient()
    for doctor in doctors:
        grant(clerk, patient, doctor)
    return _put(clerk, patient, content, kind)


def _read(c: Client, record_id: str, version: int = 0) -> tuple[int, bytes]:
    """(version, content) of one version (the latest by default)."""
    found, content = 0, bytearray()
    request = pb.GetRecordRequest(id=record_id, version=version)
    for response in c.records.GetRecord(request, timeout=TIMEOUT):
        if response.WhichOneof("message") == "metadata":
            found = response.metadata.version
        else:
            content += response.chunk
    return found, bytes(content)


def _sign(
    stack: SigningStack, who: str, record_id: str, fmt: int = PADES
) -> spb.SignatureInfo:
    request = spb.SignRecordRequest(record_id=record_id, signer=who, format=fmt)
    info: spb.SignatureInfo = _stub(stack.clients[who]).SignRecord(request, timeout=TIMEOUT)
    return info


def _verify(
    stack: SigningStack, who: str, record_id: str, version: int = 0
) -> list[spb.SignatureVerification]:
    request = spb.VerifyRecordRequest(record_id=record_id, version=version)
    return list(_stub(stack.clients[who]).VerifyRecord(request, timeout=TIMEOUT).results)


def _embedded(data: bytes) -> list[EmbeddedPdfSignature]:
    return list(PdfFileReader(io.BytesIO(data), strict=False).embedded_signatures)


def _pyhanko_status(stack: SigningStack, embedded: EmbeddedPdfSignature) -> PdfSignatureStatus:
    _, _, der = pem.unarmor(stack.ca.cert_path.read_bytes())
    context = ValidationContext(
        trust_roots=[asn1_x509.Certificate.load(der)], allow_fetching=False
    )
    status: PdfSignatureStatus = asyncio.run(
        async_validate_pdf_signature(embedded, signer_validation_context=context)
    )
    return status


def _der_element(padded: bytes) -> bytes:
    """The DER element at the start of ``padded``, by its own length (the zero padding
    after it cannot be stripped: the signature's last byte may be zero, 1 in 256)."""
    assert padded[0] == 0x30, "not a DER SEQUENCE"
    if padded[1] < 0x80:
        return padded[: 2 + padded[1]]
    size = padded[1] & 0x7F
    return padded[: 2 + size + int.from_bytes(padded[2 : 2 + size], "big")]


def _openssl_verify(
    tmp_path: Path, ca: Path, signed: bytes, embedded: EmbeddedPdfSignature
) -> bool:
    """``openssl cms -verify`` of the embedded CMS over the PDF's signed byte range."""
    a, b, c, d = (int(x) for x in embedded.sig_object["/ByteRange"])
    (tmp_path / "range.bin").write_bytes(signed[a : a + b] + signed[c : c + d])
    (tmp_path / "sig.der").write_bytes(_der_element(bytes(embedded.sig_object["/Contents"])))
    result = subprocess.run(
        ["openssl", "cms", "-verify", "-binary", "-content", str(tmp_path / "range.bin"),
         "-inform", "DER", "-in", str(tmp_path / "sig.der"), "-CAfile", str(ca),
         "-out", "/dev/null"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return result.returncode == 0


def _latest_version(stack: SigningStack, who: str, record_id: str) -> int:
    stat = stack.clients[who].records.StatRecord(
        pb.StatRecordRequest(id=record_id), timeout=TIMEOUT
    )
    return int(stat.version)


def test_pades_makes_a_new_version_that_validates(stack: SigningStack, tmp_path: Path) -> None:
    original = pdf("pades synthetic")
    record_id = _record(stack, "dr-ec", "dr-rsa", "nurse-s", content=original)
    info = _sign(stack, "dr-ec", record_id)
    assert (info.version, info.format, info.algorithm) == (2, PADES, "ecdsa-sha256")
    assert _read(stack.clients["nurse-s"], record_id, 1) == (1, original)  # unchanged
    version, signed = _read(stack.clients["nurse-s"], record_id)
    assert version == 2
    assert signed.startswith(original)  # an incremental update
    # The service's verdict, and pyHanko's and openssl's, independently of the service.
    results = _verify(stack, "nurse-s", record_id)
    assert [(r.signature.id, r.valid, r.reason, r.signature.format) for r in results] == [
        (info.id, True, "", PADES)
    ]
    assert _verify(stack, "nurse-s", record_id, 1) == []
    [embedded] = _embedded(signed)
    status = _pyhanko_status(stack, embedded)
    assert status.bottom_line
    assert (status.intact, status.valid, status.trusted) == (True, True, True)
    assert status.coverage == SignatureCoverageLevel.ENTIRE_FILE
    assert embedded.sig_object["/SubFilter"] == "/ETSI.CAdES.detached"
    assert _openssl_verify(tmp_path, stack.ca.cert_path, signed, embedded)
    reply = _stub(stack.clients["dr-ec"]).GetSignature(
        spb.GetSignatureRequest(signature_id=info.id), timeout=TIMEOUT
    )
    assert bytes(embedded.sig_object["/Contents"]).startswith(reply.p7s)
    # The audit trail: the new version is written under signatures.sign, then the signature.
    sign_events = events(stack.clients["officer-s"], principal="dr-ec", action="signatures.sign")
    resources = [e.resource for e in sign_events if record_id in e.resource or e.resource
                 == f"signature/{info.id}"]  # fmt: skip
    assert resources == [f"record/{record_id}/v1", f"record/{record_id}/v2",
                         f"signature/{info.id}"]  # fmt: skip


def test_cosigning_with_pades_keeps_the_first_signature(stack: SigningStack) -> None:
    record_id = _record(stack, "dr-ec", "dr-rsa", content=pdf("cosigned synthetic"))
    first = _sign(stack, "dr-ec", record_id)
    second = _sign(stack, "dr-rsa", record_id)
    assert (first.version, second.version) == (2, 3)
    assert second.algorithm == "rsa-pkcs1-sha256"
    assert [(r.signature.id, r.valid) for r in _verify(stack, "dr-ec", record_id)] == [
        (second.id, True)
    ]
    assert [(r.signature.id, r.valid) for r in _verify(stack, "dr-ec", record_id, 2)] == [
        (first.id, True)
    ]
    older = spb.SignRecordRequest(record_id=record_id, version=2, signer="dr-ec", format=PADES)
    with pytest.raises(grpc.RpcError) as raised:
        _stub(stack.clients["dr-ec"]).SignRecord(older, timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "latest version only (3)" in (raised.value.details() or "")
    assert _latest_version(stack, "dr-ec", record_id) == 3
    _, signed = _read(stack.clients["dr-ec"], record_id)
    statuses = [_pyhanko_status(stack, e) for e in _embedded(signed)]
    assert [s.bottom_line for s in statuses] == [True, True]  # the first: a benign update
    assert [s.coverage for s in statuses] == [
        SignatureCoverageLevel.ENTIRE_REVISION, SignatureCoverageLevel.ENTIRE_FILE
    ]


def test_flipped_byte_in_signed_range_is_detected(stack: SigningStack, tmp_path: Path) -> None:
    original = pdf("tamper synthetic")
    record_id = _record(stack, "dr-ec", content=original)
    _sign(stack, "dr-ec", record_id)
    _, signed = _read(stack.clients["dr-ec"], record_id)
    [embedded] = _embedded(signed)
    start, length, _, _ = (int(x) for x in embedded.sig_object["/ByteRange"])
    where = original.index(b"tamper synthetic")  # page text, inside the first signed range
    assert start <= where < start + length
    tampered = bytearray(signed)
    tampered[where] ^= 0x01
    [forged] = _embedded(bytes(tampered))
    status = _pyhanko_status(stack, forged)
    assert not status.intact
    assert not status.bottom_line
    assert not _openssl_verify(tmp_path, stack.ca.cert_path, bytes(tampered), forged)


def test_pades_on_a_non_pdf_is_refused_and_audited(stack: SigningStack) -> None:
    record_id = _record(stack, "dr-ec", content=b"synthetic note", kind=pb.RECORD_KIND_OTHER)
    with pytest.raises(grpc.RpcError) as raised:
        _sign(stack, "dr-ec", record_id)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "format" in (raised.value.details() or "")
    failed = events(stack.clients["officer-s"], principal="dr-ec", outcome=aupb.OUTCOME_FAILED)
    assert any(e.resource == f"record/{record_id}" and e.status == "INVALID_ARGUMENT"
               for e in failed)  # fmt: skip
    assert _latest_version(stack, "dr-ec", record_id) == 1
    assert _verify(stack, "dr-ec", record_id) == []


def test_unknown_format_is_refused(stack: SigningStack) -> None:
    record_id = _record(stack, "dr-ec", content=pdf())
    code = code_of(_stub(stack.clients["dr-ec"]).SignRecord,
                   spb.SignRecordRequest(record_id=record_id, signer="dr-ec", format=7),
                   timeout=TIMEOUT)  # fmt: skip
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert _latest_version(stack, "dr-ec", record_id) == 1


def test_pades_without_the_signers_rights_is_refused_and_audited(stack: SigningStack) -> None:
    record_id = _record(stack, "dr-ec", "dr-rsa", "nurse-s", content=pdf())
    other = spb.SignRecordRequest(record_id=record_id, signer="dr-ec", format=PADES)
    code = code_of(_stub(stack.clients["dr-rsa"]).SignRecord, other, timeout=TIMEOUT)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    denied = events(stack.clients["officer-s"], principal="dr-rsa", outcome=aupb.OUTCOME_DENIED)
    assert any(e.resource == "signer/dr-ec" for e in denied)
    nurse = spb.SignRecordRequest(record_id=record_id, signer="nurse-s", format=PADES)
    code = code_of(_stub(stack.clients["nurse-s"]).SignRecord, nurse, timeout=TIMEOUT)
    assert code == grpc.StatusCode.PERMISSION_DENIED  # nurses verify, they do not sign
    denied = events(stack.clients["officer-s"], principal="nurse-s", outcome=aupb.OUTCOME_DENIED)
    assert denied
    ungranted = _record(stack, content=pdf())  # dr-ec has no grant for this patient
    code = code_of(_stub(stack.clients["dr-ec"]).SignRecord,
                   spb.SignRecordRequest(record_id=ungranted, signer="dr-ec", format=PADES),
                   timeout=TIMEOUT)  # fmt: skip
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert _latest_version(stack, "dr-ec", record_id) == 1
    assert _verify(stack, "dr-ec", record_id) == []


def test_cades_detached_stays_the_default(stack: SigningStack) -> None:
    content = pdf("cades synthetic")
    record_id = _record(stack, "dr-ec", content=content)
    info = _sign(stack, "dr-ec", record_id, spb.SIGNATURE_FORMAT_UNSPECIFIED)
    assert (info.version, info.format) == (1, spb.SIGNATURE_FORMAT_CADES_DETACHED)
    assert _latest_version(stack, "dr-ec", record_id) == 1
    assert _read(stack.clients["dr-ec"], record_id) == (1, content)
    results = _verify(stack, "dr-ec", record_id)
    assert [(r.valid, r.signature.format) for r in results] == [
        (True, spb.SIGNATURE_FORMAT_CADES_DETACHED)
    ]


def test_pdf_over_the_pades_cap_is_refused(stack: SigningStack) -> None:
    """The refusal names the field and the cap, and stores nothing; CAdES still signs."""
    big = pdf("big synthetic", filler=bytes(MAX_PADES_BYTES))
    record_id = _record(stack, "dr-ec", content=big)
    with pytest.raises(grpc.RpcError) as raised:
        _sign(stack, "dr-ec", record_id)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert details.startswith("format:")
    assert str(MAX_PADES_BYTES) in details
    assert _latest_version(stack, "dr-ec", record_id) == 1
    info = _sign(stack, "dr-ec", record_id, spb.SIGNATURE_FORMAT_CADES_DETACHED)
    assert info.version == 1  # a detached signature has no size cap


def _pdf_of(catalog: bytes, *more: bytes) -> bytes:
    """A PDF of one empty page with this catalog (and objects 4...), its cross-reference
    table right."""
    objects = [
        catalog,
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>",
        *more,
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (n, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)  # fmt: skip
    return bytes(out)


def _nested_pdf(depth: int = 5000) -> bytes:
    """A well-formed PDF whose signature field's value is an array nested ``depth``
    deep: any parser that recurses per level runs out of stack."""
    return _pdf_of(
        b"<< /Type /Catalog /Pages 2 0 R /AcroForm << /Fields [4 0 R] >> >>",
        b"<< /FT /Sig /T (synthetic) /V " + b"[" * depth + b"]" * depth + b" >>",
    )


def _wrong_type_pdf() -> bytes:
    """A well-formed PDF whose signature field's value is a number, not a dictionary
    (pyHanko's reader raised AttributeError on it; found by fuzzing)."""
    return _pdf_of(
        b"<< /Type /Catalog /Pages 2 0 R /AcroForm << /Fields [4 0 R] >> >>",
        b"<< /FT /Sig /T (synthetic) /V 7 >>",
    )


@pytest.mark.parametrize("hostile", [_nested_pdf, _wrong_type_pdf], ids=["nested", "wrong-type"])
def test_a_hostile_pdf_is_refused_for_pades_and_its_cades_signature_verifies(
    stack: SigningStack, hostile: Any
) -> None:
    """Attack (cold review): pyHanko raises more than PdfError on a PDF any writer can
    store (RecursionError on deep nesting, AttributeError on an object of the wrong
    type, its own assertions, OverflowError): SignRecord PADES and every VerifyRecord of
    the record failed INTERNAL, each with a traceback in the service log, so the
    record's CAdES signature could never be verified again."""
    record_id = _record(stack, "dr-ec", content=hostile())
    with pytest.raises(grpc.RpcError) as raised:
        _sign(stack, "dr-ec", record_id)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.code().name
    assert (raised.value.details() or "").startswith("record_id:")
    assert _latest_version(stack, "dr-ec", record_id) == 1
    _sign(stack, "dr-ec", record_id, spb.SIGNATURE_FORMAT_CADES_DETACHED)
    results = _verify(stack, "dr-ec", record_id)
    assert [(r.valid, r.signature.format) for r in results] == [
        (True, spb.SIGNATURE_FORMAT_CADES_DETACHED)
    ]
    log = stack.service.log_path.read_text(errors="replace")
    for error in ("RecursionError", "AttributeError"):
        assert error not in log, "a traceback of the PDF's parse in the service log"


def test_pyhanko_never_writes_pdf_content_to_the_service_log(stack: SigningStack) -> None:
    """Attack (cold review): pyHanko's reader logs what it trips over, quoting the PDF
    (a repeated dictionary key by its name). The PDF is patient content; as for pydicom
    and hl7, the parser's records must not reach the service log."""
    marker = b"Synthetic#20Patient#20Nameinlog"
    body = _pdf_of(b"<< /Type /Catalog /Pages 2 0 R /" + marker + b" 1 /" + marker + b" 2 >>")
    record_id = _record(stack, "dr-ec", content=body)
    _sign(stack, "dr-ec", record_id, spb.SIGNATURE_FORMAT_CADES_DETACHED)
    _verify(stack, "dr-ec", record_id)
    code_of(_stub(stack.clients["dr-ec"]).SignRecord,
            spb.SignRecordRequest(record_id=record_id, signer="dr-ec", format=PADES),
            timeout=TIMEOUT)  # fmt: skip
    assert "Nameinlog" not in stack.service.log_path.read_text(errors="replace"), (
        "PDF content in the service log")
