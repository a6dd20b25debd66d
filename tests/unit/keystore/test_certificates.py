"""Signer identities on the real SoftHSM2 token: key, CSR (openssl verifies), certificate."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, ObjectClass

from keystore import Pkcs11SessionPool
from keystore.certificates import (
    CertificateMismatchError,
    SignerNotFoundError,
    create_signer_key,
    import_certificate,
    list_signers,
    load_certificate,
    make_csr,
    signer_label,
)
from service.localstack.ca import DevCA


@pytest.fixture(scope="module")
def dev_ca(tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    return DevCA.load_or_create(tmp_path_factory.mktemp("signer-ca"))


@pytest.mark.parametrize(("name", "kind"), [("ut-ec", "ec-p256"), ("ut-rsa", "rsa-2048")])
def test_csr_verifies_and_certificate_imports(
    keystore_pool: Pkcs11SessionPool, dev_ca: DevCA, tmp_path: Path, name: str, kind: str
) -> None:
    assert create_signer_key(keystore_pool, name, kind)  # type: ignore[arg-type]
    assert not create_signer_key(keystore_pool, name, kind)  # type: ignore[arg-type]
    csr = make_csr(keystore_pool, name, f"CN={name},O=medvault tests")
    (tmp_path / "req.pem").write_bytes(csr)
    checked = subprocess.run(
        ["openssl", "req", "-verify", "-noout", "-in", str(tmp_path / "req.pem")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    cert_pem = dev_ca.issue_signer(csr)
    cert = import_certificate(keystore_pool, name, cert_pem)
    assert load_certificate(keystore_pool, name) == cert.public_bytes(serialization.Encoding.DER)
    summary = {s.name: s for s in list_signers(keystore_pool)}[name]
    assert summary.key_type == kind
    assert summary.subject == f"CN={name},O=medvault tests"
    assert summary.not_after is not None
    assert summary.not_after > datetime.now(UTC)


def test_certificate_shares_the_key_id(keystore_pool: Pkcs11SessionPool, dev_ca: DevCA) -> None:
    create_signer_key(keystore_pool, "ut-id")
    import_certificate(keystore_pool, "ut-id", dev_ca.issue_signer(
        make_csr(keystore_pool, "ut-id", "CN=ut-id")))  # fmt: skip
    label = signer_label("ut-id")
    with keystore_pool.session() as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        (cert,) = session.get_objects(
            {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label}
        )
        assert bytes(key[Attribute.ID]) == bytes(cert[Attribute.ID])
        assert len(bytes(key[Attribute.ID])) == 16
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.SENSITIVE] is True


def test_certificate_for_another_key_is_refused(
    keystore_pool: Pkcs11SessionPool, dev_ca: DevCA
) -> None:
    create_signer_key(keystore_pool, "ut-a")
    create_signer_key(keystore_pool, "ut-b")
    other = dev_ca.issue_signer(make_csr(keystore_pool, "ut-b", "CN=ut-b"))
    with pytest.raises(CertificateMismatchError, match="not signer 'ut-a'"):
        import_certificate(keystore_pool, "ut-a", other)
    with pytest.raises(SignerNotFoundError, match="import-cert ut-a"):
        load_certificate(keystore_pool, "ut-a")
    with pytest.raises(CertificateMismatchError):
        import_certificate(keystore_pool, "ut-a", b"not a certificate")


def test_unknown_signer_names_the_command(keystore_pool: Pkcs11SessionPool) -> None:
    with pytest.raises(SignerNotFoundError, match="keys create-signer nobody"):
        make_csr(keystore_pool, "nobody", "CN=nobody")
    with pytest.raises(ValueError, match="signer name"):
        signer_label("../etc")


def test_expired_certificate_issues_with_given_window(
    keystore_pool: Pkcs11SessionPool, dev_ca: DevCA
) -> None:
    create_signer_key(keystore_pool, "ut-old")
    start, end = datetime(2020, 1, 1, tzinfo=UTC), datetime(2021, 1, 1, tzinfo=UTC)
    pem = dev_ca.issue_signer(
        make_csr(keystore_pool, "ut-old", "CN=ut-old"), not_before=start, not_after=end
    )
    assert x509.load_pem_x509_certificate(pem).not_valid_after_utc == end
