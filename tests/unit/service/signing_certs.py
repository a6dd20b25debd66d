"""Synthetic certificates and a software signer for the signing unit tests.

Imports no pyHanko: ``pyhanko_probe`` runs in a fresh interpreter that must not load it
before the moment it chooses, and uses these too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class SoftSigner:
    """A software EC key behind the keystore's ``Signer`` protocol."""

    key_label = "soft"

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


def _name(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def certificate(
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
