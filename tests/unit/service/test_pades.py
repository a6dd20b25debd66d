"""service.signing.pades and the PDF half of SignatureValidator, with a software key.

The token path is covered by tests/integration/signing/test_pades.py; here the key is a
``cryptography`` EC key behind the same ``Signer`` protocol, to test the limits and the
verdicts quickly.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyhanko.pdf_utils import generic
from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter

from service.signing.pades import embedded_by_cms, sign_pdf
from service.signing.pdf_bounds import MAX_PADES_BYTES, check_size, read_bounded
from service.signing.validation import SignatureValidator
from storage.errors import InvalidRecordError
from tests.content import pdf


class _SoftSigner:
    key_label = "soft"

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


def _name(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    eku: x509.ObjectIdentifier | None = None,
) -> bytes:
    """A certificate for ``key``: a self-signed CA without ``issuer``, else a signer's."""
    ca = issuer is None
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.now(UTC)
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=True, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    builder = x509.CertificateBuilder()
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    cert = (
        builder.subject_name(_name(name)).issuer_name(_name(issuer_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(usage, critical=True)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.DER)


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
