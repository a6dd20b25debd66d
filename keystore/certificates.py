"""Document signer identities on the token: a sign-only key pair and its X.509 certificate.

A signer ``NAME`` is three token objects sharing the label ``medvault-signer-NAME`` and
one ``CKA_ID``: the private key (sensitive, non-extractable, sign only), its public key,
and a ``CKO_CERTIFICATE`` (``CKC_X_509``, ``CKA_VALUE`` = DER) imported once a CA has
signed the CSR made here. That is the layout other PKCS#11 consumers (pyHanko,
``pkcs11-tool``, browsers) expect, so the token stays usable outside medvault.

The CSR (PKCS#10) is assembled with asn1crypto and signed inside the token through the
same :class:`keystore.signing.Pkcs11Signer` that signs audit checkpoints: one signing
path for every key role.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import pkcs11
from asn1crypto import csr as asn1_csr
from asn1crypto import keys as asn1_keys
from asn1crypto import pem
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, CertificateType, ObjectClass
from pkcs11 import exceptions as p11e

from keystore.admin import SigningKeyKind, ensure_signing_key
from keystore.errors import KeyNotFoundError, KeystoreError
from keystore.pkcs11_session import Pkcs11SessionPool
from keystore.signing import Pkcs11Signer

SIGNER_PREFIX = "medvault-signer-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}\Z")


class SignerNotFoundError(KeyNotFoundError):
    """No signer key (or no certificate) of that name on the token."""


class CertificateMismatchError(KeystoreError):
    """A certificate does not certify the signer's key, or cannot be parsed."""


@dataclass(frozen=True, slots=True)
class SignerSummary:
    """One signer on the token, as ``medvault keys list`` shows it."""

    name: str
    key_type: str  # "ec-p256" or "rsa-2048" (or the token's key type name)
    subject: str  # RFC 4514; empty until a certificate is imported
    not_after: datetime | None


def signer_label(name: str) -> str:
    """The token label of signer ``name``; refuses names that are not simple identifiers."""
    if not _NAME.match(name):
        raise ValueError(
            f"signer name {name!r} must be 1-100 letters, digits, '.', '_', '@' or '-'"
        )
    return SIGNER_PREFIX + name


def create_signer_key(pool: Pkcs11SessionPool, name: str, kind: SigningKeyKind = "ec-p256") -> bool:
    """Create signer ``name``'s key pair (with a fresh ``CKA_ID``); False if it existed."""
    return ensure_signing_key(pool, signer_label(name), kind, key_id=secrets.token_bytes(16))


def signer(pool: Pkcs11SessionPool, name: str) -> Pkcs11Signer:
    """The keystore signer of ``name``; ``SignerNotFoundError`` names the command to run."""
    label = signer_label(name)
    try:
        return Pkcs11Signer(pool, label)
    except KeyNotFoundError as e:
        raise SignerNotFoundError(
            f"no signer {name!r} on the token; create it with "
            f"`medvault keys create-signer {name}` and import its certificate"
        ) from e


def make_csr(pool: Pkcs11SessionPool, name: str, subject: str) -> bytes:
    """A PEM PKCS#10 request for ``name``'s token key, signed in the token.

    ``subject`` is an RFC 4514 string (``CN=Dr Lan,O=Hospital``).
    """
    token_signer = signer(pool, name)
    spki = asn1_keys.PublicKeyInfo.load(token_signer.public_key_der())
    try:
        name_der = x509.Name.from_rfc4514_string(subject).public_bytes()
    except ValueError as e:
        raise ValueError(f"subject {subject!r} is not an RFC 4514 name: {e}") from e
    info = asn1_csr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": asn1_x509.Name.load(name_der),
            "subject_pk_info": spki,
            "attributes": [],
        }
    )
    algorithm = "sha256_ecdsa" if spki.algorithm == "ec" else "sha256_rsa"
    request = asn1_csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": algorithm},
            "signature": token_signer.sign(info.dump()),
        }
    )
    return bytes(pem.armor("CERTIFICATE REQUEST", request.dump()))


def _certificate_der(data: bytes) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise CertificateMismatchError("not an X.509 certificate in PEM or DER") from e


