"""Signing with token-held private keys: one abstraction for every key role.

Audit checkpoints, backup manifests and (later) document signers all sign through
:class:`Pkcs11Signer`; only the key label differs. The private key never leaves the
token; the public key is read from the token's public key object.

Output formats are the ones standard tools expect, so a third party can verify without
medvault (``openssl dgst -sha256 -verify pub.pem -signature sig.der data``):

* EC keys: the SHA-256 digest is computed here and signed in the token with
  ``CKM_ECDSA``; PKCS#11 returns raw ``r || s``, which is re-encoded as DER
  ``ECDSA-Sig-Value`` (RFC 3279). Hashing here rather than with ``CKM_ECDSA_SHA256``
  works with every token, including those that offer only raw ECDSA.
* RSA keys: ``CKM_SHA256_RSA_PKCS`` (PKCS#1 v1.5 with SHA-256) in the token.
"""

from __future__ import annotations

import hashlib

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.types import PublicKey, SignMixin
from pkcs11.util.ec import encode_ec_public_key

from keystore.errors import KeyNotFoundError, KeystoreError
from keystore.pkcs11_session import Pkcs11SessionPool, one_shot


def _raw_to_der(raw: bytes, label: str) -> bytes:
    """Re-encode PKCS#11's fixed-width ``r || s`` as DER ``ECDSA-Sig-Value``."""
    if not raw or len(raw) % 2:
        raise KeystoreError(f"key {label!r} returned a malformed ECDSA signature")
    half = len(raw) // 2
    r = int.from_bytes(raw[:half], "big")
    s = int.from_bytes(raw[half:], "big")
    return encode_dss_signature(r, s)


def _spki_from_token(key: PublicKey, label: str) -> bytes:
    """SubjectPublicKeyInfo DER of a token public key object (EC or RSA)."""
    key_type = key[Attribute.KEY_TYPE]
    if key_type == KeyType.EC:
        der = encode_ec_public_key(key)
        # Round-trip through cryptography: rejects a point that is not on the curve.
        loaded = serialization.load_der_public_key(der)
    elif key_type == KeyType.RSA:
        numbers = rsa.RSAPublicNumbers(
            e=int.from_bytes(key[Attribute.PUBLIC_EXPONENT], "big"),
            n=int.from_bytes(key[Attribute.MODULUS], "big"),
        )
        loaded = numbers.public_key()
    else:
        raise KeystoreError(f"key {label!r} is neither EC nor RSA; it cannot sign here")
    return loaded.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Pkcs11Signer:
    """Signer over the private key ``label`` on the token; EC P-256 or RSA.

    Construction checks that the key pair exists (``KeyNotFoundError`` otherwise), so
    a missing audit key fails at start-up, not at the first checkpoint.
    """

    def __init__(self, pool: Pkcs11SessionPool, label: str) -> None:
        self._pool = pool
        self._label = label
        self._key_type, self._public_der = pool.run(self._describe)

    @property
    def key_label(self) -> str:
        """Label of the private (and public) key object on the token."""
        return self._label

    def sign(self, data: bytes) -> bytes:
        """DER signature over SHA-256(``data``), made inside the token."""
        if self._key_type == KeyType.EC:
            digest = hashlib.sha256(data).digest()
            raw = self._pool.run(lambda s: self._sign_raw(s, digest, Mechanism.ECDSA))
            return _raw_to_der(raw, self._label)
        return self._pool.run(lambda s: self._sign_raw(s, data, Mechanism.SHA256_RSA_PKCS))

    def public_key_der(self) -> bytes:
        """The public key as DER SubjectPublicKeyInfo (read once from the token)."""
        return self._public_der

    def _private(self, session: pkcs11.Session) -> SignMixin:
        key = self._pool.find_key(session, self._label, ObjectClass.PRIVATE_KEY)
        if not isinstance(key, SignMixin):
            raise KeyNotFoundError(f"key {self._label!r} cannot sign")
        return key

    def _sign_raw(self, session: pkcs11.Session, data: bytes, mechanism: Mechanism) -> bytes:
        return one_shot(self._private(session).sign(data, mechanism=mechanism))

    def _describe(self, session: pkcs11.Session) -> tuple[KeyType, bytes]:
        """Check the private key exists and read the type and SPKI of its public half."""
        private = self._pool.find_key(session, self._label, ObjectClass.PRIVATE_KEY)
        key_type = KeyType(private[Attribute.KEY_TYPE])
        # Not through pool.find_key: its handle cache is keyed by label alone, and the
        # public half shares the private key's label.
        try:
            public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=self._label)
        except (p11e.NoSuchKey, p11e.MultipleObjectsReturned) as e:
            raise KeyNotFoundError(
                f"no single public key {self._label!r} on the token beside its private key"
            ) from e
        if not isinstance(public, PublicKey):
            raise KeyNotFoundError(f"object {self._label!r} is not a public key")
        return key_type, _spki_from_token(public, self._label)
