"""Pkcs11Signer against the real SoftHSM2 token, verified by cryptography and by openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, ObjectClass

from keystore import KeyNotFoundError, Pkcs11SessionPool
from keystore.admin import AUDIT_KEY_LABEL, ensure_signing_key
from keystore.interfaces import Signer
from keystore.signing import Pkcs11Signer

RSA_LABEL = "medvault-test-rsa-signer"
EC_LABEL = "medvault-test-ec-signer"
DATA = b"checkpoint 42 " + bytes(range(256))


@pytest.fixture(scope="module")
def rsa_signer(keystore_pool: Pkcs11SessionPool) -> Pkcs11Signer:
    ensure_signing_key(keystore_pool, RSA_LABEL, "rsa-2048")
    return Pkcs11Signer(keystore_pool, RSA_LABEL)


@pytest.fixture(scope="module")
def audit_signer(keystore_pool: Pkcs11SessionPool) -> Pkcs11Signer:
    return Pkcs11Signer(keystore_pool, AUDIT_KEY_LABEL)


def _verify_with_openssl(tmp_path: Path, signer: Signer, data: bytes, signature: bytes) -> bool:
    public = serialization.load_der_public_key(signer.public_key_der())
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "pub.pem").write_bytes(pem)
    (tmp_path / "sig.der").write_bytes(signature)
    (tmp_path / "data.bin").write_bytes(data)
    result = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.der", "data.bin"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0 and "Verified OK" in result.stdout


def test_audit_key_created_by_ensure_keys(keystore_pool: Pkcs11SessionPool) -> None:
    with keystore_pool.session() as session:
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=AUDIT_KEY_LABEL)
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.SIGN] is True
        assert private[Attribute.DECRYPT] is False
        public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=AUDIT_KEY_LABEL)
        assert public[Attribute.TOKEN] is True


def test_ec_signature_verifies_with_cryptography(audit_signer: Pkcs11Signer) -> None:
    public = serialization.load_der_public_key(audit_signer.public_key_der())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    signature = audit_signer.sign(DATA)
    public.verify(signature, DATA, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(signature, DATA + b"x", ec.ECDSA(hashes.SHA256()))


def test_ec_signature_verifies_with_openssl(audit_signer: Pkcs11Signer, tmp_path: Path) -> None:
    signature = audit_signer.sign(DATA)
    assert _verify_with_openssl(tmp_path, audit_signer, DATA, signature)
    assert not _verify_with_openssl(tmp_path, audit_signer, DATA + b"x", signature)


def test_rsa_signature_verifies(rsa_signer: Pkcs11Signer, tmp_path: Path) -> None:
    public = serialization.load_der_public_key(rsa_signer.public_key_der())
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048
    signature = rsa_signer.sign(DATA)
    public.verify(signature, DATA, padding.PKCS1v15(), hashes.SHA256())
    assert _verify_with_openssl(tmp_path, rsa_signer, DATA, signature)


def test_ensure_signing_key_is_idempotent(keystore_pool: Pkcs11SessionPool) -> None:
    assert ensure_signing_key(keystore_pool, EC_LABEL) in (True, False)
    assert ensure_signing_key(keystore_pool, EC_LABEL) is False
    signer = Pkcs11Signer(keystore_pool, EC_LABEL)
    assert signer.key_label == EC_LABEL
    # A different key pair from the audit key: roles do not share keys.
    assert signer.public_key_der() != Pkcs11Signer(keystore_pool, AUDIT_KEY_LABEL).public_key_der()


def test_missing_label_raises(keystore_pool: Pkcs11SessionPool) -> None:
    with pytest.raises(KeyNotFoundError):
        Pkcs11Signer(keystore_pool, "medvault-no-such-key")


def test_unknown_kind_refused(keystore_pool: Pkcs11SessionPool) -> None:
    with pytest.raises(ValueError, match="unknown signing key kind"):
        ensure_signing_key(keystore_pool, "medvault-test-bad-kind", "dsa-1024")  # type: ignore[arg-type]


def test_signer_satisfies_protocol(audit_signer: Pkcs11Signer) -> None:
    signer: Signer = audit_signer
    assert signer.key_label == AUDIT_KEY_LABEL