def import_certificate(pool: Pkcs11SessionPool, name: str, data: bytes) -> x509.Certificate:
    """Store ``data`` (PEM or DER) as ``name``'s certificate, replacing an older one.

    The certificate must certify the signer's token key: ``CertificateMismatchError``
    otherwise, and nothing is written.
    """
    cert = _certificate_der(data)
    token_signer = signer(pool, name)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if spki != token_signer.public_key_der():
        raise CertificateMismatchError(
            f"the certificate's public key is not signer {name!r}'s key on the token; "
            "was it issued for another CSR?"
        )
    label = signer_label(name)
    der = cert.public_bytes(serialization.Encoding.DER)
    with pool.session() as session:
        key_id = _key_id(session, label)
        for old in _objects(session, ObjectClass.CERTIFICATE, label):
            old.destroy()
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.LABEL: label,
                Attribute.ID: key_id,
                Attribute.SUBJECT: cert.subject.public_bytes(),
                Attribute.ISSUER: cert.issuer.public_bytes(),
                Attribute.SERIAL_NUMBER: _serial_der(der),
                Attribute.VALUE: der,
            }
        )
    return cert


def load_certificate(pool: Pkcs11SessionPool, name: str) -> bytes:
    """The DER certificate of signer ``name``; ``SignerNotFoundError`` when none."""
    label = signer_label(name)
    with pool.session() as session:
        found = _objects(session, ObjectClass.CERTIFICATE, label)
        if not found:
            raise SignerNotFoundError(
                f"signer {name!r} has no certificate on the token; import one with "
                f"`medvault keys import-cert {name} CERT.pem`"
            )
        return bytes(found[0][Attribute.VALUE])


def list_signers(pool: Pkcs11SessionPool) -> list[SignerSummary]:
    """Every signer key on the token with its certificate's subject and expiry."""
    with pool.session() as session:
        keys = [
            (str(k[Attribute.LABEL]), k[Attribute.KEY_TYPE])
            for k in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
            if str(k[Attribute.LABEL]).startswith(SIGNER_PREFIX)
        ]
        certs = {
            label: bytes(c[Attribute.VALUE])
            for label, _ in keys
            for c in _objects(session, ObjectClass.CERTIFICATE, label)[:1]
        }
    return [_summary(label, key_type, certs.get(label)) for label, key_type in sorted(keys)]


def _summary(label: str, key_type: object, der: bytes | None) -> SignerSummary:
    kind = {pkcs11.KeyType.EC: "ec-p256", pkcs11.KeyType.RSA: "rsa-2048"}.get(
        key_type,
        str(key_type),  # type: ignore[call-overload]
    )
    subject, not_after = "", None
    if der is not None:
        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string()
        not_after = cert.not_valid_after_utc.astimezone(UTC)
    return SignerSummary(label.removeprefix(SIGNER_PREFIX), kind, subject, not_after)


def _objects(session: pkcs11.Session, object_class: ObjectClass, label: str) -> list[pkcs11.Object]:
    try:
        return list(session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: label}))
    except p11e.PKCS11Error as e:
        raise KeystoreError(f"cannot search the token for {label!r}: {type(e).__name__}") from e


def _key_id(session: pkcs11.Session, label: str) -> bytes:
    """The ``CKA_ID`` of the signer's private key (its label for keys made without one)."""
    keys = _objects(session, ObjectClass.PRIVATE_KEY, label)
    if not keys:
        raise SignerNotFoundError(f"no signer key {label!r} on the token")
    try:
        key_id = bytes(keys[0][Attribute.ID])
    except p11e.PKCS11Error:
        key_id = b""
    return key_id or label.encode()


def _serial_der(der: bytes) -> bytes:
    """``CKA_SERIAL_NUMBER``: the DER INTEGER of the certificate's serial number."""
    return bytes(asn1_x509.Certificate.load(der)["tbs_certificate"]["serial_number"].dump())


class SignerUnusableError(KeyNotFoundError):
    """The signer exists but cannot sign now: its certificate is outside its validity."""


class Pkcs11Signers:
    """``SignerFactory`` over one token: signers and signer certificates, on demand."""

    def __init__(self, pool: Pkcs11SessionPool) -> None:
        self._pool = pool

    def by_label(self, key_label: str) -> Pkcs11Signer:
        """The signer of key ``key_label``; ``KeyNotFoundError`` if absent."""
        return Pkcs11Signer(self._pool, key_label)

    def document_signer(self, name: str) -> Pkcs11Signer:
        """Signer ``name``'s key; ``SignerNotFoundError`` names the command to run."""
        return signer(self._pool, name)

    def document_certificate(self, name: str) -> bytes:
        """The DER certificate of signer ``name``; ``SignerNotFoundError`` when none."""
        return load_certificate(self._pool, name)
