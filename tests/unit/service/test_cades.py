"""service.signing.cms.CadesSigner: byte for byte pyHanko's CAdES-BES, verified by openssl.

The detached ``.p7s`` used to be built by pyHanko's ``Signer.async_sign`` for every
signature; :class:`CadesSigner` now assembles the same DER from parts built once per
signer. Here pyHanko itself is the reference: with the same certificate, chain, digest,
time and raw signature both must give the same bytes (RSA PKCS#1 v1.5 is
deterministic; for ECDSA a fixed raw signature stands in for the token's). A real
software-key signature is then checked by ``openssl cms -verify`` and by the service's
validator. The token path is covered by tests/integration/signing/test_signing.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyhanko.sign.signers.pdf_cms import PdfCMSSignedAttributes

from service.signing.cms import CadesSigner, TokenCmsSigner
from service.signing.validation import SignatureValidator

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
CONTENT = b"synthetic record for CAdES tests " * 64
FIXED_ECDSA = bytes.fromhex("3006020101020102")  # a well-formed DER ECDSA-Sig-Value


class _SoftSigner:
    """A software key behind the keystore's ``Signer`` protocol; ``fixed`` replaces the
    (randomised) ECDSA value so outputs can be compared."""

    key_label = "soft"

    def __init__(self, key: PrivateKey, *, fixed: bool = False) -> None:
        self._key, self._fixed = key, fixed

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return FIXED_ECDSA if self._fixed else self._key.sign(data, ec.ECDSA(hashes.SHA256()))


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medvault synthetic hospital" * 3),
    ])  # fmt: skip


def _certificate(
    cn: str, key: PrivateKey, issuer: tuple[str, PrivateKey] | None = None, *, ca: bool = False
) -> bytes:
    issuer_cn, issuer_key = issuer or (cn, key)
    now = datetime.now(UTC)
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=True, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    builder = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(issuer_cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(usage, critical=True)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )  # fmt: skip
    if not ca:
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION])
        builder = builder.add_extension(eku, critical=False)
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


ROOT_KEY = ec.generate_private_key(ec.SECP256R1())
ROOT = _certificate("synthetic root", ROOT_KEY, ca=True)
SUB_KEY = ec.generate_private_key(ec.SECP256R1())
SUB = _certificate("synthetic issuing ca", SUB_KEY, ("synthetic root", ROOT_KEY), ca=True)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(65537, 2048)
EC_CERT = _certificate("dr-ec", EC_KEY, ("synthetic issuing ca", SUB_KEY))
RSA_CERT = _certificate("dr-rsa", RSA_KEY, ("synthetic issuing ca", SUB_KEY))


def _pyhanko(signer: _SoftSigner, cert: bytes, chain: list[bytes], digest: bytes,
             when: datetime) -> bytes:  # fmt: skip
    """What the service produced before CadesSigner: pyHanko's CAdES attribute set."""
    reference = TokenCmsSigner(
        signer, asn1_x509.Certificate.load(cert), [asn1_x509.Certificate.load(c) for c in chain]
    )
    signed = asyncio.run(reference.async_sign(
        digest, "sha256", use_pades=True, is_pdf_sig=False,
        signed_attr_settings=PdfCMSSignedAttributes(signing_time=when),
    ))  # fmt: skip
    return bytes(signed.dump())


@pytest.mark.parametrize("kind", ["ec", "rsa"])
@pytest.mark.parametrize("chain", [[], [SUB], [SUB, ROOT]], ids=["no-chain", "sub", "sub+root"])
@pytest.mark.parametrize(
    "when",
    [datetime(2026, 11, 29, 23, 59, 59, tzinfo=UTC), datetime(1999, 1, 2, 3, 4, 5, tzinfo=UTC)],
    ids=["2026", "1999"],
)  # fmt: skip
def test_same_bytes_as_pyhanko(kind: str, chain: list[bytes], when: datetime) -> None:
    key, cert = (EC_KEY, EC_CERT) if kind == "ec" else (RSA_KEY, RSA_CERT)
    signer = _SoftSigner(key, fixed=True)
    for content in (b"", CONTENT):
        digest = hashlib.sha256(content).digest()
        ours = CadesSigner(signer, cert, chain).sign(digest, when)
        assert ours == _pyhanko(signer, cert, chain, digest, when)


def test_signer_is_reusable_and_only_digest_and_time_change() -> None:
    signer = CadesSigner(_SoftSigner(EC_KEY, fixed=True), EC_CERT, [SUB])
    when = datetime(2026, 1, 1, tzinfo=UTC)
    first = signer.sign(hashlib.sha256(b"a").digest(), when)
    again = signer.sign(hashlib.sha256(b"b").digest(), when + timedelta(seconds=1))
    assert len(first) == len(again)
    assert sum(x != y for x, y in zip(first, again, strict=True)) <= 32 + 2
    assert signer.sign(hashlib.sha256(b"a").digest(), when) == first


def test_refuses_a_wrong_digest_or_a_time_beyond_utctime() -> None:
    signer = CadesSigner(_SoftSigner(EC_KEY), EC_CERT)
    with pytest.raises(ValueError, match="content_sha256"):
        signer.sign(b"short", datetime.now(UTC))
    with pytest.raises(ValueError, match="signing_time"):
        signer.sign(hashlib.sha256(b"").digest(), datetime(2050, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_real_signature_verifies_with_openssl_and_the_validator(kind: str, tmp_path: Path) -> None:
    key, cert = (EC_KEY, EC_CERT) if kind == "ec" else (RSA_KEY, RSA_CERT)
    when = datetime.now(UTC).replace(microsecond=0)
    p7s = CadesSigner(_SoftSigner(key), cert, [SUB]).sign(hashlib.sha256(CONTENT).digest(), when)
    root_pem = x509.load_der_x509_certificate(ROOT).public_bytes(serialization.Encoding.PEM)
    (tmp_path / "root.pem").write_bytes(root_pem)
    (tmp_path / "sig.p7s").write_bytes(p7s)

    def openssl_verifies(content: bytes) -> bool:
        (tmp_path / "content.bin").write_bytes(content)
        result = subprocess.run(
            ["openssl", "cms", "-verify", "-binary", "-content", str(tmp_path / "content.bin"),
             "-inform", "DER", "-in", str(tmp_path / "sig.p7s"),
             "-CAfile", str(tmp_path / "root.pem"), "-out", "/dev/null"],
            capture_output=True, check=False,
        )  # fmt: skip
        return result.returncode == 0

    assert openssl_verifies(CONTENT)
    assert not openssl_verifies(CONTENT[:-1] + b"!")
    validator = SignatureValidator([ROOT])
    assert validator.validate(p7s, hashlib.sha256(CONTENT).digest(), when).valid
    assert not validator.validate(p7s, hashlib.sha256(b"other").digest(), when).valid
