"""A development certificate authority for the local stack's mutual TLS.

The CA issues one server certificate (SAN ``localhost`` / ``127.0.0.1``) and client
certificates whose subject names the caller: ``CN=<name>, O=medvault[, OU=<role>]``.
The service reads the role from the OU, so the same CA serves role tests.

Every operation is idempotent: a file that exists, parses, is signed by this CA, is not
close to expiry and matches what was asked for is kept byte for byte. Anything else is
reissued. Private keys are EC P-256, unencrypted PKCS#8 PEM, mode 0600; they never
leave the directory and are never printed. This CA is for development only: its key is
unencrypted on disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_COMMON_NAME = "medvault development CA"
ORGANIZATION = "medvault"
CA_VALIDITY = dt.timedelta(days=5 * 365)
# 825 days is the longest TLS leaf lifetime that every mainstream client still accepts.
LEAF_VALIDITY = dt.timedelta(days=825)
# Reissue ahead of expiry so a running stack never crosses the expiry date unnoticed.
RENEW_BEFORE = dt.timedelta(days=30)
CRL_VALIDITY = dt.timedelta(days=7)
# Backdate notBefore so a peer whose clock is slightly behind still accepts the cert.
CLOCK_SKEW = dt.timedelta(minutes=5)

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class IssuedCert:
    """Paths of an issued certificate and its private key."""

    cert: Path
    key: Path


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` atomically with ``mode`` (never world-readable, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600, so a secret is never readable by others mid-write;
    # the rename makes a concurrent reader see either the old file or the new one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def private_opener(path: str, flags: int) -> int:
    """An ``open(..., opener=)`` that creates files 0600 (logs, state files)."""
    return os.open(path, flags, 0o600)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    """The EC key at ``path``, or None when it is missing or unusable."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _fresh(cert: x509.Certificate) -> bool:
    """True when ``cert`` is valid now and stays valid for RENEW_BEFORE."""
    now = _now()
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - RENEW_BEFORE > now


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


class DevCA:
    """The development CA in one directory (``ca.key``, ``ca.pem``)."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        """Wrap a loaded CA; use :meth:`load_or_create` rather than calling this."""
        self.directory = directory
        self._key = key
        self.cert = cert

    @property
    def cert_path(self) -> Path:
        """Path of the CA certificate (the trust anchor for clients and the server)."""
        return self.directory / "ca.pem"

    @classmethod
    def load_or_create(cls, directory: Path) -> DevCA:
        """Load the CA in ``directory``, or create it when missing, stale or mismatched."""
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key = _load_key(directory / "ca.key")
        cert = _load_cert(directory / "ca.pem")
        if key is not None and cert is not None and cls._usable(cert, key):
            os.chmod(directory / "ca.key", 0o600)  # repair a loosened mode, keep the key
            return cls(directory, key, cert)
        key = _new_key()
        cert = cls._self_signed(key)
        write_private(directory / "ca.key", _key_pem(key))
        write_private(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cls(directory, key, cert)

    @classmethod
    def exists(cls, directory: Path) -> bool:
        """True when ``directory`` holds a CA key and certificate (validity not checked)."""
        return (directory / "ca.key").is_file() and (directory / "ca.pem").is_file()

    @staticmethod
    def _usable(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            return False
        return constraints.value.ca and _fresh(cert) and _same_public_key(cert, key)

    @staticmethod
    def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
        )
        return builder.sign(key, hashes.SHA256())

    def issue_server(
        self,
        directory: Path,
        hostnames: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
    ) -> IssuedCert:
        """Issue (or keep) ``server.pem``/``server.key`` for ``hostnames`` and ``ips``."""
        sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cn = hostnames[0] if hostnames else ips[0]
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            ]
        )
        return self._issue(
            IssuedCert(directory / "server.pem", directory / "server.key"),
            subject,
            ExtendedKeyUsageOID.SERVER_AUTH,
            sans,
        )

    def issue_client(self, directory: Path, name: str, role: str | None = None) -> IssuedCert:
        """Issue (or keep) ``client-<name>.pem``/``.key``: CN=name, O=medvault, OU=role."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"client name {name!r} must be a plain file-name component")
        attrs = [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
        if role:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
        return self._issue(
            IssuedCert(directory / f"client-{name}.pem", directory / f"client-{name}.key"),
            x509.Name(attrs),
            ExtendedKeyUsageOID.CLIENT_AUTH,
            [],
        )

    def issue_signer(
        self,
        csr_pem: bytes,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> bytes:
        """Sign a document signer's CSR (made in the token): PEM certificate.

        keyUsage digitalSignature + nonRepudiation (critical) and extendedKeyUsage
        emailProtection, which ``openssl cms -verify`` accepts under its default S/MIME
        signing purpose. ``not_before``/``not_after`` exist for tests of expired signers.
        """
        csr = x509.load_pem_x509_csr(csr_pem)
        if not csr.is_signature_valid:
            raise ValueError("the CSR's signature does not verify")
        now = _now()
        start = not_before or now - CLOCK_SKEW
        end = not_after or min(now + LEAF_VALIDITY, self.cert.not_valid_after_utc)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        usage = x509.KeyUsage(
            digital_signature=True, content_commitment=True, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False,
        )  # fmt: skip
        cert = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue_crl(
        self, path: Path, revoked: Sequence[int] = (), validity: dt.timedelta = CRL_VALIDITY
    ) -> Path:
        """Write a CRL (PEM) revoking the serials ``revoked``; for ``[tls] crl`` in tests.

        A standard X.509 v2 CRL with an authority key identifier and a CRL number
        (``openssl crl -CAfile ca.pem`` verifies it). The number is the time, so each
        newer CRL carries a higher one.
        """
        now = _now()
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + validity)
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
        )
        for serial in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
            builder = builder.add_revoked_certificate(entry.build())
        crl = builder.sign(self._key, hashes.SHA256())
        write_private(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        return path

    def _issue(
        self,
        paths: IssuedCert,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
    ) -> IssuedCert:
        key = _load_key(paths.key)
        cert = _load_cert(paths.cert)
        if key is not None and cert is not None and self._matches(cert, key, subject, usage, sans):
            os.chmod(paths.key, 0o600)
            return paths
        key = _new_key()
        cert = self._sign_leaf(key, subject, usage, sans)
        # Key first: a reader that sees the new certificate must also find its key.
        write_private(paths.key, _key_pem(key))
        write_private(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return paths

    def _matches(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
    ) -> bool:
        """True when the existing leaf is what we would issue now, from this CA."""
        try:
            cert.verify_directly_issued_by(self.cert)
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            have_sans = _sans(cert)
        except (InvalidSignature, ValueError, TypeError, x509.ExtensionNotFound):
            return False
        return (
            _fresh(cert)
            and _same_public_key(cert, key)
            and cert.subject == subject
            and usage in eku
            and set(have_sans) == set(sans)
        )

    def _sign_leaf(
        self,
        key: ec.EllipticCurvePrivateKey,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
    ) -> x509.Certificate:
        now = _now()
        not_after = min(now + LEAF_VALIDITY, self.cert.not_valid_after_utc)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self._key, hashes.SHA256())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """keyCertSign+cRLSign for the CA; digitalSignature (ECDHE-ECDSA) for leaves."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value)

