"""service.signing.pades and the PDF half of SignatureValidator, with a software key.

The token path is covered by tests/integration/signing/test_pades.py; here the key is a
``cryptography`` EC key behind the same ``Signer`` protocol, to test the limits and the
verdicts quickly.
"""

from __future__ import annotations

import io

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter

from service.signing.pades import embedded_by_cms, sign_pdf
from service.signing.pdf_bounds import MAX_PADES_BYTES, check_size, read_bounded
from service.signing.validation import SignatureValidator
from storage.errors import InvalidRecordError
from tests.content import pdf
from tests.unit.service.signing_certs import SoftSigner as _SoftSigner
from tests.unit.service.signing_certs import certificate as _certificate

CA_KEY = ec.generate_private_key(ec.SECP256R1())
CA = _certificate("synthetic ca", CA_KEY)


@pytest.fixture(scope="module")
def signer() -> tuple[_SoftSigner, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    return _SoftSigner(key), _certificate("synthetic signer", key, ("synthetic ca", CA_KEY))


def test_size_cap_refuses_before_and_while_reading() -> None:
    check_size(MAX_PADES_BYTES)
    with pytest.raises(InvalidRecordError) as raised:
        check_size(MAX_PADES_BYTES + 1)
    assert raised.value.field == "format"

    def endless() -> object:
        while True:
            yield bytes(1 << 20)

    with pytest.raises(InvalidRecordError):
        read_bounded(endless())  # type: ignore[arg-type]


def test_signed_pdf_is_an_incremental_update_with_one_embedded_signature(
    signer: tuple[_SoftSigner, bytes],
) -> None:
    original = pdf("unit synthetic")
    signed = sign_pdf(signer[0], signer[1], original)
    assert signed.pdf.startswith(original)
    assert list(embedded_by_cms(signed.pdf)) == [signed.cms]
    assert signed.signing_time.tzinfo is not None
    again = sign_pdf(signer[0], signer[1], signed.pdf)
    assert len(embedded_by_cms(again.pdf)) == 2


def test_verdicts(signer: tuple[_SoftSigner, bytes]) -> None:
    signed = sign_pdf(signer[0], signer[1], pdf("verdict synthetic"))
    embedded = embedded_by_cms(signed.pdf)[signed.cms]
    trusting = SignatureValidator([CA])
    assert trusting.validate_pdf(embedded, signed.signing_time).valid
    other = _certificate("another ca", ec.generate_private_key(ec.SECP256R1()))
    verdict = SignatureValidator([other]).validate_pdf(embedded, signed.signing_time)
    assert (verdict.valid, verdict.reason.startswith("untrusted chain")) == (False, True)
    assert not SignatureValidator([]).validate_pdf(embedded, signed.signing_time).valid
    # A change appended after signing: still intact, but no longer the signed file.
    writer = IncrementalPdfFileWriter(io.BytesIO(signed.pdf))
    writer.root["/Lang"] = generic.TextStringObject("en")
    writer.update_root()
    changed = io.BytesIO()
    writer.write(changed)
    later = embedded_by_cms(changed.getvalue())[signed.cms]
    verdict = trusting.validate_pdf(later, signed.signing_time)
    assert verdict == verdict.__class__(False, "the PDF was changed after it was signed")


def test_a_certificate_for_servers_only_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = _certificate(
        "tls only", key, ("synthetic ca", CA_KEY), eku=ExtendedKeyUsageOID.SERVER_AUTH
    )
    signed = sign_pdf(_SoftSigner(key), der, pdf("eku synthetic"))
    embedded = embedded_by_cms(signed.pdf)[signed.cms]
    verdict = SignatureValidator([CA]).validate_pdf(embedded, signed.signing_time)
    assert (verdict.valid, "key usage" in verdict.reason) == (False, True)


@pytest.mark.parametrize("data", [b"not a pdf", pdf()[:200]])
def test_unsignable_pdf_is_invalid_argument(
    signer: tuple[_SoftSigner, bytes], data: bytes
) -> None:
    with pytest.raises(InvalidRecordError) as raised:
        sign_pdf(signer[0], signer[1], data)
    assert raised.value.field == "record_id"
    assert embedded_by_cms(data) == {}
