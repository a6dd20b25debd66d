"""Fuzz target: a detached CMS signature (``.p7s``) validated against a trust anchor
(``service.signing.SignatureValidator``). Documented: a ``Verdict``, never an exception;
a fuzzed signature never validates. The anchor is a throwaway CA made in memory, and
the seed a signature by it."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from service.signing import SignatureValidator


@functools.cache
def _ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz CA")])
    start = datetime(2025, 1, 1, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(start).not_valid_after(start + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def anchor_der() -> bytes:
    """The CA certificate, DER."""
    return _ca()[1].public_bytes(serialization.Encoding.DER)


def signature_der() -> bytes:
    """A detached SHA-256 CMS signature of 32 zero bytes by the CA's key, DER."""
    key, cert = _ca()
    return (
        pkcs7.PKCS7SignatureBuilder().set_data(bytes(32)).add_signer(cert, key, hashes.SHA256())
        .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature])
    )  # fmt: skip


@functools.cache
def _validator() -> SignatureValidator:
    return SignatureValidator([anchor_der()])


def target(data: bytes) -> None:
    """Validate ``data`` as a signature of 32 zero bytes."""
    verdict = _validator().validate(data, bytes(32), datetime(2026, 1, 1, tzinfo=UTC))
    if verdict.valid:
        raise AssertionError("a fuzzed signature validated")


def seeds() -> list[bytes]:
    """A detached signature by the anchor (of other content: its digest differs)."""
    return [signature_der()]
