"""The development CA: certificates openssl accepts, idempotent issue, private key modes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.localstack.ca import CA_COMMON_NAME, DevCA

OPENSSL = shutil.which("openssl")


def _openssl_verify(ca: Path, cert: Path, purpose: str) -> None:
    assert OPENSSL is not None, "openssl is required (Debian package openssl)"
    result = subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(ca), "-purpose", purpose, str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_and_client_certs_verify_with_openssl(tmp_path: Path) -> None:
    ca = DevCA.load_or_create(tmp_path)
    server = ca.issue_server(tmp_path)
    client = ca.issue_client(tmp_path, "dr-who", role="clinician")

    _openssl_verify(ca.cert_path, server.cert, "sslserver")
    _openssl_verify(ca.cert_path, client.cert, "sslclient")


def test_ca_certificate_is_a_constrained_signing_ca(tmp_path: Path) -> None:
    ca = _cert(DevCA.load_or_create(tmp_path).cert_path)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value

    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CA_COMMON_NAME
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    assert usage.key_cert_sign
    assert usage.crl_sign
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert 5 * 365 <= lifetime.days <= 5 * 365 + 1


def test_server_cert_names_localhost_and_loopback(tmp_path: Path) -> None:
    ca = DevCA.load_or_create(tmp_path)
    cert = _cert(ca.issue_server(tmp_path).cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_client_subject_carries_name_and_role(tmp_path: Path) -> None:
    ca = DevCA.load_or_create(tmp_path)
    with_role = _cert(ca.issue_client(tmp_path, "ris", role="application").cert)
    without = _cert(ca.issue_client(tmp_path, "local-admin").cert)

    assert with_role.subject.rfc4514_string() == "OU=application,O=medvault,CN=ris"
    assert without.subject.rfc4514_string() == "O=medvault,CN=local-admin"
    eku = without.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_second_run_keeps_every_file(tmp_path: Path) -> None:
    ca = DevCA.load_or_create(tmp_path)
    ca.issue_server(tmp_path)
    ca.issue_client(tmp_path, "local-admin", role="admin")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    again = DevCA.load_or_create(tmp_path)
    again.issue_server(tmp_path)
    again.issue_client(tmp_path, "local-admin", role="admin")

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_changed_role_reissues_the_client_cert(tmp_path: Path) -> None:
    ca = DevCA.load_or_create(tmp_path)
    first = ca.issue_client(tmp_path, "app").cert.read_bytes()
    second = ca.issue_client(tmp_path, "app", role="auditor")

    assert second.cert.read_bytes() != first
    assert "OU=auditor" in _cert(second.cert).subject.rfc4514_string()


def test_new_ca_reissues_leaves_it_did_not_sign(tmp_path: Path) -> None:
    ca = DevCA.load_or_create(tmp_path)
    ca.issue_server(tmp_path)
    (tmp_path / "ca.key").unlink()  # a lost CA key means a new CA...

    new_ca = DevCA.load_or_create(tmp_path)
    server = new_ca.issue_server(tmp_path)

    # ...and the old server certificate no longer chains, so it must have been replaced.
    _openssl_verify(new_ca.cert_path, server.cert, "sslserver")


def test_private_keys_are_owner_only(tmp_path: Path) -> None:
    ca = DevCA.load_or_create(tmp_path)
    ca.issue_server(tmp_path)
    ca.issue_client(tmp_path, "local-app")

    keys = sorted(tmp_path.glob("*.key"))
    assert [k.name for k in keys] == ["ca.key", "client-local-app.key", "server.key"]
    for key in keys:
        assert key.stat().st_mode & 0o777 == 0o600, key.name


def test_loosened_key_mode_is_repaired(tmp_path: Path) -> None:
    DevCA.load_or_create(tmp_path)
    (tmp_path / "ca.key").chmod(0o644)

    DevCA.load_or_create(tmp_path)

    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("name", ["", "../evil", ".hidden", "a/b"])
def test_client_name_must_be_a_file_name(tmp_path: Path, name: str) -> None:
    ca = DevCA.load_or_create(tmp_path)
    with pytest.raises(ValueError, match="plain file-name"):
        ca.issue_client(tmp_path, name)


def test_crl_is_standard_and_revokes_with_openssl(tmp_path: Path) -> None:
    """``openssl crl`` verifies the CRL's signature; ``openssl verify -crl_check`` honours it."""
    assert OPENSSL is not None, "openssl is required (Debian package openssl)"
    ca = DevCA.load_or_create(tmp_path)
    revoked = ca.issue_client(tmp_path, "revoked-one")
    kept = ca.issue_client(tmp_path, "kept-one")
    crl = ca.issue_crl(tmp_path / "clients.crl", [_cert(revoked.cert).serial_number])
    check = subprocess.run(
        [OPENSSL, "crl", "-in", str(crl), "-CAfile", str(ca.cert_path), "-noout"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert "verify OK" in check.stdout + check.stderr

    def verify(cert: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [OPENSSL, "verify", "-crl_check", "-CAfile", str(ca.cert_path),
             "-CRLfile", str(crl), str(cert)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip

    assert verify(kept.cert).returncode == 0
    refused = verify(revoked.cert)
    assert refused.returncode != 0
    assert "revoked" in (refused.stdout + refused.stderr).lower()
